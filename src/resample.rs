//! The index maps of PyTorch's resampling ops, shared by the CPU backend and the f64 oracle:
//! which input indices an adaptive-pooling bin averages, and which two taps (with which
//! weights) a bilinear output reads. Both are pure functions of the sizes along one axis.

/// Input index range `[start, end)` of adaptive-pooling bin `i` (of `out`) over an axis of
/// `inp`: `floor(i·inp/out) .. ceil((i + 1)·inp/out)` (bins may overlap when `out` does not
/// divide `inp`, and repeat input indices when `out > inp`).
pub fn pool_bin(i: usize, inp: usize, out: usize) -> (usize, usize) {
    let start = i * inp / out;
    let end = ((i + 1) * inp).div_ceil(out);
    (start, end)
}

/// The two taps `[(lo, 1 − λ), (hi, λ)]` that output index `dst` (of `out`) reads along an
/// axis of `inp` input positions, as `interpolate(mode="bilinear")`: the source position is
/// `dst·(inp − 1)/(out − 1)` with `align_corners` (0 when `out == 1`), else
/// `max((dst + 0.5)·inp/out − 0.5, 0)`; `lo = floor(src)`, `hi = min(lo + 1, inp − 1)`.
pub fn bilinear_taps(dst: usize, inp: usize, out: usize, align_corners: bool) -> [(usize, f64); 2] {
    let (inp_f, out_f, d) = (inp as f64, out as f64, dst as f64);
    let src = if align_corners {
        if out > 1 {
            d * (inp_f - 1.0) / (out_f - 1.0)
        } else {
            0.0
        }
    } else {
        ((d + 0.5) * inp_f / out_f - 0.5).max(0.0)
    };
    let lo = (src.floor() as usize).min(inp - 1);
    let hi = (lo + 1).min(inp - 1);
    let lambda = src - lo as f64;
    [(lo, 1.0 - lambda), (hi, lambda)]
}
