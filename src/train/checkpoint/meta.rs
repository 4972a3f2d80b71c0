//! What a checkpoint says about its network, so that the file alone rebuilds it: the model
//! configuration, the datasets (name and class names, in dataset-index order) and the
//! precision, as JSON in the safetensors metadata under [`MODEL_KEY`].
//!
//! Floats are stored as the f64 of the f32 (exactly representable, and JSON numbers round-trip
//! f64), so a width or dropout comes back bit for bit.

use serde_json::{json, Value};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::nn::{Depth, ModelConfig};

/// The metadata key of the model description.
pub const MODEL_KEY: &str = "cdcl.model";

/// One dataset the model was trained on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetMeta {
    /// Its name (`cityscapes`, `city`, ...).
    pub name: String,
    /// Its classes, in label order.
    pub class_names: Vec<String>,
}

impl DatasetMeta {
    /// A dataset with placeholder names (`dataset{d}`, classes `0`, `1`, ...).
    pub fn unnamed(d: usize, num_classes: usize) -> Self {
        DatasetMeta { name: format!("dataset{d}"), class_names: (0..num_classes).map(|c| c.to_string()).collect() }
    }
}

/// The network a checkpoint holds.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelMeta {
    /// The model's configuration.
    pub model: ModelConfig,
    /// The datasets of the run, in dataset-index order (one per head, except when a single
    /// head serves several datasets, as in label remapping).
    pub datasets: Vec<DatasetMeta>,
    /// Storage precision of the training run (`f32`, `bf16` or `f16`); the tensors are f32
    /// whatever it is (the master weights).
    pub precision: String,
}

fn depth_number(d: Depth) -> u32 {
    match d {
        Depth::R18 => 18,
        Depth::R34 => 34,
        Depth::R50 => 50,
        Depth::R101 => 101,
    }
}

fn bad(message: impl Into<String>) -> Error {
    Error::Checkpoint { path: "(in memory)".into(), message: message.into() }
}

fn field<'a>(v: &'a Value, key: &str) -> Result<&'a Value> {
    v.get(key).ok_or_else(|| bad(format!("model metadata has no {key:?}")))
}

fn usize_of(v: &Value, key: &str) -> Result<usize> {
    field(v, key)?.as_u64().map(|n| n as usize).ok_or_else(|| bad(format!("model metadata {key:?} is not a count")))
}

fn f32_of(v: &Value, key: &str) -> Result<f32> {
    field(v, key)?.as_f64().map(|x| x as f32).ok_or_else(|| bad(format!("model metadata {key:?} is not a number")))
}

fn bool_of(v: &Value, key: &str) -> Result<bool> {
    field(v, key)?.as_bool().ok_or_else(|| bad(format!("model metadata {key:?} is not true or false")))
}

fn list_of(v: &Value, key: &str) -> Result<Vec<usize>> {
    let arr = field(v, key)?.as_array().ok_or_else(|| bad(format!("model metadata {key:?} is not a list")))?;
    arr.iter()
        .map(|x| x.as_u64().map(|n| n as usize).ok_or_else(|| bad(format!("{key:?} holds a non-count"))))
        .collect()
}

impl ModelMeta {
    /// The description of `model` trained on `datasets`; datasets missing from the list get
    /// placeholder names.
    pub fn new(model: &ModelConfig, datasets: &[DatasetMeta]) -> Self {
        let mut datasets = datasets.to_vec();
        for (d, &c) in model.num_classes.iter().enumerate().skip(datasets.len()) {
            datasets.push(DatasetMeta::unnamed(d, c));
        }
        ModelMeta { model: model.clone(), datasets, precision: "f32".into() }
    }

