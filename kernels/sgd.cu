// Multi-tensor SGD with momentum and weight decay (PyTorch's torch.optim.SGD with dampening 0 and
// nesterov off), f32, in place, every parameter tensor of a model in ONE launch:
//
//   d   = g + weight_decay * p
//   buf = first_step ? d : momentum * buf + d
//   p   = p - lr * buf                       (lr per tensor: per-parameter-group learning rates)
//   copy = round(p)                          (mixed precision: the 16-bit weights convs read)
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
// row costs no memory traffic.
//
// Mixed precision: the f32 parameter is the master; its 16-bit copy (f16 or bf16, what the
// tensor-core convolutions read) is written from the updated value in the same launch (a second
// loop over the block's chunk, re-reading from L2 what the thread just wrote), so the copy costs
// 2 bytes per element of DRAM traffic and no launch. A step can be skipped on the device: with
// `skip_if` set, every block reads the flag first and returns if it is nonzero (the loss-scaling
// overflow flag that sum_scaled wrote), so an overflowing f16 step changes nothing without the
// host having to look at the flag first.
//
// sum_scaled gathers a parameter's gradient from every pass that produced one (16-bit or f32),
// sums in f32 in a fixed order, unscales, writes f32, and raises the overflow flag on any
// non-finite value: one launch for every parameter of the model. Design and cost model:
// docs/kernels.md.
#include "cdcl_device.cuh"

