// Max pooling over NHWC activations with PyTorch's max_pool2d semantics (floor mode, no
// dilation): the forward writes the maximum of each window and the flat index h*W + w of the
// element that holds it within its (sample, channel) plane; the backward sends each output
// gradient to that element.
//
//   forward:  one thread per output element (consecutive threads: consecutive channels of one
//             output pixel, coalesced in NHWC); the window is walked row by row, so the FIRST
//             maximum wins a tie and padding (outside the image) is never a candidate: the
//             running maximum starts at -inf with the index of the window's first in-image
//             pixel, as PyTorch does. A NaN wins over everything and the LAST NaN of the window
//             gives the index (PyTorch: `if (val > maxval || isnan(val))`).
//   backward: gather form, one thread per input element: it walks the outputs whose window
//             covers it, in (p, q) order, and sums dy of those whose index names it. Every dx is
//             written exactly once by one thread: deterministic, no atomics, and an index that
//             is not in its window (not one the forward wrote) contributes nowhere.
// Design and cost model: docs/kernels.md.
#include "cdcl_device.cuh"

namespace CDCL_NAMESPACE {

// Both kernels tile each sample's pixels (output pixels for the forward, input pixels for the
// backward): a block covers kPoolTile pixels x 32 channels of one sample (grid x: sample-major
// tiles, y: channel blocks), consecutive threads on consecutive channels (coalesced in NHWC).
// A pixel's row and column come from host-built fast divisors, so the per-element work has no
// division (tests/sass.rs); offsets are 64-bit by multiply-add.
constexpr int kPoolThreads = 256;
constexpr int kPoolTile = 64;
constexpr int kPoolChans = 32;
constexpr int kPoolRows = kPoolThreads / kPoolChans;

struct PoolTile {
    int n, c, pix0, pix1;
};
__device__ __forceinline__ PoolTile pool_tile(int pixels, unsigned tiles_per_sample) {
    PoolTile t;
    t.n = (int)(blockIdx.x / tiles_per_sample);
    const int tile = (int)(blockIdx.x - (unsigned)t.n * tiles_per_sample);
    t.c = (int)(blockIdx.y * kPoolChans + threadIdx.x);
    t.pix0 = tile * kPoolTile + (int)threadIdx.y;
    t.pix1 = (tile + 1) * kPoolTile < pixels ? (tile + 1) * kPoolTile : pixels;
    return t;
}

// fq: divisor by the output width q.
template <typename T>
__global__ void __launch_bounds__(kPoolThreads) maxpool_forward_kernel(const cdcl_maxpool_params p, unsigned tiles,
                                                                       FastDiv fq) {
    const PoolTile t = pool_tile(p.p * p.q, tiles);
    if (t.c >= p.c) return;
    const T* plane = static_cast<const T*>(p.x) + (long long)t.n * p.h * p.w * p.c + t.c;
    const long long obase = (long long)t.n * p.p * p.q * p.c + t.c;
    T* y = static_cast<T*>(p.y);
    for (int pix = t.pix0; pix < t.pix1; pix += kPoolRows) {
        const int pp = fq.div(pix), q = pix - pp * p.q;
        const int h0 = pp * p.stride_h - p.pad_h, w0 = q * p.stride_w - p.pad_w;
        const int h1 = min(h0 + p.kernel_h, p.h), w1 = min(w0 + p.kernel_w, p.w);
        const int hs = max(h0, 0), ws = max(w0, 0);
        float best = __int_as_float((int)0xff800000u);  // -inf
        int best_idx = hs * p.w + ws;
        for (int h = hs; h < h1; ++h) {
            for (int w = ws; w < w1; ++w) {
                const float v = to_f32(plane[((long long)h * p.w + w) * p.c]);
                // v != v: NaN (written out so that no fast-math flag can fold it away).
                if (v > best || v != v) {
                    best = v;
                    best_idx = h * p.w + w;
                }
            }
        }
        const long long e = obase + (long long)pix * p.c;
        y[e] = from_f32<T>(best);  // exact: best is an input value or -inf
        p.indices[e] = best_idx;
    }
}

// fw: divisor by the input width; fsh, fsw: by the strides.
template <typename T>
__global__ void __launch_bounds__(kPoolThreads) maxpool_backward_kernel(const cdcl_maxpool_params p, unsigned tiles,
                                                                        FastDiv fw, FastDiv fsh, FastDiv fsw) {
    const PoolTile t = pool_tile(p.h * p.w, tiles);
    if (t.c >= p.c) return;
    const T* dy = static_cast<const T*>(p.dy);
    T* dx = static_cast<T*>(p.dx);
    const long long base = (long long)t.n * p.p * p.q * p.c + t.c;
    const long long xbase = (long long)t.n * p.h * p.w * p.c + t.c;
    for (int self = t.pix0; self < t.pix1; self += kPoolRows) {
        const int h = fw.div(self), w = self - h * p.w;
        // Outputs whose window [o*stride - pad, o*stride - pad + kernel) covers h (likewise w).
        const int hp = h + p.pad_h, wp = w + p.pad_w;
        const int p0 = hp < p.kernel_h ? 0 : fsh.div(hp - p.kernel_h) + 1;
        const int p1 = min(fsh.div(hp) + 1, p.p);
        const int q0 = wp < p.kernel_w ? 0 : fsw.div(wp - p.kernel_w) + 1;
        const int q1 = min(fsw.div(wp) + 1, p.q);
        float acc = 0.0f;
        for (int op = p0; op < p1; ++op) {
            for (int oq = q0; oq < q1; ++oq) {
                const long long o = base + ((long long)op * p.q + oq) * p.c;
                if (p.indices[o] == self) acc += to_f32(dy[o]);  // dy read only on a match
            }
        }
        dx[xbase + (long long)self * p.c] = from_f32<T>(acc);
    }
}

__host__ inline bool maxpool_params_ok(const cdcl_maxpool_params* p) {
    if (!p || p->n <= 0 || p->h <= 0 || p->w <= 0 || p->c <= 0 || p->kernel_h <= 0 || p->kernel_w <= 0) return false;
    if (p->stride_h <= 0 || p->stride_w <= 0 || p->pad_h < 0 || p->pad_w < 0) return false;
    if (2 * p->pad_h > p->kernel_h || 2 * p->pad_w > p->kernel_w) return false;  // every window meets the image
    const long long ph = ((long long)p->h + 2LL * p->pad_h - p->kernel_h) / p->stride_h + 1;
    const long long pw = ((long long)p->w + 2LL * p->pad_w - p->kernel_w) / p->stride_w + 1;
    if ((long long)p->h + 2LL * p->pad_h < p->kernel_h || (long long)p->w + 2LL * p->pad_w < p->kernel_w) return false;
    return ph == p->p && pw == p->q && (long long)p->h * p->w <= 2147483647LL - kPoolTile && p->indices &&
           (long long)p->n * (((long long)p->h * p->w + kPoolTile - 1) / kPoolTile) <= 2147483647LL &&
           (p->c + kPoolChans - 1) / kPoolChans < 65536;
}

}  // namespace CDCL_NAMESPACE

