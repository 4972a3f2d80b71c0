//! A built-in synthetic multi-domain segmentation dataset.
//!
//! Procedurally drawn street scenes — sky, a perspective road, sidewalks, a skyline of
//! buildings, trees, poles, cars and people — rendered in several *domains* (datasets) that
//! differ both in appearance (palette, illumination, tint, haze, noise) and in label space
//! (fine classes, coarse classes, unlabeled classes). It stands in for Cityscapes, BDD100K or
//! CamVid wherever the real data is not at hand: tests, examples, benchmarks and small
//! end-to-end training runs of cross-dataset learning.
//!
//! Every sample is a pure function of `(seed, domain, index)`: the same arguments give the same
//! bytes on every machine (integer geometry; f32 shading with `+ − × ÷` only, no libm
//! functions and no fused multiply-add), so a split is just an index range: training samples
//! from 0, held-out samples from [`HELD_OUT_START`].
//!
//! A scene is first drawn in the [`FineClass`] label space (plus the ignore label 255 for the
//! ego-vehicle hood and an optional image border); each domain maps it to its own labels with
//! [`DatasetInfo::fine_to_domain`], so `domain label = fine_to_domain[fine label]` holds pixel
//! by pixel ([`Synthetic::fine_labels`] gives the fine map of any sample).
//!
//! ```
//! use cdcl::data::{Synthetic, SyntheticConfig};
//! # fn main() -> cdcl::Result<()> {
//! let data = Synthetic::new(SyntheticConfig::default_two_domains(64, 128, 7))?;
//! let city = data.sample(0, 3)?; // domain 0, training index 3
//! assert_eq!(city.image.len(), 64 * 128 * 3);
//! let batch = data.mixed_batch(&[(0, 0), (1, 0), (1, 1)])?;
//! assert_eq!(batch.datasets, vec![0, 1, 1]);
//! assert_eq!(data.num_classes(1), 5); // "dusk" has coarse labels
//! # Ok(()) }
//! ```

pub mod augment;
pub mod dataset;
pub mod image;
pub mod labels;
pub mod layouts;
pub mod loader;
mod ppm;
mod render;
mod rng;
pub mod sampler;
mod scene;
mod synthetic_split;

pub use augment::{AugmentConfig, AugmentDraw};
pub use dataset::{verify, DatasetKind, FileDataset, FileItem, LabelMap, SegDataset, SegSample};
pub use image::{RawLabels, RgbImage};
pub use loader::{LoadedBatch, Loader, LoaderConfig, Prefetcher};
pub use ppm::{label_to_rgb8, to_rgb8, write_ppm};
pub use sampler::{SampleRef, Sampler};
pub use synthetic_split::SyntheticSplit;

use crate::error::{Error, Result};

/// The ignore label.
pub const IGNORE: i32 = 255;

/// Index of the first held-out sample: indices below are the training split, indices from here
/// on the held-out split (both are effectively unbounded).
pub const HELD_OUT_START: u64 = 1 << 32;

/// Version of the scene generator and renderer. It changes whenever a change to this module
/// changes the bytes of any sample, so that stored results can say which data they used.
pub const GENERATOR_VERSION: u32 = 1;

/// Per-channel mean subtracted from RGB in [0, 1] (the ImageNet preprocessing).
pub const NORM_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Per-channel standard deviation the RGB is divided by after the mean is subtracted.
pub const NORM_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The classes scenes are drawn in; every domain's labels are a function of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum FineClass {
    Road = 0,
    Sidewalk = 1,
    Building = 2,
    Vegetation = 3,
    Sky = 4,
    Pole = 5,
    Car = 6,
    Person = 7,
}

/// Number of [`FineClass`]es.
pub const NUM_FINE_CLASSES: usize = 8;

