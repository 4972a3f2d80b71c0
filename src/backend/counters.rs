//! Step accounting at the backend level: what the ops of a step wrote, in a unit that the
//! device counters (launches, allocations, copies, synchronisations) cannot see — whole
//! activation-sized tensors — and which convolution instantiations (problem × storage type) ran.
//!
//! **Activation-sized tensor written**: a tensor of rank ≥ 3 whose first axis is the batch (an
//! NHWC activation, its gradient, max-pooling indices, labels or predictions) that an op writes
//! in full, counted once per op that writes it — the intermediates a composite op stores and
//! keeps (a DAB's convolution output) or throws away (today's residual DSBN's statistics-pass
//! output) included, an in-place update (a slice written into an existing output) not counted
//! again. Host uploads (images, labels) are not counted (the device counters show them as
//! host-to-device copies), and neither are parameter-shaped tensors (weights, their gradients,
//! `[D, C]` tables, losses). It is the figure that the fusions of the training path lower: every
//! such tensor is at least one pass over activation-sized memory, and most are read back once
//! more by their consumer.

use std::fmt;
use std::ops::Sub;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::tensor::DType;

/// The three convolution problems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConvProblem {
    /// `y = conv(x, w)` (with whatever prologue or epilogue the op fuses).
    Forward,
    /// `dx` from `dy` and `w`.
    BackwardData,
    /// `dw` (and the bias gradient) from `dy` and `x`.
    BackwardFilter,
}

impl ConvProblem {
    /// Every problem, in the order of [`OpCounters::convolutions`].
    pub const ALL: [ConvProblem; 3] = [ConvProblem::Forward, ConvProblem::BackwardData, ConvProblem::BackwardFilter];
}

/// The float storage types, in the order of [`OpCounters::convolutions`]' inner arrays.
pub const CONV_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// A snapshot of a backend's op counters; subtract two to get what happened in between.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCounters {
    /// Activation-sized tensors written (see the module documentation).
    pub activation_tensors: u64,
    /// Their bytes.
    pub activation_bytes: u64,
    /// Convolutions run, by problem ([`ConvProblem::ALL`] order) and storage type
    /// ([`CONV_DTYPES`] order): which kernel instantiations a step used.
    pub convolutions: [[u64; 3]; 3],
}

impl OpCounters {
    /// The (problem, storage type) pairs that ran at least once.
    pub fn convolution_kinds(&self) -> Vec<(ConvProblem, DType)> {
        let mut out = Vec::new();
        for (pi, p) in ConvProblem::ALL.iter().enumerate() {
            for (di, d) in CONV_DTYPES.iter().enumerate() {
                if self.convolutions[pi][di] > 0 {
                    out.push((*p, *d));
                }
            }
        }
        out
    }
}

impl Sub for OpCounters {
    type Output = OpCounters;

    fn sub(self, before: OpCounters) -> OpCounters {
        let mut convolutions = [[0; 3]; 3];
        for (p, row) in convolutions.iter_mut().enumerate() {
            for (d, c) in row.iter_mut().enumerate() {
                *c = self.convolutions[p][d].saturating_sub(before.convolutions[p][d]);
            }
        }
        OpCounters {
            activation_tensors: self.activation_tensors.saturating_sub(before.activation_tensors),
            activation_bytes: self.activation_bytes.saturating_sub(before.activation_bytes),
            convolutions,
        }
    }
}

impl fmt::Display for OpCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} activation-sized tensors written ({:.2} MiB)",
            self.activation_tensors,
            self.activation_bytes as f64 / (1024.0 * 1024.0)
        )?;
        for (pi, p) in ConvProblem::ALL.iter().enumerate() {
            let parts: Vec<String> = CONV_DTYPES
                .iter()
                .enumerate()
                .filter(|(di, _)| self.convolutions[pi][*di] > 0)
                .map(|(di, d)| format!("{} {d}", self.convolutions[pi][di]))
                .collect();
            if !parts.is_empty() {
                let name = match p {
                    ConvProblem::Forward => "conv forward",
                    ConvProblem::BackwardData => "conv data gradient",
                    ConvProblem::BackwardFilter => "conv filter gradient",
                };
                write!(f, " | {name}: {}", parts.join(", "))?;
            }
        }
        Ok(())
    }
}

/// The live counters, shared by the clones of one backend.
#[derive(Debug, Default, Clone)]
pub(crate) struct OpTally {
    inner: Arc<Live>,
}

#[derive(Debug, Default)]
struct Live {
    activation_tensors: AtomicU64,
    activation_bytes: AtomicU64,
    convolutions: [[AtomicU64; 3]; 3],
}

impl OpTally {
    /// One activation-sized tensor of `bytes` written.
    pub(crate) fn activation(&self, bytes: usize) {
        self.inner.activation_tensors.fetch_add(1, Ordering::Relaxed);
        self.inner.activation_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// One convolution of `problem` in storage `dtype` (other types are not counted).
    pub(crate) fn convolution(&self, problem: ConvProblem, dtype: DType) {
        let p = ConvProblem::ALL.iter().position(|&q| q == problem).unwrap_or(0);
        if let Some(d) = CONV_DTYPES.iter().position(|&t| t == dtype) {
            self.inner.convolutions[p][d].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> OpCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut convolutions = [[0; 3]; 3];
        for (p, row) in convolutions.iter_mut().enumerate() {
            for (d, c) in row.iter_mut().enumerate() {
                *c = get(&self.inner.convolutions[p][d]);
            }
        }
        OpCounters {
            activation_tensors: get(&self.inner.activation_tensors),
            activation_bytes: get(&self.inner.activation_bytes),
            convolutions,
        }
    }
}
