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
constexpr unsigned kDropMaxBlocks = 4096;

__device__ __forceinline__ unsigned long long splitmix64_at(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed + (i + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__global__ void __launch_bounds__(kDropThreads) dropout_mask(const cdcl_dropout_params p) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)p.n * p.c) return;
    const unsigned long long n = (unsigned long long)(i / p.c), c = (unsigned long long)(i % p.c);
    const unsigned long long h = splitmix64_at(p.seed, (n << 32) | c);
    const float u = (float)(unsigned)(h >> 40) * 5.9604644775390625e-8f;  // 2^-24
    // Stored as 0 for a dropped channel, so the apply kernel never forms 0 * inf.
    p.workspace[i] = u < p.p ? 0.0f : 1.0f / (1.0f - p.p);
}

template <typename T>
__global__ void __launch_bounds__(kDropThreads) dropout_apply(const cdcl_dropout_params p) {
    const long long hwc = (long long)p.h * p.w * p.c;
    const long long total = (long long)p.n * hwc;
    const T* x = static_cast<const T*>(p.x);
    T* y = static_cast<T*>(p.y);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const long long nc = (e / hwc) * p.c + e % p.c;
        const float m = p.workspace[nc];
        y[e] = from_f32<T>(m == 0.0f ? 0.0f : to_f32(x[e]) * m);
    }
}

__host__ inline bool dropout_params_ok(const cdcl_dropout_params* p) {
    return p && p->n > 0 && p->h > 0 && p->w > 0 && p->c > 0 && p->p >= 0.0f && p->p <= 1.0f && p->x && p->y &&
           p->workspace;
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
    const long long total = nc * p.h * p.w;
    const long long eb = (total + kDropThreads - 1) / kDropThreads;
    const unsigned elem_blocks = (unsigned)(eb > kDropMaxBlocks ? kDropMaxBlocks : eb);
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        int st = CDCL_LAUNCH(dropout_mask, dim3((unsigned)((nc + kDropThreads - 1) / kDropThreads)), dim3(kDropThreads), 0,
                             stream, p);
        if (st == CDCL_OK) st = CDCL_LAUNCH(dropout_apply<T>, dim3(elem_blocks), dim3(kDropThreads), 0, stream, p);
        return st;
    });
}
