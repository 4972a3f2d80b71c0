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

constexpr int kPoolThreads = 256;
constexpr unsigned kPoolMaxBlocks = 4096;  // grid-stride beyond (~1M threads)

__host__ inline unsigned pool_blocks(long long total) {
    const long long b = (total + kPoolThreads - 1) / kPoolThreads;
    return (unsigned)(b < 1 ? 1 : (b > kPoolMaxBlocks ? kPoolMaxBlocks : b));
}

template <typename T>
__global__ void __launch_bounds__(kPoolThreads) maxpool_forward_kernel(const cdcl_maxpool_params p) {
    const long long total = (long long)p.n * p.p * p.q * p.c;
    const T* x = static_cast<const T*>(p.x);
    T* y = static_cast<T*>(p.y);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int c = (int)(e % p.c);
        long long t = e / p.c;
        const int q = (int)(t % p.q);
        t /= p.q;
        const int pp = (int)(t % p.p);
        const int n = (int)(t / p.p);
        const int h0 = pp * p.stride_h - p.pad_h, w0 = q * p.stride_w - p.pad_w;
        const int h1 = min(h0 + p.kernel_h, p.h), w1 = min(w0 + p.kernel_w, p.w);
        const int hs = max(h0, 0), ws = max(w0, 0);
        const T* plane = x + (long long)n * p.h * p.w * p.c + c;
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
        y[e] = from_f32<T>(best);  // exact: best is an input value or -inf
        p.indices[e] = best_idx;
    }
}

template <typename T>
__global__ void __launch_bounds__(kPoolThreads) maxpool_backward_kernel(const cdcl_maxpool_params p) {
    const long long total = (long long)p.n * p.h * p.w * p.c;
    const T* dy = static_cast<const T*>(p.dy);
    T* dx = static_cast<T*>(p.dx);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int c = (int)(e % p.c);
        long long t = e / p.c;
        const int w = (int)(t % p.w);
        t /= p.w;
        const int h = (int)(t % p.h);
        const int n = (int)(t / p.h);
        // Outputs whose window [o*stride - pad, o*stride - pad + kernel) covers h (likewise w).
        const int hp = h + p.pad_h, wp = w + p.pad_w;
        const int p0 = hp < p.kernel_h ? 0 : (hp - p.kernel_h) / p.stride_h + 1;
        const int p1 = min(hp / p.stride_h + 1, p.p);
        const int q0 = wp < p.kernel_w ? 0 : (wp - p.kernel_w) / p.stride_w + 1;
        const int q1 = min(wp / p.stride_w + 1, p.q);
        const int self = h * p.w + w;
        const long long base = (long long)n * p.p * p.q * p.c + c;
        float acc = 0.0f;
        for (int op = p0; op < p1; ++op) {
            for (int oq = q0; oq < q1; ++oq) {
                const long long o = base + ((long long)op * p.q + oq) * p.c;
                if (p.indices[o] == self) acc += to_f32(dy[o]);  // dy read only on a match
            }
        }
        dx[e] = from_f32<T>(acc);
    }
}

__host__ inline bool maxpool_params_ok(const cdcl_maxpool_params* p) {
    if (!p || p->n <= 0 || p->h <= 0 || p->w <= 0 || p->c <= 0 || p->kernel_h <= 0 || p->kernel_w <= 0) return false;
    if (p->stride_h <= 0 || p->stride_w <= 0 || p->pad_h < 0 || p->pad_w < 0) return false;
    if (2 * p->pad_h > p->kernel_h || 2 * p->pad_w > p->kernel_w) return false;  // every window meets the image
    const long long ph = ((long long)p->h + 2LL * p->pad_h - p->kernel_h) / p->stride_h + 1;
    const long long pw = ((long long)p->w + 2LL * p->pad_w - p->kernel_w) / p->stride_w + 1;
    if ((long long)p->h + 2LL * p->pad_h < p->kernel_h || (long long)p->w + 2LL * p->pad_w < p->kernel_w) return false;
    return ph == p->p && pw == p->q && (long long)p->h * p->w <= 2147483647LL && p->indices;
}

}  // namespace CDCL_NAMESPACE

using namespace CDCL_NAMESPACE;

CDCL_API int32_t CDCL_PREFIX(maxpool_forward)(const cdcl_maxpool_params* pp, void* stream) {
    if (!maxpool_params_ok(pp) || !pp->x || !pp->y) return CDCL_ERR_INVALID_PARAMS;
    const cdcl_maxpool_params p = *pp;
    const long long total = (long long)p.n * p.p * p.q * p.c;
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        return CDCL_LAUNCH(maxpool_forward_kernel<T>, dim3(pool_blocks(total)), dim3(kPoolThreads), 0, stream, p);
    });
}

CDCL_API int32_t CDCL_PREFIX(maxpool_backward)(const cdcl_maxpool_params* pp, void* stream) {
    if (!maxpool_params_ok(pp) || !pp->dy || !pp->dx) return CDCL_ERR_INVALID_PARAMS;
    const cdcl_maxpool_params p = *pp;
    const long long total = (long long)p.n * p.h * p.w * p.c;
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        return CDCL_LAUNCH(maxpool_backward_kernel<T>, dim3(pool_blocks(total)), dim3(kPoolThreads), 0, stream, p);
    });
}
