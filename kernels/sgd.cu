// Multi-tensor SGD with momentum and weight decay (PyTorch's torch.optim.SGD with dampening 0 and
// nesterov off), f32, in place, every parameter tensor of a model in ONE launch:
//
//   d   = g + weight_decay * p
//   buf = first_step ? d : momentum * buf + d
//   p   = p - lr * buf                       (lr per tensor: per-parameter-group learning rates)
//
// The tensors are described by a table in device memory (cdcl_sgd_tensor: pointers, length, lr,
// index of the tensor's first chunk). Block b updates chunk b: it finds its tensor by a binary
// search over first_chunk (the table is tiny and stays in L1/L2), then each of its 256 threads
// updates every 256th element of the chunk's CDCL_SGD_CHUNK elements (coalesced). Every element
// is owned by one thread: deterministic, no atomics. On the first step the momentum buffer is
// only written, never read.
//
// Frozen rows: a DSBN table [D, C] holds one row per dataset, and the rows of datasets absent
// from a step must stay bit-for-bit as they were (weight decay and momentum would otherwise move
// them although their gradient is zero), as separate per-dataset BatchNorm modules would. Masking
// them here saves the trainer a device->host->device copy of every such table per step. The mask
// is uniform per tensor, so a tensor without frozen rows pays one uniform branch per block and
// runs the unmasked loop. In the masked loop each thread tracks its row incrementally (one
// division per thread, not per element), and skipped elements are not even loaded, so a frozen
// row costs no memory traffic. Design and cost model: docs/kernels.md.
#include "cdcl_device.cuh"

namespace CDCL_NAMESPACE {

constexpr int kSgdThreads = 256;

__device__ __forceinline__ void sgd_update(const cdcl_sgd_params& p, const cdcl_sgd_tensor& t, long long i) {
    const float w = t.param[i];
    const float d = fmaf(p.weight_decay, w, t.grad[i]);
    const float buf = p.first_step ? d : fmaf(p.momentum, t.momentum_buffer[i], d);
    t.momentum_buffer[i] = buf;
    t.param[i] = fmaf(-t.lr, buf, w);
}

// Blocks that fill an SM's resident threads (CUDA C++ Programming Guide, table of compute
// capabilities: 1536 on 8.6, 8.9 and 12.x, 2048 on the others). Asking for them keeps the masked
// loop's row tracking from costing every tensor occupancy: without the bound ptxas gives the
// kernel 36 registers on sm_80 / sm_90, so only 7 of 8 blocks fit.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 890 || __CUDA_ARCH__ >= 1200)
constexpr int kSgdMinBlocks = 1536 / kSgdThreads;
#else
constexpr int kSgdMinBlocks = 2048 / kSgdThreads;
#endif

__global__ void __launch_bounds__(kSgdThreads, kSgdMinBlocks) sgd_step_kernel(const cdcl_sgd_params p) {
    const long long chunk = (long long)blockIdx.x;
    // The last tensor whose first chunk is <= this chunk.
    int lo = 0, hi = p.num_tensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (p.tensors[mid].first_chunk <= chunk)
            lo = mid;
        else
            hi = mid - 1;
    }
    const cdcl_sgd_tensor t = p.tensors[lo];
    if (chunk < t.first_chunk) return;
    const long long begin = (chunk - t.first_chunk) * CDCL_SGD_CHUNK;
    const long long end = begin + CDCL_SGD_CHUNK < t.numel ? begin + CDCL_SGD_CHUNK : t.numel;
    if (t.frozen_rows != 0 && t.row_len < 1) return;  // no row to tell frozen from free: touch nothing
    // Only rows 0..63 can be frozen: a chunk that starts beyond them needs no mask either.
    if (t.frozen_rows == 0 || begin / t.row_len >= 64) {
        for (long long i = begin + threadIdx.x; i < end; i += kSgdThreads)
            sgd_update(p, t, i);
        return;
    }
    // The thread's row and offset in it, advanced by kSgdThreads elements per iteration.
    const long long row_step = kSgdThreads / t.row_len, rem_step = kSgdThreads % t.row_len;
    long long i = begin + threadIdx.x;
    long long row = i / t.row_len, rem = i % t.row_len;
    for (; i < end; i += kSgdThreads) {
        if (row >= 64 || ((t.frozen_rows >> row) & 1ull) == 0) sgd_update(p, t, i);
        row += row_step;
        rem += rem_step;
        if (rem >= t.row_len) {
            rem -= t.row_len;
            ++row;
        }
    }
}

}  // namespace CDCL_NAMESPACE

using namespace CDCL_NAMESPACE;

CDCL_API int32_t CDCL_PREFIX(sgd_step)(const cdcl_sgd_params* pp, void* stream) {
    if (!pp || !pp->tensors || pp->num_tensors <= 0 || pp->total_chunks <= 0 || pp->total_chunks > 2147483647LL)
        return CDCL_ERR_INVALID_PARAMS;
    const cdcl_sgd_params p = *pp;
    return CDCL_LAUNCH(sgd_step_kernel, dim3((unsigned)p.total_chunks), dim3(kSgdThreads), 0, stream, p);
}
