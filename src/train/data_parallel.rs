//! Data-parallel DAT with per-rank BatchNorm statistics (as plain DDP without SyncBN): every
//! rank runs the step on its own shard of every dataset's batch, and after the one backward the
//! gradients are averaged over the ranks, so parameters and momentum stay identical.
//!
//! This first version reduces through host memory in one buffer per step (what the CPU backend
//! and the emulator need; the NCCL path will reduce device buffers in buckets).
//!
//! BatchNorm statistics are per rank by default (plain DDP). With per-dataset SyncBN
//! ([`super::Trainer::set_sync_bn`]) every training normalisation uses the group's statistics of
//! each dataset (see [`crate::autograd::Graph::set_bn_sync`]): one all-reduce per DSBN layer in
//! the forward, one in the backward, and the running statistics move identically on every rank.
//! Every rank must then run the same forward passes; a step checks that first.

use std::sync::Arc;

use crate::autograd::ParamStore;
use crate::backend::{Backend, BnTables, TensorLike};
use crate::dist::Communicator;
use crate::error::{Error, Result};

/// What a [`super::Trainer`] needs to take part in a data-parallel run.
#[derive(Clone)]
pub struct DataParallel {
    comm: Arc<dyn Communicator>,
    sync_bn: bool,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataParallel(rank {} of {}, SyncBN {})", self.comm.rank(), self.comm.world_size(), self.sync_bn)
    }
}

/// The step's gradients after [`DataParallel::average`]: which DSBN rows saw a sample on some
/// rank, and the overflow flag of every rank together.
pub(crate) struct Averaged {
    /// Per BN layer and dataset: true when no rank's forward saw the dataset.
    pub absent: Vec<Vec<bool>>,
}

