//! Checkpoints of a [`Trainer`]: the model as a PyTorch `state_dict` (convolution weights
//! transposed from our KRSC to PyTorch's `[K, C, R, S]`; DSBN layer `name` saved as one
//! `BatchNorm2d` per dataset, `name.bn.{d}.weight/bias/running_mean/running_var/
//! num_batches_tracked`), plus the optimiser state (`optimizer.{param}.momentum_buffer`) and
//! the iteration in the metadata, so that a resumed run takes bit-for-bit the same next step.
//! `torch.load_state_dict(strict=False)` ignores the `optimizer.` entries.
//!
//! The metadata also describes the network ([`ModelMeta`]: configuration, datasets, precision),
//! so a checkpoint rebuilds its model from the file alone, and loading it into another network
//! is an error naming the first difference instead of a partial load.

mod meta;

pub use meta::{first_model_mismatch, DatasetMeta, ModelMeta, MODEL_KEY};

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::backend::{Backend, BnTables, TensorLike};
use crate::checkpoint::{Checkpoint, NamedTensor};
use crate::error::{Error, Result};

use super::precision::LossScaler;
use super::Trainer;

const OPT: &str = "optimizer.";

/// KRSC → KCRS (`to_pytorch`) or back.
fn permute(data: &[f32], shape: &[usize], to_pytorch: bool) -> Vec<f32> {
    let [k, r, s, c] = [shape[0], shape[1], shape[2], shape[3]];
    let mut out = vec![0.0; data.len()];
    for ki in 0..k {
        for ri in 0..r {
            for si in 0..s {
                for ci in 0..c {
                    let krsc = ((ki * r + ri) * s + si) * c + ci;
                    let kcrs = ((ki * c + ci) * r + ri) * s + si;
                    if to_pytorch {
                        out[kcrs] = data[krsc];
                    } else {
                        out[krsc] = data[kcrs];
                    }
                }
            }
        }
    }
    out
}

fn torch_shape(shape: &[usize]) -> Vec<usize> {
    match *shape {
        [k, r, s, c] => vec![k, c, r, s],
        _ => shape.to_vec(),
    }
}

fn to_torch(data: Vec<f32>, shape: &[usize]) -> Vec<f32> {
    if shape.len() == 4 {
        permute(&data, shape, true)
    } else {
        data
    }
}