impl FineClass {
    /// All fine classes, in label order.
    pub const ALL: [FineClass; NUM_FINE_CLASSES] = [
        FineClass::Road,
        FineClass::Sidewalk,
        FineClass::Building,
        FineClass::Vegetation,
        FineClass::Sky,
        FineClass::Pole,
        FineClass::Car,
        FineClass::Person,
    ];

    /// The lower-case name (Cityscapes spelling).
    pub fn name(self) -> &'static str {
        match self {
            FineClass::Road => "road",
            FineClass::Sidewalk => "sidewalk",
            FineClass::Building => "building",
            FineClass::Vegetation => "vegetation",
            FineClass::Sky => "sky",
            FineClass::Pole => "pole",
            FineClass::Car => "car",
            FineClass::Person => "person",
        }
    }

    /// The label of this class in the fine label space.
    pub fn label(self) -> i32 {
        self as i32
    }
}

/// What a model or a trainer needs to know of one dataset's label space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetInfo {
    /// Short name ("city", "dusk", "fog").
    pub name: String,
    /// One name per class; the number of classes of the dataset's head is its length.
    pub class_names: Vec<String>,
    /// `fine_to_domain[f]` is this dataset's label for fine class `f`: a class in
    /// `0..num_classes()`, or [`IGNORE`] when the dataset leaves that class unlabeled.
    pub fine_to_domain: [i32; NUM_FINE_CLASSES],
}

impl DatasetInfo {
    /// Number of classes of this dataset (its classifier head's width).
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// This dataset's label for a fine label (255 stays 255).
    pub fn map_fine(&self, fine: i32) -> i32 {
        usize::try_from(fine).ok().and_then(|f| self.fine_to_domain.get(f).copied()).unwrap_or(IGNORE)
    }

    /// The fine classes that carry label `class` in this dataset.
    pub fn fine_classes_of(&self, class: i32) -> Vec<FineClass> {
        FineClass::ALL.into_iter().filter(|f| self.fine_to_domain[*f as usize] == class).collect()
    }

    /// The fine label space itself (the first domain of the defaults).
    pub fn fine(name: &str) -> Self {
        DatasetInfo {
            name: name.to_string(),
            class_names: FineClass::ALL.iter().map(|c| c.name().to_string()).collect(),
            fine_to_domain: [0, 1, 2, 3, 4, 5, 6, 7],
        }
    }

    /// Five coarse classes: flat (road, sidewalk), construction (building, pole), nature
    /// (vegetation), sky, object (car, person).
    pub fn coarse(name: &str) -> Self {
        DatasetInfo {
            name: name.to_string(),
            class_names: ["flat", "construction", "nature", "sky", "object"].iter().map(|s| s.to_string()).collect(),
            fine_to_domain: [0, 0, 1, 2, 3, 1, 4, 4],
        }
    }

    fn validate(&self) -> Result<()> {
        let c = self.num_classes();
        if c == 0 {
            return Err(Error::InvalidArgument(format!("dataset {:?} has no classes", self.name)));
        }
        if let Some(bad) = self.fine_to_domain.iter().find(|&&l| l != IGNORE && !(0..c as i32).contains(&l)) {
            return Err(Error::InvalidArgument(format!(
                "dataset {:?}: fine_to_domain holds {bad}, which is neither a class in 0..{c} nor 255",
                self.name
            )));
        }
        for class in 0..c as i32 {
            if !self.fine_to_domain.contains(&class) {
                return Err(Error::InvalidArgument(format!(
                    "dataset {:?}: class {class} ({}) is the label of no fine class",
                    self.name, self.class_names[class as usize]
                )));
            }
        }
        Ok(())
    }
}

