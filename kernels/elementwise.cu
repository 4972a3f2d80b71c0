// Element-wise residual add, ReLU, fused add + ReLU, and the ReLU backward over any contiguous
// tensor of one storage type (f32 / f16 / bf16 storage, f32 math). Memory bound: one grid-stride
// pass, consecutive threads on consecutive elements.
//
// ReLU follows PyTorch: relu(NaN) = NaN (written `v <= 0 ? 0 : v`, which lets NaN through, where
// fmaxf(v, 0) would return 0). The backward takes its mask from the forward OUTPUT y, like
// PyTorch's threshold_backward on the result: dx = (y <= 0) ? 0 : dy, so a NaN output passes the
// gradient. For add + ReLU the same mask serves both inputs (d(a + b)/da = d(a + b)/db = 1); the
// plain add needs no kernel in backward (both inputs receive dy).
// Design and cost model: docs/kernels.md.
#include "cdcl_device.cuh"

namespace CDCL_NAMESPACE {

constexpr int kEltThreads = 256;
constexpr unsigned kEltMaxBlocks = 4096;

enum class EltOp { Add, Relu, AddRelu, ReluBackward };

__device__ __forceinline__ float relu_f32(float v) { return v <= 0.0f ? 0.0f : v; }

template <EltOp Op>
__device__ __forceinline__ float elt_apply(float a, float b) {
    if (Op == EltOp::Add) return a + b;
    if (Op == EltOp::Relu) return relu_f32(a);
    if (Op == EltOp::AddRelu) return relu_f32(a + b);
    return b <= 0.0f ? 0.0f : a;  // ReluBackward: a = dy, b = forward output
}

// The op and the storage type as one template argument (a comma would split CDCL_LAUNCH's).
template <EltOp O, typename S>
struct Elt {
    static constexpr EltOp Op = O;
    using T = S;
};

template <class K>
__global__ void __launch_bounds__(kEltThreads) eltwise_kernel(const cdcl_eltwise_params p) {
    constexpr EltOp Op = K::Op;
    using T = typename K::T;
    const T* a = static_cast<const T*>(p.a);
    const T* b = static_cast<const T*>(p.b);
    T* y = static_cast<T*>(p.y);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < p.numel; e += stride) {
        const float av = to_f32(a[e]);
        const float bv = Op == EltOp::Relu ? 0.0f : to_f32(b[e]);
        y[e] = from_f32<T>(elt_apply<Op>(av, bv));
    }
}

template <EltOp Op>
__host__ int eltwise_launch(const cdcl_eltwise_params* pp, void* stream) {
    if (!pp || pp->numel <= 0 || !pp->a || !pp->y || (Op != EltOp::Relu && !pp->b)) return CDCL_ERR_INVALID_PARAMS;
    const cdcl_eltwise_params p = *pp;
    const long long blocks = (p.numel + kEltThreads - 1) / kEltThreads;
    const unsigned grid = (unsigned)(blocks > kEltMaxBlocks ? kEltMaxBlocks : blocks);
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using K = Elt<Op, decltype(tag)>;
        return CDCL_LAUNCH(eltwise_kernel<K>, dim3(grid), dim3(kEltThreads), 0, stream, p);
    });
}

}  // namespace CDCL_NAMESPACE

using namespace CDCL_NAMESPACE;

CDCL_API int32_t CDCL_PREFIX(eltwise_add)(const cdcl_eltwise_params* p, void* stream) {
    return eltwise_launch<EltOp::Add>(p, stream);
}

CDCL_API int32_t CDCL_PREFIX(eltwise_relu)(const cdcl_eltwise_params* p, void* stream) {
    return eltwise_launch<EltOp::Relu>(p, stream);
}

CDCL_API int32_t CDCL_PREFIX(eltwise_add_relu)(const cdcl_eltwise_params* p, void* stream) {
    return eltwise_launch<EltOp::AddRelu>(p, stream);
}

CDCL_API int32_t CDCL_PREFIX(eltwise_relu_backward)(const cdcl_eltwise_params* p, void* stream) {
    return eltwise_launch<EltOp::ReluBackward>(p, stream);
}
