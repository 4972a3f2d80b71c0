//! [`Graph::backward`]: the tape walked in reverse.

use super::node::Node;
use super::{Graph, ParamStore, Scalar, Var};
use crate::backend::{Backend, DabInput, DabOptions, DabSaved, LossOptions, PpmBranchRef, Prologue, TensorLike};
use crate::error::{Error, Result};
use crate::ops::cross_entropy::CrossEntropyOptions;

/// How a backward is seeded and its parameter gradients gathered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackwardOptions {
    /// The root's gradient (the loss scale of a mixed-precision step; 1 otherwise). Parameter
    /// gradients are divided by it when they are gathered, so they are the true gradients.
    pub seed: f32,
    /// Check every parameter gradient for infinities and NaNs (loss scaling) and return the
    /// flag ([`Gradients::overflow`]).
    pub check_finite: bool,
}

impl Default for BackwardOptions {
    fn default() -> Self {
        BackwardOptions { seed: 1.0, check_finite: false }
    }
}

/// What a backward returns besides the parameter gradients it left in the store.
#[derive(Debug)]
pub struct Gradients<B: Backend> {
    /// Gradients of the inputs registered with [`Graph::input_with_grad`], in ascending order.
    pub inputs: Vec<(Var, B::Tensor)>,
    /// With [`BackwardOptions::check_finite`]: an f32 `[1]` tensor on the backend, 1 when some
    /// parameter gradient is infinite or NaN (read it with the step's losses).
    pub overflow: Option<B::Tensor>,
}

impl<B: Backend> Graph<B> {
    /// Runs the tape backwards from `root` (seeded with gradient 1), leaves every parameter's
    /// gradient (f32, added to what the store held) in `store` and returns the gradients of the
    /// inputs registered with [`Graph::input_with_grad`], in ascending order. The tape is
    /// consumed.
    pub fn backward(&mut self, root: Scalar, store: &mut ParamStore<B>) -> Result<Vec<(Var, B::Tensor)>> {
        Ok(self.backward_with(root, store, &BackwardOptions::default())?.inputs)
    }