namespace CDCL_NAMESPACE {

constexpr int kSgdThreads = 256;

// One element of a chunk: pointers offset to the chunk's start, a 32-bit index into it (a chunk
// holds CDCL_SGD_CHUNK elements), so that the loop carries no 64-bit address arithmetic.
struct Chunk {
    float* param;
    const float* grad;
    float* buf;
    float lr;
};

__device__ __forceinline__ void sgd_update(const cdcl_sgd_params& p, const Chunk& c, int j) {
    const float w = c.param[j];
    const float d = fmaf(p.weight_decay, w, c.grad[j]);
    const float buf = p.first_step ? d : fmaf(p.momentum, c.buf[j], d);
    c.buf[j] = buf;
    c.param[j] = fmaf(-c.lr, buf, w);
}

// The 16-bit copy of the chunk's updated parameters: a second pass over the chunk after the
// update rather than a store in the update loop, so that the update loop keeps its registers
// (the launch bound holds it at full occupancy); each thread re-reads only what it just wrote
// (an L2 hit, no barrier). A tensor with frozen rows carries no copy (the launcher's caller
// refuses the pair: DSBN tables are f32 only), so every element of the chunk was updated.
template <typename C>
__device__ __forceinline__ void write_copy(const Chunk& c, C* copy, int n) {
    for (int j = threadIdx.x; j < n; j += kSgdThreads) copy[j] = from_f32<C>(c.param[j]);
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

// The last table entry whose first chunk is <= chunk (first_chunk strictly increasing).
template <typename E>
__device__ __forceinline__ int find_entry(const E* table, int count, long long chunk) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (table[mid].first_chunk <= chunk)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

// The update of one chunk of one tensor (with frozen rows among rows 0..63, the masked loop).
__device__ __forceinline__ void update_chunk(const cdcl_sgd_params& p, const cdcl_sgd_tensor& t, const Chunk& c,
                                             long long begin, int n) {
    // Only rows 0..63 can be frozen: a chunk that starts beyond them needs no mask either.
    if (t.frozen_rows == 0 || begin / t.row_len >= 64) {
        for (int j = threadIdx.x; j < n; j += kSgdThreads)
            sgd_update(p, c, j);
        return;
    }
    // The thread's row and offset in it, advanced by kSgdThreads elements per iteration.
    const long long row_len = t.row_len;
    const long long row_step = kSgdThreads / row_len, rem_step = kSgdThreads % row_len;
    const unsigned long long frozen = t.frozen_rows;
    long long row = (begin + threadIdx.x) / row_len, rem = (begin + threadIdx.x) % row_len;
    for (int j = threadIdx.x; j < n; j += kSgdThreads) {
        if (row >= 64 || ((frozen >> row) & 1ull) == 0) sgd_update(p, c, j);
        row += row_step;
        rem += rem_step;
        if (rem >= row_len) {
            rem -= row_len;
            ++row;
        }
    }
}

// Two instantiations, chosen per launch: without copies (f32 training: the update alone, held at
// full occupancy by the launch bound) and with 16-bit copies (mixed precision: the copy pointer
// and the second loop need a few more registers than 32; registers are granted in steps of 8, so
// 3/4 of the blocks per SM are asked for rather than spilling — a memory-bound loop of 256
// threads keeps the bandwidth busy at 75% occupancy).
template <bool kCopies>
__global__ void __launch_bounds__(kSgdThreads, kCopies ? kSgdMinBlocks * 3 / 4 : kSgdMinBlocks)
    sgd_step_kernel(const cdcl_sgd_params p) {
    if (p.skip_if && *p.skip_if != 0.0f) return;  // uniform: every block returns
    const long long chunk = (long long)blockIdx.x;
    const int lo = find_entry(p.tensors, p.num_tensors, chunk);
    const cdcl_sgd_tensor& t = p.tensors[lo];
    if (chunk < t.first_chunk) return;
    const long long begin = (chunk - t.first_chunk) * CDCL_SGD_CHUNK;
    const int n = (int)(begin + CDCL_SGD_CHUNK < t.numel ? CDCL_SGD_CHUNK : t.numel - begin);
    if (t.frozen_rows != 0 && t.row_len < 1) return;  // no row to tell frozen from free: touch nothing
    const Chunk c{t.param + begin, t.grad + begin, t.momentum_buffer + begin, t.lr};
    update_chunk(p, t, c, begin, n);
    if (!kCopies) return;
    void* copy = p.copies[lo];
    if (!copy) return;
    if (p.copy_dtype == CDCL_DTYPE_F16)
        write_copy(c, static_cast<__half*>(copy) + begin, n);
    else
        write_copy(c, static_cast<__nv_bfloat16*>(copy) + begin, n);
}

template <typename T>
__device__ __forceinline__ float sum_sources(const cdcl_sum_entry& e, long long i) {
    float acc = 0.0f;
    for (int s = 0; s < e.num_srcs; ++s) acc += to_f32(static_cast<const T*>(e.srcs[s])[i]);
    return acc;
}

__global__ void __launch_bounds__(kSgdThreads) sum_scaled_kernel(const cdcl_sum_params p) {
    const long long chunk = (long long)blockIdx.x;
    const cdcl_sum_entry e = p.entries[find_entry(p.entries, p.num_entries, chunk)];
    if (chunk < e.first_chunk) return;
    const long long begin = (chunk - e.first_chunk) * CDCL_SGD_CHUNK;
    const long long end = begin + CDCL_SGD_CHUNK < e.numel ? begin + CDCL_SGD_CHUNK : e.numel;
    bool bad = false;
    for (long long i = begin + threadIdx.x; i < end; i += kSgdThreads) {
        // A sum of finite f32 / f16 / bf16 values is finite unless it overflows f32, which
        // gradients of these magnitudes do not; an infinite or NaN source makes it non-finite.
        const float acc = e.src_dtype == CDCL_DTYPE_F16            ? sum_sources<__half>(e, i)
                          : e.src_dtype == CDCL_DTYPE_BF16         ? sum_sources<__nv_bfloat16>(e, i)
                                                                   : sum_sources<float>(e, i);
        bad |= !isfinite(acc);
        e.dst[i] = acc * p.scale;
    }
    // Every writer stores the bits of 1.0f: the flag's value does not depend on who wins.
    if (bad) atomicExch(reinterpret_cast<unsigned int*>(p.nonfinite), 0x3f800000u);
}

}  // namespace CDCL_NAMESPACE

using namespace CDCL_NAMESPACE;

CDCL_API int32_t CDCL_PREFIX(sgd_step)(const cdcl_sgd_params* pp, void* stream) {
    if (!pp || !pp->tensors || pp->num_tensors <= 0 || pp->total_chunks <= 0 || pp->total_chunks > 2147483647LL)
        return CDCL_ERR_INVALID_PARAMS;
    if (pp->copies && pp->copy_dtype != CDCL_DTYPE_F16 && pp->copy_dtype != CDCL_DTYPE_BF16)
        return CDCL_ERR_INVALID_PARAMS;
    const cdcl_sgd_params p = *pp;
    if (p.copies)
        return CDCL_LAUNCH(sgd_step_kernel<true>, dim3((unsigned)p.total_chunks), dim3(kSgdThreads), 0, stream, p);
    return CDCL_LAUNCH(sgd_step_kernel<false>, dim3((unsigned)p.total_chunks), dim3(kSgdThreads), 0, stream, p);
}

CDCL_API int32_t CDCL_PREFIX(sum_scaled)(const cdcl_sum_params* pp, void* stream) {
    if (!pp || !pp->entries || !pp->nonfinite || pp->num_entries <= 0 || pp->total_chunks <= 0 ||
        pp->total_chunks > 2147483647LL)
        return CDCL_ERR_INVALID_PARAMS;
    const cdcl_sum_params p = *pp;
    return CDCL_LAUNCH(sum_scaled_kernel, dim3((unsigned)p.total_chunks), dim3(kSgdThreads), 0, stream, p);
}
