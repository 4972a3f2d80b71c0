//! PSPNet over the dilated ResNet: stem → layer1..4 → pyramid pooling (bins 1, 2, 3, 6 by
//! default, each pool → 1×1 DAB → bilinear upsample, concatenated with the input; one op,
//! [`Graph::ppm`]) → 3×3 DAB →
//! Dropout2d → one 1×1 classifier per dataset; an auxiliary head on layer3 (3×3 DAB →
//! Dropout2d → per-dataset classifier). Channel widths scale with `width` so that a tiny model
//! trains on a CPU.

use crate::autograd::{BnId, Datasets, Graph, ParamStore, Var, WeightId};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::conv::ConvGeometry;
use crate::ops::dropout::Dropout2dOptions;
use crate::ops::dsbn::DsbnOptions;
use crate::ops::maxpool::PoolGeometry;
use crate::ops::ppm::PpmOptions;
use crate::rng::splitmix64;

use super::resnet::{Block, Depth};
use super::{Classifier, Dab, DabSpec};

/// The model's hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Backbone depth.
    pub depth: Depth,
    /// Channel multiplier (1.0 = the paper's widths: 64..512 planes, 512-wide head).
    pub width: f32,
    /// Three 3×3 convolutions instead of the 7×7 stem (PSPNet's "deep base").
    pub deep_stem: bool,
    /// Classes of each dataset's head; its length is the number of heads.
    pub num_classes: Vec<usize>,
    /// Dataset slices of every DSBN layer (the number of datasets; 1 = shared BN).
    pub num_bn: usize,
    /// Pyramid pooling bins.
    pub bins: Vec<usize>,
    /// Dropout2d probability before each classifier.
    pub dropout: f32,
    /// Build the auxiliary head on layer3.
    pub aux: bool,
    /// `align_corners` of every bilinear resize (PSPNet's code uses true).
    pub align_corners: bool,
    /// Seed of the initialisation.
    pub seed: u64,
    /// Convolution weight sets (1 = convolutions shared by every dataset; the number of heads
    /// = one set of convolutions per dataset, all sharing the BN layers: the paper's "unshared
    /// conv + shared BN" of Table 3). The classifier of head d runs on set d's trunk.
    pub conv_sets: usize,
}

impl ModelConfig {
    /// PSPNet-ResNet-18 at full width for the given heads, DSBN across them.
    pub fn resnet18(num_classes: Vec<usize>) -> Self {
        let d = num_classes.len();
        ModelConfig {
            depth: Depth::R18,
            width: 1.0,
            deep_stem: false,
            num_classes,
            num_bn: d,
            bins: vec![1, 2, 3, 6],
            dropout: 0.1,
            aux: true,
            align_corners: true,
            seed: 0,
            conv_sets: 1,
        }
    }

    fn ch(&self, c: usize) -> usize {
        ((c as f32 * self.width).round() as usize).max(1)
    }
}

/// What a forward produced: the logits of the requested head at feature resolution (1/8 of
/// the input), and the auxiliary logits when the model has that head and is training.
#[derive(Debug, Clone, Copy)]
pub struct Outputs {
    /// Main logits `[N, H/8, W/8, C_d]`.
    pub main: Var,
    /// Auxiliary logits `[N, H/8, W/8, C_d]`.
    pub aux: Option<Var>,
}

/// The model: ids of its parameters in a [`ParamStore`].
#[derive(Debug, Clone)]
pub struct PspNet {
    /// Its configuration.
    pub config: ModelConfig,
    stem: Vec<Dab>,
    layers: [Vec<Block>; 4],
    ppm: Vec<Dab>,
    bottleneck: Dab,
    cls: Vec<Classifier>,
    aux_dab: Option<Dab>,
    aux_cls: Vec<Classifier>,
}

