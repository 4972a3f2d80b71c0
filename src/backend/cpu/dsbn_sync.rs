//! Per-dataset synchronised BatchNorm on the CPU backend: what one rank of a data-parallel group
//! contributes to a DSBN layer's statistics, and how it reads the group's back.
//!
//! **Forward.** Each rank sums, per (dataset, channel), `Σ(x − K)` and `Σ(x − K)²` in f64 over
//! its own samples, with the shift `K` = the layer's running mean. Both are sums, so ONE
//! all-reduce of one buffer (`[Σ(x−K) | Σ(x−K)² | counts]`, `2·D·C + 2·D` f32 values) gives the
//! group's, and each rank finishes `mean = K + S₁/M`, `var = S₂/M − (S₁/M)²` in f64. Why shifted
//! power sums and not the per-rank (count, mean, M2) that Chan's merge takes: the merge is not a
//! sum, so it needs an all-gather (W times the bytes) or a second round; plain `Σx, Σx²` cancel
//! catastrophically when |mean| ≫ std. With the shift, the cancellation is governed by
//! `(mean − K)² / var`, and `K` — the running mean, identical on every rank because the
//! data-parallel start broadcasts the tables and every synchronised step moves them identically
//! — tracks the batch mean after the first steps; the f32 rounding of the sums then costs about
//! 2⁻²⁴·(1 + (mean−K)²/var) relative in the variance (on the first step, `K = 0`: PyTorch's
//! `Σx, Σx²`).
//!
//! **Counts** travel as two f32 values each, `count >> 12` and `count & 4095`: integers below
//! 2²⁴ add exactly in f32, so the group's counts are exact for groups of fewer than 4096 ranks
//! and counts below 2³⁶ per rank.
//!
//! **Backward.** `Σg` and `Σg·x̂` per (dataset, channel) (this rank's `dβ`, `dγ`) and the counts
//! in one all-reduce; `dx` takes the group's sums and counts, `dγ`, `dβ` stay this rank's.
//!
//! A dataset no rank held has count 0 everywhere: zero statistics saved, running statistics
//! untouched, as in the unsynchronised forward.

use super::check::{dataset_indices, f32_of, float_of, i32_of, per_pixel_chunk};
use super::dsbn::{self, BatchStats};
use super::tensor::{CpuBn, CpuBnSaved, CpuTensor};
use crate::backend::StatsReduce;
use crate::error::{Error, Result};
use crate::ops::dsbn::DsbnOptions;

const LOW_BITS: u32 = 12;

fn push_counts(buf: &mut Vec<f32>, counts: &[usize]) -> Result<()> {
    if let Some(&big) = counts.iter().find(|&&m| m >> (LOW_BITS + 24) != 0) {
        return Err(Error::InvalidArgument(format!("{big} values in one dataset are too many to synchronise")));
    }
    buf.extend(counts.iter().map(|&m| (m >> LOW_BITS) as f32));
    buf.extend(counts.iter().map(|&m| (m & ((1 << LOW_BITS) - 1)) as f32));
    Ok(())
}

fn read_counts(v: &[f32], d: usize) -> Result<Vec<usize>> {
    let ok = |x: f32| x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x < 16_777_216.0;
    if v.len() != 2 * d || !v.iter().all(|&x| ok(x)) {
        return Err(crate::dist::dist_error(
            "the reduced DSBN counts are not counts (ranks disagree on the layer or its collective)",
        ));
    }
    Ok((0..d).map(|i| ((v[i] as usize) << LOW_BITS) + v[d + i] as usize).collect())
}

/// The group's sums back from `reduce`, checked for its length.
fn reduced(buf: Vec<f32>, reduce: &mut StatsReduce<'_, CpuTensor>) -> Result<Vec<f32>> {
    let len = buf.len();
    let mut t = CpuTensor::f32_unchecked(vec![len], buf);
    reduce(&mut t)?;
    let v = f32_of("reduced DSBN statistics", &t)?;
    if v.len() != len {
        return Err(crate::dist::dist_error(format!("a reduction of {len} values returned {}", v.len())));
    }
    Ok(v.to_vec())
}

