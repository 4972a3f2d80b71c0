//! ImageNet-pretrained backbones from a safetensors file in torchvision's ResNet `state_dict`
//! names (`conv1.weight`, `bn1.running_mean`, `layer1.0.conv1.weight`,
//! `layer2.0.downsample.1.weight`, …) — and, for the deep stem, the PSPNet reference's names
//! (`conv1`/`bn1`, `conv2`/`bn2`, `conv3`/`bn3`), which are ours too.
//!
//! Every backbone convolution is copied (PyTorch's `[K, C, R, S]` transposed to our KRSC), and
//! every BatchNorm (γ, β, running mean and variance, `num_batches_tracked` when present) into
//! *each* dataset slice of the DSBN layer of the same name. The classifier (`fc.*`) is
//! ignored. The file must match the backbone exactly otherwise: a missing, unexpected or
//! mis-shaped tensor is an [`Error::Checkpoint`] naming it, and nothing is changed.
//!
//! A checkpoint cannot reveal one thing: our dilated BasicBlock (ResNet-18/34) dilates *both*
//! 3×3 convolutions of a block in layers 3 and 4 (mmsegmentation dilates only the first), so a
//! PyTorch model built the other way loads without error but computes something else.

use std::path::Path;

use crate::autograd::{Group, ParamStore};
use crate::backend::{Backend, BnTables, TensorLike};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// What [`load_pretrained`] copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PretrainedReport {
    /// The file.
    pub path: String,
    /// Convolution weights copied.
    pub convolutions: usize,
    /// BatchNorm layers copied.
    pub batch_norms: usize,
    /// Dataset slices each BatchNorm was copied into.
    pub slices: usize,
    /// Tensors of the file that were read.
    pub tensors_read: usize,
    /// Tensors of the file that were ignored (the classifier).
    pub ignored: Vec<String>,
}

impl std::fmt::Display for PretrainedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pretrained backbone {}: {} tensors read — {} convolutions, {} BatchNorms each copied into {} dataset slice(s)",
            self.path, self.tensors_read, self.convolutions, self.batch_norms, self.slices
        )?;
        if !self.ignored.is_empty() {
            write!(f, "; ignored {}", self.ignored.join(", "))?;
        }
        Ok(())
    }
}

fn err(path: &str, message: String) -> Error {
    Error::Checkpoint { path: path.to_string(), message }
}

/// Loads the backbone of `store` (every parameter of the backbone group) from `path`.
pub fn load_pretrained<B: Backend>(store: &mut ParamStore<B>, path: &Path) -> Result<PretrainedReport> {
    let ck = Checkpoint::load(path)?;
    load_pretrained_from(store, &ck, &path.display().to_string())
}

/// [`load_pretrained`] from a checkpoint already read; `path` names it in messages.
pub fn load_pretrained_from<B: Backend>(
    store: &mut ParamStore<B>,
    ck: &Checkpoint,
    path: &str,
) -> Result<PretrainedReport> {
    let mut used: Vec<&str> = Vec::new();
    let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let t = ck.get(name).ok_or_else(|| err(path, format!("missing tensor {name:?} (this backbone needs it)")))?;
        if t.shape != shape {
            return Err(err(
                path,
                format!(
                    "tensor {name:?} has shape {:?}, this backbone needs {shape:?} (same depth, stem and width 1?)",
                    t.shape
                ),
            ));
        }
        t.as_f32().map(<[f32]>::to_vec).ok_or_else(|| err(path, format!("tensor {name:?} is not F32")))
    };
    // Read and check everything before writing anything.
    let mut weights = Vec::new();
    for (i, w) in store.weights().iter().enumerate().filter(|(_, w)| w.group == Group::Backbone) {
        let shape = w.value.shape().to_vec();
        let [k, r, s, c] = shape[..] else {
            return Err(err(path, format!("backbone parameter {} is not a convolution", w.name)));
        };
        let kcrs = tensor(&w.name, &[k, c, r, s])?;
        used.push(&w.name);
        let mut krsc = vec![0.0; kcrs.len()];
        for ki in 0..k {
            for ci in 0..c {
                for ri in 0..r {
                    for si in 0..s {
                        krsc[((ki * r + ri) * s + si) * c + ci] = kcrs[((ki * c + ci) * r + ri) * s + si];
                    }
                }
            }
        }
        weights.push((i, krsc));
    }
    let mut bns = Vec::new();
    for (i, l) in store.bn_layers().iter().enumerate().filter(|(_, l)| l.group == Group::Backbone) {
        let mut tables = Vec::new();
        for field in ["weight", "bias", "running_mean", "running_var"] {
            let name = format!("{}.{field}", l.name);
            let one = tensor(&name, &[l.channels])?;
            tables.push(one.repeat(l.num_datasets));
        }
        let tracked_name = format!("{}.num_batches_tracked", l.name);
        let tracked = match ck.get(&tracked_name) {
            None => None,
            Some(t) => match (t.as_i64(), t.shape.is_empty()) {
                (Some([n]), true) => Some(*n),
                _ => return Err(err(path, format!("tensor {tracked_name:?} is not one I64"))),
            },
        };
        bns.push((i, tables, tracked));
    }
    let mut ignored = Vec::new();
    let mut read = 0;
    for t in &ck.tensors {
        let n = t.name.as_str();
        let of_bn = store.bn_layers().iter().any(|l| {
            l.group == Group::Backbone
                && n.strip_prefix(l.name.as_str()).and_then(|r| r.strip_prefix('.')).is_some_and(|f| {
                    ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"].contains(&f)
                })
        });
        if used.contains(&n) || of_bn {
            read += 1;
        } else if n.starts_with("fc.") {
            ignored.push(t.name.clone());
        } else {
            return Err(err(path, format!("unexpected tensor {n:?}: this backbone has no such parameter")));
        }
    }
    let be = store.backend().clone();
    let (convolutions, batch_norms) = (weights.len(), bns.len());
    let slices = store.bn_layers().first().map_or(0, |l| l.num_datasets);
    for (i, v) in weights {
        be.write_f32(&mut store.weights_mut()[i].value, &v)?;
    }
    for (i, tables, tracked) in bns {
        let layer = &mut store.bn_layers_mut()[i];
        for (t, v) in layer.tables.tables_mut().into_iter().zip(&tables) {
            be.write_f32(t, v)?;
        }
        if let Some(n) = tracked {
            layer.batches_tracked.iter_mut().for_each(|b| *b = n);
        }
    }
    Ok(PretrainedReport { path: path.to_string(), convolutions, batch_norms, slices, tensors_read: read, ignored })
}
