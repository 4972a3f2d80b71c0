// Dropout2d (PyTorch's nn.Dropout2d in training mode) over NHWC activations: every channel c of
// every sample n is either dropped (all its H*W values become 0) or kept and scaled by
// 1 / (1 - p). The decision is a pure function of (seed, n, c), so forward and backward (the
// same map applied to dy) agree without storing a mask, and the CPU reference reproduces it:
//
//   h = splitmix64 output number i = n * 2^32 + c of the stream seeded with `seed`
//     = mix64(seed + (i + 1) * 0x9E3779B97F4A7C15)
//   u = (h >> 40) / 2^24            (24 bits: exact in f32)
//   dropped  <=>  u < p             (p = 0 keeps everything, p = 1 drops everything)
//
// A dropped channel is written as exact zeros (not x * 0), so p = 1 gives zeros even where x
// holds an inf or a NaN; PyTorch's x * 0 would keep the NaN there.
//
//   dropout_mask:  one thread per (n, c): the multiplier 0 or 1 / (1 - p) into the workspace.
//   dropout_apply: grid-stride over the elements, y = x * multiplier[n, c] (or 0).
// Design and cost model: docs/kernels.md.
#include "cdcl_device.cuh"

namespace CDCL_NAMESPACE {

constexpr int kDropThreads = 256;

__device__ __forceinline__ unsigned long long splitmix64_at(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed + (i + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__global__ void __launch_bounds__(kDropThreads) dropout_mask(const cdcl_dropout_params p) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);  // n * c < 2^31 (dropout_params_ok)
    if (i >= p.n * p.c) return;
    const unsigned long long n = (unsigned)(i / p.c), c = (unsigned)(i % p.c);
    const unsigned long long h = splitmix64_at(p.seed, (n << 32) | c);
    const float u = (float)(unsigned)(h >> 40) * 5.9604644775390625e-8f;  // 2^-24
    // Stored as 0 for a dropped channel, so the apply kernel never forms 0 * inf.
    p.workspace[i] = u < p.p ? 0.0f : 1.0f / (1.0f - p.p);
}

// y = x * mask[n, c]. A block covers kDropTile pixels x 32 channels of one sample (grid x:
// sample-major pixel tiles, y: channel blocks), so a thread's mask value is fixed: one load, then
// per element a load, a multiply and a store, with no index division (tests/sass.rs).
constexpr int kDropTile = 64;
constexpr int kDropChans = 32;
constexpr int kDropRows = kDropThreads / kDropChans;

template <typename T>
__global__ void __launch_bounds__(kDropThreads) dropout_apply(const cdcl_dropout_params p, unsigned tiles_per_sample) {
    const int n = (int)(blockIdx.x / tiles_per_sample);
    const int tile = (int)(blockIdx.x - (unsigned)n * tiles_per_sample);
    const int c = (int)(blockIdx.y * kDropChans + threadIdx.x);
    if (c >= p.c) return;
    const int hw = p.h * p.w;
    const float m = p.workspace[(long long)n * p.c + c];
    const long long base = (long long)n * hw * p.c + c;
    const int pix1 = (tile + 1) * kDropTile < hw ? (tile + 1) * kDropTile : hw;
    const T* x = static_cast<const T*>(p.x);
    T* y = static_cast<T*>(p.y);
    for (int pix = tile * kDropTile + (int)threadIdx.y; pix < pix1; pix += kDropRows) {
        const long long e = base + (long long)pix * p.c;
        y[e] = from_f32<T>(m == 0.0f ? 0.0f : to_f32(x[e]) * m);
    }
}

__host__ inline bool dropout_params_ok(const cdcl_dropout_params* p) {
    return p && p->n > 0 && p->h > 0 && p->w > 0 && p->c > 0 && p->p >= 0.0f && p->p <= 1.0f && p->x && p->y &&
           p->workspace && (long long)p->n * p->c <= 2147483647LL - kDropThreads && (long long)p->h * p->w <= 2147483647LL - kDropTile &&
           (long long)p->n * (((long long)p->h * p->w + kDropTile - 1) / kDropTile) <= 2147483647LL &&
           (p->c + kDropChans - 1) / kDropChans < 65536;
}

}  // namespace CDCL_NAMESPACE

using namespace CDCL_NAMESPACE;

CDCL_API size_t CDCL_PREFIX(dropout_workspace_bytes)(const cdcl_dropout_params* p) {
    if (!p || p->n <= 0 || p->c <= 0) return 0;
    return (size_t)p->n * (size_t)p->c * sizeof(float);
}

CDCL_API int32_t CDCL_PREFIX(dropout2d)(const cdcl_dropout_params* pp, void* stream) {
    if (!dropout_params_ok(pp)) return CDCL_ERR_INVALID_PARAMS;
    const cdcl_dropout_params p = *pp;
    const long long nc = (long long)p.n * p.c;
    const unsigned tiles = ceil_div((unsigned)(p.h * p.w), kDropTile);
    const dim3 grid((unsigned)p.n * tiles, ceil_div((unsigned)p.c, kDropChans), 1);
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        int st = CDCL_LAUNCH(dropout_mask, dim3((unsigned)((nc + kDropThreads - 1) / kDropThreads)), dim3(kDropThreads), 0,
                             stream, p);
        if (st == CDCL_OK) st = CDCL_LAUNCH(dropout_apply<T>, grid, dim3(kDropChans, kDropRows), 0, stream, p, tiles);
        return st;
    });
}