/// Training forward with the group's statistics; nothing moves until nothing can fail.
pub(crate) fn forward_train(
    x: &CpuTensor,
    datasets: &CpuTensor,
    bn: &mut CpuBn,
    opts: &DsbnOptions,
    residual: Option<&CpuTensor>,
    reduce: &mut StatsReduce<'_, CpuTensor>,
) -> Result<(CpuTensor, CpuBnSaved)> {
    let g = dsbn::check_bn(x, datasets, bn, opts)?;
    dsbn::check_residual(residual, x)?;
    let ds = dataset_indices(i32_of("dataset indices", datasets)?, g.d)?;
    let (hw, c, d) = (g.hw, g.c, g.d);
    let shift = f32_of("DSBN running_mean", &bn.running_mean)?;
    let xv = float_of("DSBN input", x)?;
    let parts = per_pixel_chunk(g.n, hw, |ni, pix| {
        let mut s = vec![0.0f64; 2 * c];
        let k = &shift[ds[ni] * c..(ds[ni] + 1) * c];
        for px in xv[(ni * hw + pix.start) * c..(ni * hw + pix.end) * c].chunks_exact(c) {
            for ci in 0..c {
                let dev = px[ci] as f64 - k[ci] as f64;
                s[ci] += dev;
                s[c + ci] += dev * dev;
            }
        }
        s
    });
    let mut sums = vec![0.0f64; 2 * d * c];
    for (ni, part) in &parts {
        let off = ds[*ni] * c;
        for ci in 0..c {
            sums[off + ci] += part[ci];
            sums[d * c + off + ci] += part[c + ci];
        }
    }
    let mut counts = vec![0usize; d];
    ds.iter().for_each(|&di| counts[di] += hw);
    let mut buf: Vec<f32> = sums.iter().map(|&v| v as f32).collect();
    push_counts(&mut buf, &counts)?;
    let v = reduced(buf, reduce)?;
    let counts = read_counts(&v[2 * d * c..], d)?;
    if let Some(di) = (0..d).find(|&di| counts[di] == 1) {
        return Err(Error::TooFewValues { dataset: di, count: 1 });
    }
    let mut mean = vec![0.0f64; d * c];
    let mut var = vec![0.0f64; d * c];
    for i in (0..d * c).filter(|&i| counts[i / c] > 0) {
        let m = counts[i / c] as f64;
        let e1 = v[i] as f64 / m;
        mean[i] = shift[i] as f64 + e1;
        // Rounding can take the difference a hair below zero for a constant channel.
        var[i] = (v[d * c + i] as f64 / m - e1 * e1).max(0.0);
    }
    let stats = BatchStats::from_moments(g, counts, mean, var, opts.eps);
    let y = dsbn::apply_saved(x, residual, datasets, bn, &stats.saved, opts.relu)?;
    dsbn::move_running(bn, &stats, opts)?;
    Ok((y, stats.saved))
}

/// The backward's collective: this rank's `Σg` (`dbeta`), `Σg·x̂` (`dgamma`) and counts in,
/// the group's out (f64 of the f32 sums).
pub(crate) fn reduce_backward(
    dbeta: &[f64],
    dgamma: &[f64],
    counts: &[usize],
    reduce: &mut StatsReduce<'_, CpuTensor>,
) -> Result<(Vec<f64>, Vec<f64>, Vec<usize>)> {
    let n = dbeta.len();
    let mut buf: Vec<f32> = dbeta.iter().chain(dgamma).map(|&v| v as f32).collect();
    push_counts(&mut buf, counts)?;
    let v = reduced(buf, reduce)?;
    let group = read_counts(&v[2 * n..], counts.len())?;
    let wide = |s: &[f32]| s.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    Ok((wide(&v[..n]), wide(&v[n..2 * n]), group))
}