    /// The JSON text stored in the checkpoint.
    pub fn to_json(&self) -> String {
        let m = &self.model;
        let datasets: Vec<Value> =
            self.datasets.iter().map(|d| json!({ "name": d.name, "classes": d.class_names })).collect();
        json!({
            "architecture": "pspnet-dab",
            "depth": depth_number(m.depth),
            "width": m.width as f64,
            "deep_stem": m.deep_stem,
            "num_classes": m.num_classes,
            "num_bn": m.num_bn,
            "bins": m.bins,
            "dropout": m.dropout as f64,
            "aux": m.aux,
            "align_corners": m.align_corners,
            "seed": m.seed,
            "conv_sets": m.conv_sets,
            "precision": self.precision,
            "datasets": datasets,
        })
        .to_string()
    }

    /// Parses [`ModelMeta::to_json`]'s text.
    pub fn from_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("model metadata is not JSON: {e}")))?;
        let depth = Depth::parse(&usize_of(&v, "depth")?.to_string())?;
        let seed = field(&v, "seed")?.as_u64().ok_or_else(|| bad("model metadata \"seed\" is not a number"))?;
        let model = ModelConfig {
            depth,
            width: f32_of(&v, "width")?,
            deep_stem: bool_of(&v, "deep_stem")?,
            num_classes: list_of(&v, "num_classes")?,
            num_bn: usize_of(&v, "num_bn")?,
            bins: list_of(&v, "bins")?,
            dropout: f32_of(&v, "dropout")?,
            aux: bool_of(&v, "aux")?,
            align_corners: bool_of(&v, "align_corners")?,
            seed,
            // Checkpoints from before unshared convolutions existed have shared ones.
            conv_sets: if v.get("conv_sets").is_some() { usize_of(&v, "conv_sets")? } else { 1 },
        };
        let precision = field(&v, "precision")?.as_str().unwrap_or("f32").to_string();
        let mut datasets = Vec::new();
        for d in field(&v, "datasets")?.as_array().ok_or_else(|| bad("model metadata \"datasets\" is not a list"))? {
            let name = d.get("name").and_then(Value::as_str).ok_or_else(|| bad("a dataset without a name"))?;
            let classes = d.get("classes").and_then(Value::as_array).ok_or_else(|| bad("a dataset without classes"))?;
            let class_names = classes.iter().map(|c| c.as_str().unwrap_or("?").to_string()).collect();
            datasets.push(DatasetMeta { name: name.to_string(), class_names });
        }
        let meta = ModelMeta { model, datasets, precision };
        meta.validate()?;
        Ok(meta)
    }

    fn validate(&self) -> Result<()> {
        let heads = self.model.num_classes.len();
        if self.datasets.len() < heads {
            return Err(bad(format!("{} heads but {} datasets described", heads, self.datasets.len())));
        }
        for (d, &c) in self.model.num_classes.iter().enumerate() {
            if self.datasets[d].class_names.len() != c {
                return Err(bad(format!(
                    "head {d} has {c} classes but dataset {} lists {}",
                    self.datasets[d].name,
                    self.datasets[d].class_names.len()
                )));
            }
        }
        Ok(())
    }

    /// The description a checkpoint carries; an error when it has none (a file written by an
    /// older version, or not by cdcl).
    pub fn of(ck: &Checkpoint) -> Result<Self> {
        let text = ck.metadata.get(MODEL_KEY).ok_or_else(|| {
            bad(format!("no {MODEL_KEY:?} metadata: not a cdcl training checkpoint (or one from before it was stored)"))
        })?;
        Self::from_json(text)
    }

    /// Dataset `name`'s index, if the model was trained on it.
    pub fn dataset_index(&self, name: &str) -> Option<usize> {
        self.datasets.iter().position(|d| d.name == name)
    }

    /// The head that classifies dataset `d`.
    pub fn head_of(&self, d: usize) -> usize {
        if self.model.num_classes.len() == 1 {
            0
        } else {
            d
        }
    }

    /// The DSBN slice of dataset `d`.
    pub fn bn_of(&self, d: usize) -> usize {
        if self.model.num_bn == 1 {
            0
        } else {
            d
        }
    }

    /// The first difference between the network of this checkpoint (`self`) and `run`'s, or
    /// `None` when a run of `run` can load it: the backbone and head settings, then the
    /// datasets (names and classes), then the heads and BN slices, then the precision. The
    /// initialisation seed does not count.
    pub fn first_mismatch(&self, run: &ModelMeta) -> Option<String> {
        if let Some(m) = shape_mismatch(&self.model, &run.model) {
            return Some(m);
        }
        if self.datasets.len() != run.datasets.len() {
            let names = |m: &ModelMeta| format!("{:?}", m.datasets.iter().map(|d| &d.name).collect::<Vec<_>>());
            return diff("datasets", names(self), names(run));
        }
        for (d, (x, y)) in self.datasets.iter().zip(&run.datasets).enumerate() {
            if x.name != y.name {
                return diff(&format!("dataset {d}"), format!("{:?}", x.name), format!("{:?}", y.name));
            }
            if x.class_names.len() != y.class_names.len() {
                let what = format!("classes of dataset {d} ({})", x.name);
                return diff(&what, x.class_names.len().to_string(), y.class_names.len().to_string());
            }
            if let Some(c) = (0..x.class_names.len()).find(|&c| x.class_names[c] != y.class_names[c]) {
                let what = format!("class {c} of dataset {d} ({})", x.name);
                return diff(&what, format!("{:?}", x.class_names[c]), format!("{:?}", y.class_names[c]));
            }
        }
        if let Some(m) = heads_mismatch(&self.model, &run.model) {
            return Some(m);
        }
        if self.precision != run.precision {
            return diff("precision", self.precision.clone(), run.precision.clone());
        }
        None
    }
}