impl PspNet {
    /// Registers every parameter in `store` (names as a PyTorch port would have them).
    pub fn new<B: Backend>(config: ModelConfig, store: &mut ParamStore<B>) -> Result<Self> {
        if config.num_classes.is_empty() || config.num_classes.iter().any(|&c| c == 0 || c > 254) {
            return Err(Error::InvalidArgument(format!(
                "every head needs 1..=254 classes, got {:?}",
                config.num_classes
            )));
        }
        if config.num_bn == 0 || config.bins.is_empty() || config.bins.contains(&0) {
            return Err(Error::InvalidArgument("num_bn and every pyramid bin must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&config.dropout) || config.width.is_nan() || config.width <= 0.0 {
            return Err(Error::InvalidArgument("dropout must be in [0, 1) and width positive".into()));
        }
        if config.conv_sets != 1 && config.conv_sets != config.num_classes.len() {
            return Err(Error::InvalidArgument(format!(
                "conv_sets must be 1 (shared convolutions) or the number of heads ({}), got {}",
                config.num_classes.len(),
                config.conv_sets
            )));
        }
        let seed = config.seed;
        let nb = config.num_bn;
        let sets = config.conv_sets;
        use DabSpec as S;
        let backbone = S::backbone;
        let mut stem = Vec::new();
        let stem_out = if config.deep_stem {
            let (a, b) = (config.ch(64), config.ch(128));
            let g = |s| ConvGeometry::square(s, 1, 1);
            stem.push(Dab::with_conv_sets(store, backbone("conv1", "bn1", 3, a, 3, g(2)), nb, sets, seed)?);
            stem.push(Dab::with_conv_sets(store, backbone("conv2", "bn2", a, a, 3, g(1)), nb, sets, seed)?);
            stem.push(Dab::with_conv_sets(store, backbone("conv3", "bn3", a, b, 3, g(1)), nb, sets, seed)?);
            b
        } else {
            let a = config.ch(64);
            let spec = backbone("conv1", "bn1", 3, a, 7, ConvGeometry::square(2, 3, 1));
            stem.push(Dab::with_conv_sets(store, spec, nb, sets, seed)?);
            a
        };
        let (counts, kind) = config.depth.layout();
        let mut inplanes = stem_out;
        let mut layers: [Vec<Block>; 4] = Default::default();
        let mut layer3_out = 0;
        for (li, layer) in layers.iter_mut().enumerate() {
            let planes = config.ch(64 << li);
            let (stride, dilation) = [(1, 1), (2, 1), (1, 2), (1, 4)][li];
            for bi in 0..counts[li] {
                let s = if bi == 0 { stride } else { 1 };
                let prefix = format!("layer{}.{bi}", li + 1);
                layer.push(Block::new(store, kind, &prefix, inplanes, planes, s, dilation, nb, sets, seed)?);
                inplanes = planes * kind.expansion();
            }
            if li == 2 {
                layer3_out = inplanes;
            }
        }
        let feat = inplanes;

        let red = (feat / config.bins.len()).max(1);
        let mut ppm = Vec::new();
        for i in 0..config.bins.len() {
            let (c, b) = (format!("ppm.features.{i}.1"), format!("ppm.features.{i}.2"));
            ppm.push(Dab::with_conv_sets(
                store,
                S::head(&c, &b, feat, red, 1, ConvGeometry::default()),
                nb,
                sets,
                seed,
            )?);
        }
        let cat = feat + red * config.bins.len();
        let mid = config.ch(512);
        let bottleneck = Dab::with_conv_sets(
            store,
            S::head("cls.0", "cls.1", cat, mid, 3, ConvGeometry::square(1, 1, 1)),
            nb,
            sets,
            seed,
        )?;
        let mut cls = Vec::new();
        for (d, &c) in config.num_classes.iter().enumerate() {
            cls.push(Classifier::new(store, &format!("cls.4.{d}"), mid, c, d, seed)?);
        }
        let (mut aux_dab, mut aux_cls) = (None, Vec::new());
        if config.aux {
            let amid = config.ch(256);
            aux_dab = Some(Dab::with_conv_sets(
                store,
                S::head("aux.0", "aux.1", layer3_out, amid, 3, ConvGeometry::square(1, 1, 1)),
                nb,
                sets,
                seed,
            )?);
            for (d, &c) in config.num_classes.iter().enumerate() {
                aux_cls.push(Classifier::new(store, &format!("aux.4.{d}"), amid, c, d, seed)?);
            }
        }
        Ok(PspNet { config, stem, layers, ppm, bottleneck, cls, aux_dab, aux_cls })
    }

    /// Number of classifier heads.
    pub fn num_heads(&self) -> usize {
        self.cls.len()
    }

    /// The model with conv set `set`'s convolutions in every block (the model itself when its
    /// convolutions are shared).
    pub fn in_conv_set(&self, set: usize) -> PspNet {
        if self.config.conv_sets <= 1 {
            return self.clone();
        }
        PspNet {
            config: self.config.clone(),
            stem: self.stem.iter().map(|d| d.in_set(set)).collect(),
            layers: self.layers.clone().map(|l| l.iter().map(|b| b.in_set(set)).collect()),
            ppm: self.ppm.iter().map(|d| d.in_set(set)).collect(),
            bottleneck: self.bottleneck.in_set(set),
            cls: self.cls.clone(),
            aux_dab: self.aux_dab.as_ref().map(|d| d.in_set(set)),
            aux_cls: self.aux_cls.clone(),
        }
    }

    /// The conv set that feeds head `head` (its own with unshared convolutions, else 0).
    pub fn conv_set_of_head(&self, head: usize) -> usize {
        if self.config.conv_sets > 1 {
            head
        } else {
            0
        }
    }

    /// [`PspNet::features`] through conv set `set`'s convolutions.
    pub fn features_in_set<B: Backend>(
        &self,
        g: &mut Graph<B>,
        store: &mut ParamStore<B>,
        images: Var,
        datasets: Datasets,
        dropout_seed: u64,
        set: usize,
    ) -> Result<(Var, Option<Var>)> {
        if self.config.conv_sets <= 1 {
            return self.features(g, store, images, datasets, dropout_seed);
        }
        self.in_conv_set(set).features(g, store, images, datasets, dropout_seed)
    }

    /// The shared trunk: features after the head's 3×3 DAB and dropout, and (training, with an
    /// auxiliary head) the auxiliary features. `dropout_seed` decides the Dropout2d masks.
    /// With unshared convolutions: conv set 0's ([`PspNet::features_in_set`] picks another).
    pub fn features<B: Backend>(
        &self,
        g: &mut Graph<B>,
        store: &mut ParamStore<B>,
        images: Var,
        datasets: Datasets,
        dropout_seed: u64,
    ) -> Result<(Var, Option<Var>)> {
        let mut x = images;
        let last = self.stem.len() - 1;
        for (i, dab) in self.stem.iter().enumerate() {
            // The deep stem's first convolutions feed the next one (prologue); the last feeds
            // the max pooling, which needs the written activation.
            x = if i == last {
                dab.forward(g, store, x, datasets, None, true)?
            } else {
                dab.forward_deferred(g, store, x, datasets, true)?
            };
        }
        x = g.max_pool2d(x, PoolGeometry::square(3, 2, 1))?;
        let mut layer3 = x;
        for (li, layer) in self.layers.iter().enumerate() {
            for block in layer {
                x = block.forward(g, store, x, datasets)?;
            }
            if li == 2 {
                layer3 = x;
            }
        }
        let branches: Vec<(WeightId, BnId)> = self.ppm.iter().map(|d| (d.weight, d.bn)).collect();
        let ppm = PpmOptions {
            bins: self.config.bins.clone(),
            align_corners: self.config.align_corners,
            dsbn: DsbnOptions { relu: true, ..DsbnOptions::default() },
        };
        let cat = g.ppm(store, x, datasets, &branches, &ppm)?;
        let f = self.bottleneck.forward(g, store, cat, datasets, None, true)?;
        let drop = |i: u64| Dropout2dOptions { p: self.config.dropout, seed: splitmix64(dropout_seed, i) };
        let f = g.dropout2d(f, drop(0))?;
        let aux = match (&self.aux_dab, g.is_training()) {
            (Some(dab), true) => {
                let a = dab.forward(g, store, layer3, datasets, None, true)?;
                Some(g.dropout2d(a, drop(1))?)
            }
            _ => None,
        };
        Ok((f, aux))
    }

    /// Head `head`'s logits for trunk features (and auxiliary features).
    pub fn classify<B: Backend>(
        &self,
        g: &mut Graph<B>,
        store: &ParamStore<B>,
        features: (Var, Option<Var>),
        head: usize,
    ) -> Result<Outputs> {
        let cls = self.cls.get(head).ok_or_else(|| {
            Error::InvalidArgument(format!("head {head} does not exist: the model has {}", self.cls.len()))
        })?;
        let main = cls.forward(g, store, features.0)?;
        let aux = match (features.1, self.aux_cls.get(head)) {
            (Some(a), Some(c)) => Some(c.forward(g, store, a)?),
            _ => None,
        };
        Ok(Outputs { main, aux })
    }

    /// Trunk + head `head` for a batch: `images` `[N, H, W, 3]`, `datasets` the DSBN slice of
    /// each sample. With unshared convolutions the trunk is head `head`'s conv set.
    pub fn forward<B: Backend>(
        &self,
        g: &mut Graph<B>,
        store: &mut ParamStore<B>,
        images: Var,
        datasets: Datasets,
        head: usize,
        dropout_seed: u64,
    ) -> Result<Outputs> {
        let set = self.conv_set_of_head(head);
        let f = self.features_in_set(g, store, images, datasets, dropout_seed, set)?;
        self.classify(g, store, f, head)
    }
}
