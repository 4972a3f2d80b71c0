//! Direct 2-D convolution (cross-correlation, as in PyTorch) over NHWC inputs and KRSC weights,
//! and its gradients, in f64 loops straight from the definition:
//!
//! `y[n, p, q, k] = bias[k] + Σ_{r, s, c} x[n, p·sh − ph + r·dh, q·sw − pw + s·dw, c] · w[k, r, s, c]`
//!
//! with out-of-image positions contributing zero.

use ndarray::{Array1, Array4, ArrayView1, ArrayView4};

/// Stride, zero padding and dilation, (height, width) each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    /// Step between output positions.
    pub stride: (usize, usize),
    /// Zeros added on each side.
    pub padding: (usize, usize),
    /// Spacing between filter taps.
    pub dilation: (usize, usize),
}

impl Default for ConvSpec {
    fn default() -> Self {
        ConvSpec { stride: (1, 1), padding: (0, 0), dilation: (1, 1) }
    }
}

impl ConvSpec {
    /// Output height and width for an `h`×`w` input and an `r`×`s` filter, or `None` when the
    /// dilated filter does not fit in the padded input.
    pub fn output_size(&self, h: usize, w: usize, r: usize, s: usize) -> Option<(usize, usize)> {
        let one = |len: usize, pad: usize, dil: usize, taps: usize, stride: usize| {
            let span = dil * (taps - 1) + 1;
            let padded = len + 2 * pad;
            (taps > 0 && stride > 0 && padded >= span).then(|| (padded - span) / stride + 1)
        };
        Some((
            one(h, self.padding.0, self.dilation.0, r, self.stride.0)?,
            one(w, self.padding.1, self.dilation.1, s, self.stride.1)?,
        ))
    }

    /// The input position that output position `o` reads with tap `t` along one axis, if it is
    /// inside the image.
    fn source(o: usize, t: usize, stride: usize, pad: usize, dil: usize, len: usize) -> Option<usize> {
        let pos = (o * stride + t * dil) as isize - pad as isize;
        (pos >= 0 && (pos as usize) < len).then_some(pos as usize)
    }
}

/// Forward convolution. Panics if shapes disagree (the reference is called by tests only).
pub fn conv2d(x: ArrayView4<f64>, w: ArrayView4<f64>, bias: Option<ArrayView1<f64>>, spec: &ConvSpec) -> Array4<f64> {
    let (n, h, wd, c) = x.dim();
    let (k, r, s, c2) = w.dim();
    assert_eq!(c, c2, "input and filter channels differ");
    let (p, q) = spec.output_size(h, wd, r, s).expect("filter larger than the padded input");
    let mut y = Array4::zeros((n, p, q, k));
    for ni in 0..n {
        for pi in 0..p {
            for qi in 0..q {
                for ki in 0..k {
                    let mut acc = bias.map_or(0.0, |b| b[ki]);
                    for ri in 0..r {
                        let Some(hi) = ConvSpec::source(pi, ri, spec.stride.0, spec.padding.0, spec.dilation.0, h)
                        else {
                            continue;
                        };
                        for si in 0..s {
                            let Some(wi) = ConvSpec::source(qi, si, spec.stride.1, spec.padding.1, spec.dilation.1, wd)
                            else {
                                continue;
                            };
                            for ci in 0..c {
                                acc += x[[ni, hi, wi, ci]] * w[[ki, ri, si, ci]];
                            }
                        }
                    }
                    y[[ni, pi, qi, ki]] = acc;
                }
            }
        }
    }
    y
}

/// Gradients of the forward convolution for an output gradient `dy` [N, P, Q, K].
#[derive(Debug, Clone)]
pub struct ConvGrads {
    /// Gradient with respect to the input, [N, H, W, C].
    pub dx: Array4<f64>,
    /// Gradient with respect to the weights, [K, R, S, C].
    pub dw: Array4<f64>,
    /// Gradient with respect to the bias, [K].
    pub dbias: Array1<f64>,
}

/// All gradients at once, by scattering each output gradient back along the products that
/// formed it (the transpose of [`conv2d`]'s loop, so it cannot share a mistake with a gather).
pub fn conv2d_backward(dy: ArrayView4<f64>, x: ArrayView4<f64>, w: ArrayView4<f64>, spec: &ConvSpec) -> ConvGrads {
    let (n, h, wd, c) = x.dim();
    let (k, r, s, _) = w.dim();
    let (p, q) = spec.output_size(h, wd, r, s).expect("filter larger than the padded input");
    assert_eq!(dy.dim(), (n, p, q, k), "dy has the wrong shape");
    let mut dx = Array4::zeros(x.dim());
    let mut dw = Array4::zeros(w.dim());
    let mut dbias = Array1::zeros(k);
    for ni in 0..n {
        for pi in 0..p {
            for qi in 0..q {
                for ki in 0..k {
                    let g = dy[[ni, pi, qi, ki]];
                    dbias[ki] += g;
                    for ri in 0..r {
                        let Some(hi) = ConvSpec::source(pi, ri, spec.stride.0, spec.padding.0, spec.dilation.0, h)
                        else {
                            continue;
                        };
                        for si in 0..s {
                            let Some(wi) = ConvSpec::source(qi, si, spec.stride.1, spec.padding.1, spec.dilation.1, wd)
                            else {
                                continue;
                            };
                            for ci in 0..c {
                                dx[[ni, hi, wi, ci]] += g * w[[ki, ri, si, ci]];
                                dw[[ki, ri, si, ci]] += g * x[[ni, hi, wi, ci]];
                            }
                        }
                    }
                }
            }
        }
    }
    ConvGrads { dx, dw, dbias }
}