using namespace CDCL_NAMESPACE;

CDCL_API int32_t CDCL_PREFIX(maxpool_forward)(const cdcl_maxpool_params* pp, void* stream) {
    if (!maxpool_params_ok(pp) || !pp->x || !pp->y) return CDCL_ERR_INVALID_PARAMS;
    const cdcl_maxpool_params p = *pp;
    const unsigned tiles = ceil_div((unsigned)(p.p * p.q), kPoolTile);
    const dim3 grid((unsigned)p.n * tiles, ceil_div((unsigned)p.c, kPoolChans), 1);
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        return CDCL_LAUNCH(maxpool_forward_kernel<T>, grid, dim3(kPoolChans, kPoolRows), 0, stream, p, tiles,
                           FastDiv(p.q));
    });
}

CDCL_API int32_t CDCL_PREFIX(maxpool_backward)(const cdcl_maxpool_params* pp, void* stream) {
    if (!maxpool_params_ok(pp) || !pp->dy || !pp->dx) return CDCL_ERR_INVALID_PARAMS;
    const cdcl_maxpool_params p = *pp;
    const unsigned tiles = ceil_div((unsigned)(p.h * p.w), kPoolTile);
    const dim3 grid((unsigned)p.n * tiles, ceil_div((unsigned)p.c, kPoolChans), 1);
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        return CDCL_LAUNCH(maxpool_backward_kernel<T>, grid, dim3(kPoolChans, kPoolRows), 0, stream, p, tiles,
                           FastDiv(p.w), FastDiv(p.stride_h), FastDiv(p.stride_w));
    });
}