/// How a domain looks. Colours are RGB in [0, 1]; the renderer applies, in this order:
/// instance colour (class colour ± jitter), vertical shading, `gain`, `tint`, `saturation`,
/// haze toward `haze_color` (weighted by `haze` and distance), then noise, clamping to [0, 1]
/// and the normalisation by [`NORM_MEAN`] / [`NORM_STD`].
#[derive(Debug, Clone, PartialEq)]
pub struct Appearance {
    /// Base colour of each fine class.
    pub class_colors: [[f32; 3]; NUM_FINE_CLASSES],
    /// Per-instance colour variation of each fine class: each channel of an instance's colour
    /// is its class colour plus a uniform number in `[-jitter/2, jitter/2)`.
    pub class_jitter: [f32; NUM_FINE_CLASSES],
    /// Global illumination gain.
    pub gain: f32,
    /// Per-channel multiplicative tint.
    pub tint: [f32; 3],
    /// 1 keeps colours, 0 makes them grey.
    pub saturation: f32,
    /// Haze strength at the horizon (0 = none); it fades to `haze / 4` at the bottom row.
    pub haze: f32,
    /// The colour haze blends toward.
    pub haze_color: [f32; 3],
    /// Standard deviation of independent per-pixel, per-channel noise.
    pub noise_std: f32,
    /// Standard deviation of smooth, grey, low-frequency noise (blotches of about
    /// `lowfreq_cell` pixels).
    pub lowfreq_noise_std: f32,
    /// Cell size of the low-frequency noise lattice, in pixels (at least 2).
    pub lowfreq_cell: usize,
}

/// What a domain's scenes contain. Ranges are inclusive; fractions are in permille of the image
/// height or width, so the layout scales with the image size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Range of the horizon row, permille of the height.
    pub horizon_permille: (u32, u32),
    /// Half-width of the road at the bottom row, permille of the width.
    pub road_half_width_permille: (u32, u32),
    /// Number of cars.
    pub cars: (u32, u32),
    /// Number of people.
    pub people: (u32, u32),
    /// Number of poles.
    pub poles: (u32, u32),
    /// Number of trees along the street.
    pub trees: (u32, u32),
    /// Number of small trees on the horizon, in front of the skyline.
    pub background_trees: (u32, u32),
    /// Probability (permille) that the ground beyond a sidewalk is grass (vegetation) rather
    /// than more pavement (sidewalk).
    pub verge_permille: u32,
    /// Height of the ego-vehicle hood at the bottom, permille of the height (0 = none). It is
    /// labeled 255 (ignore), as in Cityscapes.
    pub hood_permille: u32,
    /// Width in pixels of a frame of ignore labels around the image (0 = none).
    pub ignore_border: usize,
}

/// One domain (dataset): its label space, its look and its content.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainSpec {
    /// Label space.
    pub info: DatasetInfo,
    /// Appearance.
    pub appearance: Appearance,
    /// Scene content.
    pub layout: Layout,
}

const DAYLIGHT_COLORS: [[f32; 3]; NUM_FINE_CLASSES] = [
    [0.36, 0.35, 0.38], // road
    [0.64, 0.60, 0.56], // sidewalk
    [0.58, 0.50, 0.44], // building
    [0.24, 0.48, 0.18], // vegetation
    [0.48, 0.68, 0.94], // sky
    [0.28, 0.28, 0.31], // pole
    [0.55, 0.30, 0.30], // car
    [0.45, 0.35, 0.55], // person
];

const DEFAULT_JITTER: [f32; NUM_FINE_CLASSES] = [0.04, 0.06, 0.16, 0.14, 0.04, 0.06, 0.80, 0.60];

impl DomainSpec {
    /// "city": the 8 fine classes, daylight, low noise, an ego-vehicle hood.
    pub fn city() -> Self {
        DomainSpec {
            info: DatasetInfo::fine("city"),
            appearance: Appearance {
                class_colors: DAYLIGHT_COLORS,
                class_jitter: DEFAULT_JITTER,
                gain: 1.0,
                tint: [1.0, 1.0, 1.0],
                saturation: 1.0,
                haze: 0.0,
                haze_color: [0.8, 0.8, 0.8],
                noise_std: 0.02,
                lowfreq_noise_std: 0.01,
                lowfreq_cell: 16,
            },
            layout: Layout {
                horizon_permille: (380, 480),
                road_half_width_permille: (300, 420),
                cars: (1, 4),
                people: (1, 4),
                poles: (1, 3),
                trees: (1, 3),
                background_trees: (0, 3),
                verge_permille: 300,
                hood_permille: 80,
                ignore_border: 0,
            },
        }
    }