impl DataParallel {
    /// Joins the group `comm` belongs to.
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        DataParallel { comm, sync_bn: false }
    }

    /// Per-dataset SyncBN on or off.
    pub(crate) fn set_sync_bn(&mut self, on: bool) {
        self.sync_bn = on;
    }

    /// Whether the BatchNorm statistics are the group's.
    pub fn sync_bn(&self) -> bool {
        self.sync_bn
    }

    /// The communicator a step's graph synchronises its BatchNorm statistics over: `None`
    /// when SyncBN is off or the group has one rank (its statistics are the local ones).
    pub(crate) fn bn_comm(&self) -> Option<Arc<dyn Communicator>> {
        (self.sync_bn && self.comm.world_size() > 1).then(|| self.comm.clone())
    }

    /// With SyncBN: fails on every rank unless every rank is about to run `passes` forward
    /// passes (their normalisations are collectives, so the ranks must run the same sequence).
    pub(crate) fn check_passes(&self, passes: usize) -> Result<()> {
        if self.bn_comm().is_none() {
            return Ok(());
        }
        let mut v = [passes as f32, (passes * passes) as f32];
        self.comm.all_reduce_sum(&mut v)?;
        let w = self.comm.world_size() as f32;
        if v != [w * passes as f32, w * (passes * passes) as f32] {
            return Err(crate::dist::dist_error(format!(
                "rank {} runs {passes} forward passes but the group does not agree: with SyncBN every \
                 rank needs a batch of the same datasets in the same passes",
                self.comm.rank()
            )));
        }
        Ok(())
    }

    /// This rank and the number of ranks.
    pub fn rank_and_size(&self) -> (usize, usize) {
        (self.comm.rank(), self.comm.world_size())
    }

    /// Makes every rank's parameters, BN tables and momentum buffers rank 0's (at the start
    /// and after a resume, so ranks that loaded or initialised differently agree).
    pub(crate) fn broadcast_state<B: Backend>(&self, store: &mut ParamStore<B>) -> Result<()> {
        let be = store.backend().clone();
        let sync = |t: &mut B::Tensor| -> Result<()> {
            let mut host = be.to_f32(t)?;
            self.comm.broadcast(&mut host, 0)?;
            be.write_f32(t, &host)
        };
        // The masters through weights_mut, so that 16-bit copies are refreshed before use.
        for w in store.weights_mut() {
            sync(&mut w.value)?;
            if let Some(m) = w.momentum.as_mut() {
                sync(m)?;
            }
        }
        for l in store.bn_layers_mut() {
            for t in l.tables.tables_mut() {
                sync(t)?;
            }
            for m in [l.momentum_gamma.as_mut(), l.momentum_beta.as_mut()].into_iter().flatten() {
                sync(m)?;
            }
        }
        Ok(())
    }

    /// Averages every gradient over the ranks (a parameter without a gradient on this rank
    /// counts as zero, as in DDP; it gets one if any rank produced it), tells which datasets no
    /// rank saw (from the forwards' `batches_tracked` moves since `before`), and ORs the ranks'
    /// f16 overflow flags into `overflow`. One all-reduce of one buffer.
    pub(crate) fn average<B: Backend>(
        &self,
        store: &mut ParamStore<B>,
        before: &[Vec<i64>],
        overflow: Option<&mut B::Tensor>,
    ) -> Result<Averaged> {
        let be = store.backend().clone();
        let world = self.comm.world_size() as f32;
        let mut buf = Vec::new();
        // Layout, identical on every rank: per weight [present, grad...], per BN layer
        // [present, dγ..., dβ..., seen per dataset...], then the overflow flag.
        for w in store.weights() {
            let n: usize = w.value.shape().iter().product();
            push_grad(&be, &mut buf, w.grad.as_ref(), n)?;
        }
        for (l, before) in store.bn_layers().iter().zip(before) {
            let n = l.num_datasets * l.channels;
            buf.push(l.grad_gamma.is_some() as u8 as f32);
            push_values(&be, &mut buf, l.grad_gamma.as_ref(), n)?;
            push_values(&be, &mut buf, l.grad_beta.as_ref(), n)?;
            buf.extend(l.batches_tracked.iter().zip(before).map(|(now, was)| (now != was) as u8 as f32));
        }
        let flag = match overflow.as_deref() {
            Some(f) => be.to_f32(f)?.first().copied().unwrap_or(0.0),
            None => 0.0,
        };
        buf.push(if flag != 0.0 { 1.0 } else { 0.0 });

        self.comm.all_reduce_sum(&mut buf)?;

        let mut at = 0usize;
        let mut take = |n: usize| {
            let s = &buf[at..at + n];
            at += n;
            s
        };
        let (weights, bns) = store.parts_mut();
        for w in weights.iter_mut() {
            let n: usize = w.value.shape().iter().product();
            let present = take(1)[0] > 0.0;
            let sum = take(n);
            if present {
                set_mean(&be, &mut w.grad, w.value.shape(), sum, world)?;
            }
        }
        let mut absent = Vec::with_capacity(bns.len());
        for l in bns.iter_mut() {
            let n = l.num_datasets * l.channels;
            let present = take(1)[0] > 0.0;
            let shape = [l.num_datasets, l.channels];
            let (gg, gb) = (take(n).to_vec(), take(n).to_vec());
            if present {
                set_mean(&be, &mut l.grad_gamma, &shape, &gg, world)?;
                set_mean(&be, &mut l.grad_beta, &shape, &gb, world)?;
            }
            absent.push(take(l.num_datasets).iter().map(|&seen| seen == 0.0).collect());
        }
        let any_overflow = take(1)[0] > 0.0;
        if let Some(f) = overflow {
            be.write_f32(f, &[if any_overflow { 1.0 } else { 0.0 }])?;
        }
        Ok(Averaged { absent })
    }
}

fn push_grad<B: Backend>(be: &B, buf: &mut Vec<f32>, grad: Option<&B::Tensor>, n: usize) -> Result<()> {
    buf.push(grad.is_some() as u8 as f32);
    push_values(be, buf, grad, n)
}

fn push_values<B: Backend>(be: &B, buf: &mut Vec<f32>, t: Option<&B::Tensor>, n: usize) -> Result<()> {
    match t {
        Some(t) => {
            let v = be.to_f32(t)?;
            if v.len() != n {
                return Err(Error::InvalidArgument(format!("a gradient of {} values for {n} parameters", v.len())));
            }
            buf.extend_from_slice(&v);
        }
        None => buf.resize(buf.len() + n, 0.0),
    }
    Ok(())
}

/// `grad` := `sum` / `world`, creating the gradient if this rank had none.
fn set_mean<B: Backend>(be: &B, grad: &mut Option<B::Tensor>, shape: &[usize], sum: &[f32], world: f32) -> Result<()> {
    let mean: Vec<f32> = sum.iter().map(|s| s / world).collect();
    match grad {
        Some(g) => be.write_f32(g, &mean),
        None => {
            *grad = Some(be.tensor_f32(shape, &mean)?);
            Ok(())
        }
    }
}
