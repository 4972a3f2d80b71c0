// Bilinear resize with PyTorch's source indices (interpolate(mode="bilinear") with an output
// size, align_corners either way), shared by every kernel that resamples: the resize kernels of
// pool.cu and the cross-entropy that upsamples its logits on the fly (cross_entropy.cu). One
// definition of the taps and of the interpolation, so that every user computes the same weights
// and the same value bit for bit (a fused kernel equals the unfused pair).
#pragma once

#include "cdcl_device.cuh"

namespace CDCL_NAMESPACE {

// PyTorch's area_pixel_compute_scale for a given output size (no scale factor), in f32.
__host__ __device__ __forceinline__ float resize_scale(int in, int out, int align_corners) {
    if (align_corners) return out > 1 ? (float)(in - 1) / (float)(out - 1) : 0.0f;
    return (float)in / (float)out;
}

// The two source taps of output index dst along one axis: value = (1 - lambda) * x[lo] +
// lambda * x[hi]. The single definition used by the forward and by the backward's gather, so
// the two agree on every weight bit for bit. fmaf pins the rounding on both targets.
struct Tap {
    int lo, hi;
    float lambda;
};
__device__ __forceinline__ Tap resize_tap(int dst, int in, float scale, int align_corners) {
    const float src = align_corners ? scale * (float)dst : fmaxf(fmaf(scale, (float)dst + 0.5f, -0.5f), 0.0f);
    int lo = (int)src;  // src >= 0, so truncation is floor
    if (lo > in - 1) lo = in - 1;  // never reached with exact arithmetic; keeps every access in bounds
    Tap t;
    t.lo = lo;
    t.hi = lo < in - 1 ? lo + 1 : lo;
    t.lambda = src - (float)lo;
    return t;
}

// The weight with which output index dst (tap t) reads input index i: 0 when it does not.
__device__ __forceinline__ float tap_weight(const Tap& t, int i) {
    float wgt = 0.0f;
    if (t.lo == i) wgt += 1.0f - t.lambda;
    if (t.hi == i) wgt += t.lambda;
    return wgt;
}

// A range [first, last] of output indices that contains every output whose taps touch input
// index i (source index in [i - 1, i + 1]), from the inverse of the source-index map, widened
// by one on each side against rounding. Candidates are then tested with resize_tap itself.
__device__ __forceinline__ void resize_candidates(int i, int in, int out, int align_corners, int& first, int& last) {
    if (align_corners && (in == 1 || out == 1)) {
        first = 0;
        last = out - 1;
        return;
    }
    float lo, hi;
    if (align_corners) {
        const float inv = (float)(out - 1) / (float)(in - 1);
        lo = (float)(i - 1) * inv;
        hi = (float)(i + 1) * inv;
    } else {
        const float inv = (float)out / (float)in;
        lo = ((float)i - 0.5f) * inv - 0.5f;
        hi = ((float)i + 1.5f) * inv - 0.5f;
    }
    first = max((int)floorf(lo) - 1, 0);
    last = min((int)ceilf(hi) + 1, out - 1);
}

// The value at output (th, tw) from the four source values x[hlo][wlo], x[hlo][whi],
// x[hhi][wlo], x[hhi][whi], in PyTorch's order h0 * (w0 * x00 + w1 * x01) +
// h1 * (w0 * x10 + w1 * x11), with explicit fmaf so that both targets round alike.
__device__ __forceinline__ float bilerp(float x00, float x01, float x10, float x11, const Tap& th, const Tap& tw) {
    const float w0 = 1.0f - tw.lambda, h0 = 1.0f - th.lambda;
    const float top = fmaf(w0, x00, tw.lambda * x01);
    const float bottom = fmaf(w0, x10, tw.lambda * x11);
    return fmaf(h0, top, th.lambda * bottom);
}

}  // namespace CDCL_NAMESPACE