    /// "dusk": 5 coarse classes (see [`DatasetInfo::coarse`]), dark, warm tint, an orange sky,
    /// higher noise, more cars, no hood but a 1-pixel ignore border.
    pub fn dusk() -> Self {
        let mut colors = DAYLIGHT_COLORS;
        colors[FineClass::Sky as usize] = [0.95, 0.58, 0.42];
        colors[FineClass::Vegetation as usize] = [0.20, 0.36, 0.16];
        colors[FineClass::Building as usize] = [0.46, 0.40, 0.40];
        DomainSpec {
            info: DatasetInfo::coarse("dusk"),
            appearance: Appearance {
                class_colors: colors,
                class_jitter: DEFAULT_JITTER,
                gain: 0.6,
                tint: [1.15, 0.92, 0.72],
                saturation: 0.9,
                haze: 0.15,
                haze_color: [0.42, 0.26, 0.22],
                noise_std: 0.06,
                lowfreq_noise_std: 0.02,
                lowfreq_cell: 12,
            },
            layout: Layout {
                horizon_permille: (420, 520),
                road_half_width_permille: (350, 480),
                cars: (2, 6),
                people: (1, 3),
                poles: (1, 4),
                trees: (1, 2),
                background_trees: (0, 2),
                verge_permille: 150,
                hood_permille: 0,
                ignore_border: 1,
            },
        }
    }

    /// "fog": the 8 fine classes, desaturated, strong grey haze that grows with distance,
    /// blotchy low-frequency noise.
    pub fn fog() -> Self {
        DomainSpec {
            info: DatasetInfo::fine("fog"),
            appearance: Appearance {
                class_colors: DAYLIGHT_COLORS,
                class_jitter: DEFAULT_JITTER,
                gain: 0.95,
                tint: [0.98, 1.0, 1.03],
                saturation: 0.45,
                haze: 0.7,
                haze_color: [0.76, 0.77, 0.79],
                noise_std: 0.025,
                lowfreq_noise_std: 0.05,
                lowfreq_cell: 24,
            },
            layout: Layout {
                horizon_permille: (360, 460),
                road_half_width_permille: (280, 400),
                cars: (1, 4),
                people: (1, 3),
                poles: (1, 3),
                trees: (1, 4),
                background_trees: (1, 4),
                verge_permille: 500,
                hood_permille: 60,
                ignore_border: 0,
            },
        }
    }

    fn validate(&self) -> Result<()> {
        self.info.validate()?;
        let a = &self.appearance;
        let finite = a.class_colors.iter().flatten().chain(&a.class_jitter).chain(&a.tint).chain(&a.haze_color);
        let scalars = [a.gain, a.saturation, a.haze, a.noise_std, a.lowfreq_noise_std];
        if !finite.chain(&scalars).all(|v| v.is_finite() && *v >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "domain {:?}: appearance parameters must be finite and non-negative",
                self.info.name
            )));
        }
        if a.haze > 1.0 || a.lowfreq_cell < 2 {
            return Err(Error::InvalidArgument(format!(
                "domain {:?}: haze must be at most 1 and lowfreq_cell at least 2",
                self.info.name
            )));
        }
        let l = &self.layout;
        let ranges = [l.horizon_permille, l.road_half_width_permille, l.cars, l.people, l.poles, l.trees];
        if ranges.iter().chain([&l.background_trees]).any(|(lo, hi)| lo > hi)
            || !(100..=900).contains(&l.horizon_permille.0)
            || !(100..=900).contains(&l.horizon_permille.1)
            || l.road_half_width_permille.1 > 1000
            || l.verge_permille > 1000
            || l.hood_permille > 300
            || [l.cars.1, l.people.1, l.poles.1, l.trees.1, l.background_trees.1].iter().any(|&n| n > 64)
        {
            return Err(Error::InvalidArgument(format!(
                "domain {:?}: invalid layout (ranges must be ordered, the horizon within 100..=900 permille, \
                 the hood at most 300 permille, at most 64 objects of a kind)",
                self.info.name
            )));
        }
        Ok(())
    }
}