impl<B: Backend> Trainer<B> {
    /// Everything a resumed run needs, as named host tensors, with datasets named
    /// `dataset{d}` in the model description (see [`Trainer::checkpoint_with`]).
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        self.checkpoint_with(&[])
    }

    /// [`Trainer::checkpoint`] describing the model's datasets with `datasets` (name and class
    /// names, in dataset-index order).
    pub fn checkpoint_with(&self, datasets: &[DatasetMeta]) -> Result<Checkpoint> {
        let be = self.backend();
        let mut tensors = Vec::new();
        for w in self.store.weights() {
            let shape = w.value.shape().to_vec();
            tensors.push(NamedTensor::f32(w.name.clone(), torch_shape(&shape), to_torch(be.to_f32(&w.value)?, &shape)));
            if let Some(m) = &w.momentum {
                let name = format!("{OPT}{}.momentum_buffer", w.name);
                tensors.push(NamedTensor::f32(name, torch_shape(&shape), to_torch(be.to_f32(m)?, &shape)));
            }
        }
        for l in self.store.bn_layers() {
            let c = l.channels;
            let tables = l.tables.tables();
            let host: Vec<Vec<f32>> = tables.iter().map(|t| be.to_f32(t)).collect::<Result<_>>()?;
            for d in 0..l.num_datasets {
                for (field, data) in ["weight", "bias", "running_mean", "running_var"].iter().zip(&host) {
                    tensors.push(NamedTensor::f32(
                        format!("{}.bn.{d}.{field}", l.name),
                        vec![c],
                        data[d * c..(d + 1) * c].to_vec(),
                    ));
                }
                let name = format!("{}.bn.{d}.num_batches_tracked", l.name);
                tensors.push(NamedTensor::i64(name, vec![], vec![l.batches_tracked[d]]));
                for (field, m) in [("weight", &l.momentum_gamma), ("bias", &l.momentum_beta)] {
                    if let Some(m) = m {
                        let all = be.to_f32(m)?;
                        let name = format!("{OPT}{}.bn.{d}.{field}.momentum_buffer", l.name);
                        tensors.push(NamedTensor::f32(name, vec![c], all[d * c..(d + 1) * c].to_vec()));
                    }
                }
            }
        }
        let mut metadata = BTreeMap::new();
        metadata.insert("format".into(), "cdcl-pspnet-dab/2".into());
        metadata.insert("iteration".into(), self.iteration().to_string());
        let meta = ModelMeta {
            precision: self.config.precision.name().into(),
            ..ModelMeta::new(&self.model.config, datasets)
        };
        metadata.insert(MODEL_KEY.into(), meta.to_json());
        // f16's dynamic loss scale, so that a resumed run goes on at the scale it had reached.
        if self.config.precision.scales_loss() {
            metadata.insert("loss_scale".into(), format!("{:?}", self.scaler.scale()));
            metadata.insert("loss_scale_good_steps".into(), self.scaler.good_steps().to_string());
        }
        metadata.insert("train".into(), format!("{:?}", self.config));
        Ok(Checkpoint { tensors, metadata })
    }

    /// Writes [`Trainer::checkpoint`] as safetensors (atomically).
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        self.checkpoint()?.save(path)
    }

    /// Writes [`Trainer::checkpoint_with`] as safetensors (atomically).
    pub fn save_checkpoint_with(&self, path: &Path, datasets: &[DatasetMeta]) -> Result<()> {
        self.checkpoint_with(datasets)?.save(path)
    }

    /// Reads a checkpoint written by [`Trainer::save_checkpoint`] for the same model.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let ck = Checkpoint::load(path)?;
        self.restore(&ck).map_err(|e| match e {
            Error::Checkpoint { message, .. } => Error::Checkpoint { path: path.display().to_string(), message },
            e => e,
        })
    }

    /// Loads parameters, running statistics, momentum buffers and the iteration. The
    /// checkpoint's model description (when it has one) must be this model's, and its tensors
    /// exactly this model's: a missing, mis-shaped or unexpected tensor is an error naming it,
    /// and nothing is changed.
    pub fn restore(&mut self, ck: &Checkpoint) -> Result<()> {
        if ck.metadata.contains_key(MODEL_KEY) {
            let meta = ModelMeta::of(ck)?;
            if let Some(m) = first_model_mismatch(&meta.model, &self.model.config) {
                return Err(Error::Checkpoint { path: "(in memory)".into(), message: format!("another network: {m}") });
            }
        }
        // Every name this model reads, to find the checkpoint's tensors it does not.
        let used = RefCell::new(BTreeSet::new());
        let mark = |name: &str| {
            used.borrow_mut().insert(name.to_string());
        };
        // Momentum buffers are optional (a parameter that never had a gradient has none).
        let optional = |name: &str, shape: &[usize]| {
            mark(name);
            ck.get(name).map(|_| ck.f32(name, shape)).transpose()
        };
        let need = |name: &str, shape: &[usize]| {
            mark(name);
            ck.f32(name, shape)
        };
        let iteration: usize =
            ck.metadata.get("iteration").and_then(|s| s.parse().ok()).ok_or_else(|| {
                Error::InvalidArgument("checkpoint metadata: iteration missing or not a number".into())
            })?;
        // A loss scale is only read by a loss-scaled run; an f32/bf16 checkpoint has none, and a
        // run resumed from one starts at the configured initial scale.
        let scaler = match (self.config.precision.scales_loss(), ck.metadata.get("loss_scale")) {
            (true, Some(v)) => {
                let good = ck.metadata.get("loss_scale_good_steps").and_then(|s| s.parse().ok()).unwrap_or(0);
                let scale = v.parse().ok().and_then(|s| LossScaler::resumed(self.config.loss_scale, s, good));
                Some(scale.ok_or_else(|| Error::Checkpoint {
                    path: "(in memory)".into(),
                    message: format!("metadata loss_scale {v:?} is not a finite positive number"),
                })?)
            }
            _ => None,
        };
        // Validate everything first, then write.
        let mut weight_vals = Vec::new();
        for w in self.store.weights() {
            let shape = w.value.shape().to_vec();
            let ts = torch_shape(&shape);
            let from = |v: &[f32]| if shape.len() == 4 { permute(v, &shape, false) } else { v.to_vec() };
            let val = from(need(&w.name, &ts)?);
            let mom = optional(&format!("{OPT}{}.momentum_buffer", w.name), &ts)?.map(from);
            weight_vals.push((val, mom));
        }
        let mut bn_vals = Vec::new();
        for l in self.store.bn_layers() {
            let c = l.channels;
            let mut tables: Vec<Vec<f32>> = (0..4).map(|_| Vec::with_capacity(l.num_datasets * c)).collect();
            let mut moms: [Option<Vec<f32>>; 2] = [None, None];
            let mut tracked = Vec::new();
            for d in 0..l.num_datasets {
                for (i, field) in ["weight", "bias", "running_mean", "running_var"].iter().enumerate() {
                    tables[i].extend_from_slice(need(&format!("{}.bn.{d}.{field}", l.name), &[c])?);
                }
                let name = format!("{}.bn.{d}.num_batches_tracked", l.name);
                mark(&name);
                match ck.i64(&name, &[])? {
                    [count] => tracked.push(*count),
                    _ => return Err(Error::InvalidArgument(format!("checkpoint tensor {name}: not one i64"))),
                }
                for (i, field) in ["weight", "bias"].iter().enumerate() {
                    if let Some(m) = optional(&format!("{OPT}{}.bn.{d}.{field}.momentum_buffer", l.name), &[c])? {
                        moms[i].get_or_insert_with(|| vec![0.0; l.num_datasets * c])[d * c..(d + 1) * c]
                            .copy_from_slice(m);
                    }
                }
            }
            bn_vals.push((tables, moms, tracked));
        }
        let used = used.into_inner();
        if let Some(t) = ck.tensors.iter().find(|t| !used.contains(&t.name)) {
            return Err(Error::Checkpoint {
                path: "(in memory)".into(),
                message: format!("unexpected tensor {:?}: this network has no such parameter", t.name),
            });
        }
        let be = self.backend().clone();
        for (w, (val, mom)) in self.store.weights_mut().iter_mut().zip(weight_vals) {
            be.write_f32(&mut w.value, &val)?;
            w.momentum = mom.map(|m| be.tensor_f32(w.value.shape(), &m)).transpose()?;
            w.grad = None;
        }
        for (l, (tables, moms, tracked)) in self.store.bn_layers_mut().iter_mut().zip(bn_vals) {
            for (t, v) in l.tables.tables_mut().into_iter().zip(&tables) {
                be.write_f32(t, v)?;
            }
            let shape = [l.num_datasets, l.channels];
            let [mg, mb] = moms;
            l.momentum_gamma = mg.map(|m| be.tensor_f32(&shape, &m)).transpose()?;
            l.momentum_beta = mb.map(|m| be.tensor_f32(&shape, &m)).transpose()?;
            l.batches_tracked = tracked;
            l.grad_gamma = None;
            l.grad_beta = None;
        }
        self.set_iteration(iteration);
        if let Some(scaler) = scaler {
            self.scaler = scaler;
        }
        Ok(())
    }
}