    /// [`Graph::backward`] with a seed (loss scale) and an optional overflow check.
    pub fn backward_with(
        &mut self,
        root: Scalar,
        store: &mut ParamStore<B>,
        opts: &BackwardOptions,
    ) -> Result<Gradients<B>> {
        if self.tape.is_empty() {
            return Err(Error::InvalidArgument("backward on a graph that recorded nothing".into()));
        }
        let needs = self.needs_grad.clone();
        if !(opts.seed.is_finite() && opts.seed > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "backward seed must be positive and finite, got {}",
                opts.seed
            )));
        }
        let b = self.backend.clone();
        let mut grads: Vec<Option<B::Tensor>> = (0..self.values.len()).map(|_| None).collect();
        let mut sgrads = vec![0.0f32; self.scalars.len()];
        sgrads[root.0] = opts.seed;
        let acc = |grads: &mut Vec<Option<B::Tensor>>, v: Var, g: B::Tensor| -> Result<()> {
            if !needs[v.0] {
                return Ok(());
            }
            grads[v.0] = Some(match grads[v.0].take() {
                None => g,
                Some(prev) => b.add(&prev, &g)?,
            });
            Ok(())
        };
        if self.backward_done {
            return Err(Error::InvalidArgument("backward ran on this graph already".into()));
        }
        self.backward_done = true;
        // The tape stays (what the forward saved can be inspected afterwards: Graph::dab_records);
        // only the loss gradients precomputed by the forward are taken out.
        let sync = self.bn_sync.clone();
        let (tape, values, stats) = (&mut self.tape, &self.values, &self.stats);
        for node in tape.iter_mut().rev() {
            match *node {
                Node::Sum { ref terms, out } => {
                    let g = sgrads[out.0];
                    for &(s, w) in terms.iter() {
                        sgrads[s.0] += g * w;
                    }
                }
                Node::Loss { logits, labels, datasets, ref num_classes, ref weights, upsample, ref mut pre, out } => {
                    let g = sgrads[out.0];
                    if g == 0.0 || !needs[logits.0] {
                        continue;
                    }
                    let d = match pre.take() {
                        Some((scale, d)) if scale == g => d,
                        _ => {
                            let opts = LossOptions {
                                ce: CrossEntropyOptions { weights: weights.clone(), grad_scale: g },
                                upsample,
                                with_grad: true,
                            };
                            let (_, d) = b.cross_entropy(
                                &values[logits.0],
                                &values[labels.0],
                                &values[datasets.0],
                                num_classes,
                                &opts,
                            )?;
                            d.ok_or_else(|| Error::InvalidArgument("backend returned no dlogits".into()))?
                        }
                    };
                    acc(&mut grads, logits, d)?;
                }
                Node::Usss { x, datasets, ref protos, ref classes_per_dataset, opts, ref mut pre, out } => {
                    let g = sgrads[out.0];
                    if g == 0.0 || !needs[x.0] {
                        continue;
                    }
                    let d = match pre.take() {
                        Some((scale, d)) if scale == g => d,
                        _ => b
                            .usss_entropy(
                                &values[x.0],
                                &values[datasets.0],
                                protos,
                                classes_per_dataset,
                                &opts,
                                Some(g),
                            )?
                            .1
                            .ok_or_else(|| Error::InvalidArgument("backend returned no USSS gradient".into()))?,
                    };
                    acc(&mut grads, x, d)?;
                }
                Node::Conv { x, w, bias, geometry, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    let xv = &values[x.0];
                    let wt = store.conv_weight(w, xv.dtype())?;
                    let [k, r, s, _] = nhwc4(wt.shape(), "convolution weight")?;
                    if needs[x.0] {
                        let [_, h, wd, _] = nhwc4(xv.shape(), "convolution input")?;
                        let dx = b.conv2d_backward_data(&dy, wt, (h, wd), &geometry)?;
                        acc(&mut grads, x, dx)?;
                    }
                    let (dw, db) = b.conv2d_backward_filter(&dy, xv, (k, r, s), bias.is_some(), &geometry)?;
                    store.push_weight_grad(w, dw);
                    if let (Some(bid), Some(db)) = (bias, db) {
                        store.push_weight_grad(bid, db);
                    }
                }
                Node::Dab { x, w, datasets, bn, stats: si, ref conv_out, prologue, residual, geometry, dsbn, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    let xv = &values[x.0];
                    let opts = DabOptions {
                        geometry,
                        dsbn,
                        prologue: prologue.map(|p| Prologue {
                            bn: &store.bn(p.bn).tables,
                            stats: &stats[p.stats],
                            relu: p.relu,
                        }),
                        residual: residual.map(|r| &values[r.0]),
                        materialize: conv_out.is_some(),
                        skip_input_grad: !needs[x.0],
                    };
                    let input =
                        DabInput { x: xv, weight: store.conv_weight(w, xv.dtype())?, datasets: &values[datasets.0] };
                    let saved = DabSaved { conv_out: conv_out.as_ref().unwrap_or(&values[out.0]), stats: &stats[si] };
                    let g = b.dab_backward(&dy, input, &store.bn(bn).tables, saved, &opts)?;
                    if let Some(dx) = g.dx {
                        acc(&mut grads, x, dx)?;
                    }
                    if let (Some(r), Some(dr)) = (residual, g.dresidual) {
                        acc(&mut grads, r, dr)?;
                    }
                    store.push_weight_grad(w, g.dweight);
                    store.push_bn_grad(bn, g.dgamma, g.dbeta);
                }
                Node::Dsbn { x, residual, datasets, bn, stats: si, opts, out, synced } => {
                    let comm = sync.as_ref().filter(|_| synced);
                    let dy = match (grads[out.0].take(), comm) {
                        (Some(dy), _) => dy,
                        // The group's collective needs every rank, with or without a gradient.
                        (None, Some(_)) => {
                            let xv = &values[x.0];
                            let n = xv.shape().iter().product();
                            b.tensor_float(xv.shape(), &vec![0.0; n], xv.dtype())?
                        }
                        (None, None) => continue,
                    };
                    let (xv, rv, dv) = (&values[x.0], residual.map(|r| &values[r.0]), &values[datasets.0]);
                    let tables = &store.bn(bn).tables;
                    let g = match comm {
                        Some(comm) => {
                            let mut reduce = super::sync::host_all_reduce(&b, comm.as_ref());
                            b.dsbn_backward_train_synced(&dy, xv, rv, dv, tables, &stats[si], &opts, &mut reduce)?
                        }
                        None => b.dsbn_backward_train(&dy, xv, rv, dv, tables, &stats[si], &opts)?,
                    };
                    acc(&mut grads, x, g.dx)?;
                    if let (Some(r), Some(dr)) = (residual, g.dresidual) {
                        acc(&mut grads, r, dr)?;
                    }
                    store.push_bn_grad(bn, g.dgamma, g.dbeta);
                }
                Node::Ppm { x, datasets, ref branches, ref saved, ref opts, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    let dtype = values[x.0].dtype();
                    let mut refs = Vec::with_capacity(branches.len());
                    for &(w, bid) in branches {
                        refs.push(PpmBranchRef { weight: store.conv_weight(w, dtype)?, bn: &store.bn(bid).tables });
                    }
                    let g = b.ppm_backward(&dy, &values[datasets.0], &refs, saved, opts)?;
                    acc(&mut grads, x, g.dx)?;
                    for (&(w, bid), bg) in branches.iter().zip(g.branches) {
                        store.push_weight_grad(w, bg.dweight);
                        store.push_bn_grad(bid, bg.dgamma, bg.dbeta);
                    }
                }
                Node::Relu { out, x } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    let dx = b.relu_backward(&dy, &values[out.0])?;
                    acc(&mut grads, x, dx)?;
                }
                Node::Add { a, b: bv, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    if needs[a.0] && needs[bv.0] {
                        let copy = b.try_clone(&dy)?;
                        acc(&mut grads, a, copy)?;
                        acc(&mut grads, bv, dy)?;
                    } else if needs[a.0] {
                        acc(&mut grads, a, dy)?;
                    } else {
                        acc(&mut grads, bv, dy)?;
                    }
                }
                Node::MaxPool { x, ref indices, input_hw, geometry, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    if needs[x.0] {
                        let dx = b.max_pool2d_backward(&dy, indices, input_hw, &geometry)?;
                        acc(&mut grads, x, dx)?;
                    }
                }
                Node::AvgPool { x, input_hw, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    if needs[x.0] {
                        let dx = b.adaptive_avg_pool_backward(&dy, input_hw)?;
                        acc(&mut grads, x, dx)?;
                    }
                }
                Node::Resize { x, input_hw, align_corners, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    if needs[x.0] {
                        let dx = b.resize_bilinear_backward(&dy, input_hw, align_corners)?;
                        acc(&mut grads, x, dx)?;
                    }
                }
                Node::Concat { ref parts, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    let mut offset = 0;
                    for &(p, c) in parts {
                        if needs[p.0] {
                            let dp = b.slice_channels(&dy, offset, c)?;
                            acc(&mut grads, p, dp)?;
                        }
                        offset += c;
                    }
                }
                Node::Dropout { x, opts, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    let dx = b.dropout2d_backward(&dy, &opts)?;
                    acc(&mut grads, x, dx)?;
                }
                Node::SplitBatch { x, ref parts } => {
                    if !needs[x.0] || parts.iter().all(|(p, _)| grads[p.0].is_none()) {
                        continue;
                    }
                    let xv = &values[x.0];
                    let mut pieces = Vec::with_capacity(parts.len());
                    for (p, len) in parts {
                        pieces.push(match grads[p.0].take() {
                            Some(g) => g,
                            None => {
                                // A part nobody differentiated: zeros of its shape and storage.
                                let mut shape = xv.shape().to_vec();
                                shape[0] = *len;
                                let n = shape.iter().product::<usize>();
                                b.tensor_float(&shape, &vec![0.0; n], xv.dtype())?
                            }
                        });
                    }
                    let dx = match pieces.len() {
                        1 => pieces.pop().expect("one part"),
                        _ => b.concat_batch(&pieces.iter().collect::<Vec<_>>())?,
                    };
                    acc(&mut grads, x, dx)?;
                }
                Node::ConcatBatch { ref parts, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    let mut start = 0;
                    for &(p, n) in parts {
                        if needs[p.0] {
                            let dp = b.slice_batch(&dy, start, n)?;
                            acc(&mut grads, p, dp)?;
                        }
                        start += n;
                    }
                }
            }
        }
        let overflow = store.finish_grads(1.0 / opts.seed, opts.check_finite)?;
        let mut inputs = Vec::new();
        for (i, g) in grads.into_iter().enumerate() {
            if let Some(g) = g {
                inputs.push((Var(i), g));
            }
        }
        Ok(Gradients { inputs, overflow })
    }
}

fn nhwc4(s: &[usize], what: &'static str) -> Result<[usize; 4]> {
    match *s {
        [n, h, w, c] => Ok([n, h, w, c]),
        _ => Err(Error::InvalidShape { what, shape: s.to_vec(), reason: "expected 4 dimensions".into() }),
    }
}