/// The whole dataset: image size, seed and domains.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticConfig {
    /// Image height in pixels (at least 16).
    pub height: usize,
    /// Image width in pixels (at least 16).
    pub width: usize,
    /// The seed every sample derives from.
    pub seed: u64,
    /// The domains; a domain's position is its dataset index.
    pub domains: Vec<DomainSpec>,
}

impl SyntheticConfig {
    /// "city" (dataset 0, 8 fine classes) and "dusk" (dataset 1, 5 coarse classes).
    pub fn default_two_domains(height: usize, width: usize, seed: u64) -> Self {
        SyntheticConfig { height, width, seed, domains: vec![DomainSpec::city(), DomainSpec::dusk()] }
    }

    /// "city", "dusk" and "fog" (dataset 2, 8 fine classes).
    pub fn default_three_domains(height: usize, width: usize, seed: u64) -> Self {
        SyntheticConfig {
            height,
            width,
            seed,
            domains: vec![DomainSpec::city(), DomainSpec::dusk(), DomainSpec::fog()],
        }
    }
}

/// One image and its labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// `[H, W, 3]` normalised RGB (see [`NORM_MEAN`], [`NORM_STD`]).
    pub image: Vec<f32>,
    /// `[H, W]` labels of the sample's domain: `0..num_classes` or 255.
    pub label: Vec<i32>,
    /// H.
    pub height: usize,
    /// W.
    pub width: usize,
}

/// Several samples, possibly of several domains, stacked.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[N, H, W, 3]` normalised RGB.
    pub images: Vec<f32>,
    /// `[N, H, W]` labels, each sample in its own domain's label space.
    pub labels: Vec<i32>,
    /// `[N]` dataset (domain) index of each sample.
    pub datasets: Vec<i32>,
    /// N.
    pub n: usize,
    /// H.
    pub h: usize,
    /// W.
    pub w: usize,
}

impl Batch {
    /// `[N, H, W, 3]`.
    pub fn image_shape(&self) -> [usize; 4] {
        [self.n, self.h, self.w, 3]
    }

    /// `[N, H, W]`.
    pub fn label_shape(&self) -> [usize; 3] {
        [self.n, self.h, self.w]
    }
}

/// Derives the noise key of a sample from its scene key.
const NOISE_STREAM: u64 = 0x4E4F_4953_4520_2020; // "NOISE   "

/// The synthetic dataset, validated and ready to draw samples.
#[derive(Debug, Clone)]
pub struct Synthetic {
    config: SyntheticConfig,
}

impl Synthetic {
    /// Validates the configuration.
    pub fn new(config: SyntheticConfig) -> Result<Self> {
        if config.height < 16 || config.width < 16 || config.height > 8192 || config.width > 8192 {
            return Err(Error::InvalidShape {
                what: "synthetic image",
                shape: vec![config.height, config.width],
                reason: "height and width must be within 16..=8192".into(),
            });
        }
        if config.domains.is_empty() {
            return Err(Error::InvalidArgument("the synthetic dataset needs at least one domain".into()));
        }
        if config.domains.len() > i32::MAX as usize {
            return Err(Error::InvalidArgument("too many domains".into()));
        }
        for d in &config.domains {
            d.validate()?;
        }
        Ok(Synthetic { config })
    }

    /// The configuration.
    pub fn config(&self) -> &SyntheticConfig {
        &self.config
    }