fn diff(what: &str, checkpoint: String, run: String) -> Option<String> {
    Some(format!("{what}: the checkpoint has {checkpoint}, this run {run}"))
}

/// Backbone and head settings other than the heads themselves.
fn shape_mismatch(a: &ModelConfig, b: &ModelConfig) -> Option<String> {
    if a.depth != b.depth {
        return diff("ResNet depth", depth_number(a.depth).to_string(), depth_number(b.depth).to_string());
    }
    if a.width.to_bits() != b.width.to_bits() {
        return diff("width", a.width.to_string(), b.width.to_string());
    }
    if a.deep_stem != b.deep_stem {
        return diff("deep stem", a.deep_stem.to_string(), b.deep_stem.to_string());
    }
    if a.bins != b.bins {
        return diff("pyramid bins", format!("{:?}", a.bins), format!("{:?}", b.bins));
    }
    if a.aux != b.aux {
        return diff("auxiliary head", a.aux.to_string(), b.aux.to_string());
    }
    if a.align_corners != b.align_corners {
        return diff("align_corners", a.align_corners.to_string(), b.align_corners.to_string());
    }
    if a.dropout.to_bits() != b.dropout.to_bits() {
        return diff("dropout", a.dropout.to_string(), b.dropout.to_string());
    }
    None
}

fn heads_mismatch(a: &ModelConfig, b: &ModelConfig) -> Option<String> {
    if a.num_bn != b.num_bn {
        return diff("BN slices", a.num_bn.to_string(), b.num_bn.to_string());
    }
    if a.num_classes != b.num_classes {
        return diff("classes per head", format!("{:?}", a.num_classes), format!("{:?}", b.num_classes));
    }
    if a.conv_sets != b.conv_sets {
        return diff("convolution sets", a.conv_sets.to_string(), b.conv_sets.to_string());
    }
    None
}

/// The first difference between two model configurations that changes the network (its
/// tensors or what it computes), or `None`; the initialisation seed does not count.
pub fn first_model_mismatch(a: &ModelConfig, b: &ModelConfig) -> Option<String> {
    shape_mismatch(a, b).or_else(|| heads_mismatch(a, b))
}