    /// Image height.
    pub fn height(&self) -> usize {
        self.config.height
    }

    /// Image width.
    pub fn width(&self) -> usize {
        self.config.width
    }

    /// Number of domains (datasets).
    pub fn num_domains(&self) -> usize {
        self.config.domains.len()
    }

    /// The label space of domain `domain`.
    ///
    /// # Panics
    /// When `domain >= num_domains()`, like slice indexing.
    pub fn info(&self, domain: usize) -> &DatasetInfo {
        &self.config.domains[domain].info
    }

    /// Number of classes of domain `domain`.
    ///
    /// # Panics
    /// When `domain >= num_domains()`, like slice indexing.
    pub fn num_classes(&self, domain: usize) -> usize {
        self.info(domain).num_classes()
    }

    /// Number of classes of every domain, in dataset order (the model's head widths).
    pub fn num_classes_per_domain(&self) -> Vec<usize> {
        self.config.domains.iter().map(|d| d.info.num_classes()).collect()
    }

    fn domain(&self, domain: usize) -> Result<&DomainSpec> {
        self.config.domains.get(domain).ok_or(Error::DatasetIndexOutOfRange {
            sample: 0,
            index: domain as i64,
            num_datasets: self.num_domains(),
        })
    }

    fn scene(&self, domain: usize, index: u64) -> Result<(scene::Scene, &DomainSpec)> {
        let spec = self.domain(domain)?;
        let key = rng::derive(self.config.seed, &[domain as u64, index]);
        let scene = scene::Scene::generate(self.config.height, self.config.width, &spec.layout, &spec.appearance, key);
        Ok((scene, spec))
    }

    /// The scene of sample `(domain, index)` in the fine label space: `[H, W]`, each a
    /// [`FineClass`] label or 255. The sample's own labels are its domain's
    /// `fine_to_domain` of these.
    pub fn fine_labels(&self, domain: usize, index: u64) -> Result<Vec<i32>> {
        let (scene, _) = self.scene(domain, index)?;
        Ok(scene.fine_labels())
    }

    /// Sample `index` of domain `domain`.
    pub fn sample(&self, domain: usize, index: u64) -> Result<Sample> {
        let (scene, spec) = self.scene(domain, index)?;
        let key = rng::derive(self.config.seed, &[domain as u64, index, NOISE_STREAM]);
        let image = render::render(&scene, &spec.appearance, key);
        let label = scene.fine_labels().into_iter().map(|f| spec.info.map_fine(f)).collect();
        Ok(Sample { image, label, height: self.config.height, width: self.config.width })
    }

    /// Samples `indices` of one domain, stacked.
    pub fn batch(&self, domain: usize, indices: &[u64]) -> Result<Batch> {
        let items: Vec<(usize, u64)> = indices.iter().map(|&i| (domain, i)).collect();
        self.mixed_batch(&items)
    }

    /// Samples `(domain, index)` of any domains, stacked in the given order.
    pub fn mixed_batch(&self, items: &[(usize, u64)]) -> Result<Batch> {
        let (h, w) = (self.config.height, self.config.width);
        for (i, &(domain, _)) in items.iter().enumerate() {
            if domain >= self.num_domains() {
                return Err(Error::DatasetIndexOutOfRange {
                    sample: i,
                    index: domain as i64,
                    num_datasets: self.num_domains(),
                });
            }
        }
        let mut batch = Batch {
            images: Vec::with_capacity(items.len() * h * w * 3),
            labels: Vec::with_capacity(items.len() * h * w),
            datasets: Vec::with_capacity(items.len()),
            n: items.len(),
            h,
            w,
        };
        for &(domain, index) in items {
            let s = self.sample(domain, index)?;
            batch.images.extend_from_slice(&s.image);
            batch.labels.extend_from_slice(&s.label);
            batch.datasets.push(domain as i32);
        }
        Ok(batch)
    }
}
