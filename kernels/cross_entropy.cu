// Multi-head cross-entropy over NHWC logits: sample n belongs to dataset d = dataset[n], whose
// classifier head has num_classes[d] classes, the first num_classes[d] channels of the sample's
// logits (channels beyond are padding: never read into the loss, gradient 0). Label 255 is
// ignored. Loss_d is the mean NLL over the valid pixels of dataset d's samples; the total is
// sum_d weights[d] * Loss_d. A dataset without valid pixels contributes 0 loss and 0 gradient.
//
//   ce_partial  -> ce_finalize -> ce_dlogits (only when dlogits is requested)
//
// ce_partial validates (dataset indices, labels) and writes per-chunk partials and each
// pixel's log-sum-exp to the workspace only; the later kernels return at once when the error
// record holds an entry, so bad data writes no output. Reductions have fixed owners and a fixed
// order (warp shuffle tree, warps in order, chunks in order): no floating-point atomics. The
// design and the cost model are in docs/kernels.md.
#include "cdcl_device.cuh"

namespace CDCL_NAMESPACE {

// A chunk is up to kChunkPixels consecutive pixels of one sample (so of one dataset); one block
// of kChunkPixels threads per chunk, one pixel per thread.
constexpr int kCeChunkPixels = 256;
constexpr int kCeWarps = kCeChunkPixels / 32;
constexpr int kCeFinalizeThreads = 256;
constexpr int kCeElemThreads = 256;
constexpr unsigned kCeMaxElemBlocks = 1024;  // grid-stride beyond: ~262k threads fill an H100

struct CeGeometry {
    long long hw;      // pixels per sample
    int chunks;        // chunks per sample
    long long pixels;  // n * hw
};

__host__ __device__ __forceinline__ CeGeometry ce_geometry(const cdcl_cross_entropy_params& p) {
    CeGeometry g;
    g.hw = (long long)p.h * p.w;
    g.chunks = (int)((g.hw + kCeChunkPixels - 1) / kCeChunkPixels);
    g.pixels = (long long)p.n * g.hw;
    return g;
}

// Workspace layout (floats): [0, K) loss sum per chunk, [K, 2K) valid pixels per chunk (<= 256,
// exact in f32), [2K, 2K + D) gradient scale per dataset, then one log-sum-exp per pixel.
struct CeWorkspace {
    float* loss;
    float* count;
    float* scale;
    float* lse;
};

__host__ __device__ __forceinline__ CeWorkspace ce_workspace(const cdcl_cross_entropy_params& p) {
    const CeGeometry g = ce_geometry(p);
    const long long k = (long long)p.n * g.chunks;
    CeWorkspace ws;
    ws.loss = p.workspace;
    ws.count = p.workspace + k;
    ws.scale = p.workspace + 2 * k;
    ws.lse = p.workspace + 2 * k + p.num_datasets;
    return ws;
}

__device__ __forceinline__ int ce_label(const void* labels, int label_dtype, long long pix) {
    if (label_dtype == CDCL_DTYPE_U8) return (int)static_cast<const unsigned char*>(labels)[pix];
    return static_cast<const int32_t*>(labels)[pix];
}

// Dataset of sample n, or -1 when it is out of range (ce_partial reports it).
__device__ __forceinline__ int ce_dataset_of(const cdcl_cross_entropy_params& p, int n) {
    const int d = p.dataset[n];
    return (d >= 0 && d < p.num_datasets) ? d : -1;
}

// Sum over the block's threads in a fixed order: shuffle tree within each warp, then the warp
// sums in warp order by thread 0. Every thread of the block must call it. Valid in thread 0.
__device__ __forceinline__ float block_sum(float v, float* s_warp) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    const int lane = (int)threadIdx.x % 32, warp = (int)threadIdx.x / 32;
    if (lane == 0) s_warp[warp] = v;
    __syncthreads();
    float total = 0.0f;
    if (threadIdx.x == 0)
        for (int i = 0; i < (int)(blockDim.x / 32); ++i) total += s_warp[i];
    return total;
}

// One block per chunk of one sample, one thread per pixel: checks the label, computes the
// log-sum-exp of the sample's head in one online pass (running max m and sum s of exp(x - m)),
// and the NLL lse - x[label]. Writes lse per pixel and (loss sum, valid count) per chunk.
template <typename T>
__global__ void __launch_bounds__(kCeChunkPixels) ce_partial(const cdcl_cross_entropy_params p) {
    const CeGeometry g = ce_geometry(p);
    const CeWorkspace ws = ce_workspace(p);
    const int chunk = (int)blockIdx.x;
    const int n = chunk / g.chunks;
    const int d = ce_dataset_of(p, n);
    if (d < 0) {  // uniform across the block: every thread leaves before any barrier
        if (threadIdx.x == 0) raise_error(p.err, CDCL_ERRSLOT_DATASET_INDEX, (unsigned)n, p.dataset[n]);
        return;
    }
    const int classes = p.num_classes[d];
    const long long local = (long long)(chunk % g.chunks) * kCeChunkPixels + threadIdx.x;
    float loss = 0.0f, valid = 0.0f;
    if (local < g.hw) {
        const long long pix = (long long)n * g.hw + local;
        const int label = ce_label(p.labels, p.label_dtype, pix);
        if (label != CDCL_IGNORE_LABEL) {
            if (label < 0 || label >= classes) {
                raise_error(p.err, CDCL_ERRSLOT_LABEL, (unsigned)pix, label);
            } else {
                const T* x = static_cast<const T*>(p.logits) + pix * p.cmax;
                float m = to_f32(x[0]), s = 1.0f;
                for (int c = 1; c < classes; ++c) {
                    const float v = to_f32(x[c]);
                    if (v > m) {
                        s = fmaf(s, expf(m - v), 1.0f);
                        m = v;
                    } else {
                        s += expf(v - m);
                    }
                }
                const float lse = m + logf(s);
                ws.lse[pix] = lse;
                loss = lse - to_f32(x[label]);
                valid = 1.0f;
            }
        }
    }
    CDCL_SHARED(float, s_loss, [kCeWarps]);
    CDCL_SHARED(float, s_valid, [kCeWarps]);
    const float loss_sum = block_sum(loss, s_loss);
    const float valid_sum = block_sum(valid, s_valid);
    if (threadIdx.x == 0) {
        ws.loss[chunk] = loss_sum;
        ws.count[chunk] = valid_sum;
    }
}

// One block: per dataset, the chunks of its samples are summed (each thread a fixed stride of
// chunks, then a fixed tree), giving Loss_d = sum / valid (0 without valid pixels) and the
// gradient scale w_d * grad_scale / valid; thread 0 adds the weighted total in dataset order.
__global__ void __launch_bounds__(kCeFinalizeThreads) ce_finalize(const cdcl_cross_entropy_params p) {
    if (error_raised(p.err)) return;
    const CeGeometry g = ce_geometry(p);
    const CeWorkspace ws = ce_workspace(p);
    const int chunks = p.n * g.chunks;
    CDCL_SHARED(float, s_loss, [kCeFinalizeThreads]);
    CDCL_SHARED(int, s_count, [kCeFinalizeThreads]);
    const int t = (int)threadIdx.x;
    float total = 0.0f;
    for (int d = 0; d < p.num_datasets; ++d) {
        float loss = 0.0f;
        int count = 0;
        for (int k = t; k < chunks; k += kCeFinalizeThreads) {
            if (ce_dataset_of(p, k / g.chunks) != d) continue;
            loss += ws.loss[k];
            count += (int)ws.count[k];
        }
        s_loss[t] = loss;
        s_count[t] = count;
        __syncthreads();
        for (int stride = kCeFinalizeThreads / 2; stride > 0; stride >>= 1) {
            if (t < stride) {
                s_loss[t] += s_loss[t + stride];
                s_count[t] += s_count[t + stride];
            }
            __syncthreads();
        }
        if (t == 0) {
            const int valid = s_count[0];
            const float mean = valid > 0 ? s_loss[0] / (float)valid : 0.0f;
            p.loss[1 + d] = mean;
            ws.scale[d] = valid > 0 ? p.weights[d] * p.grad_scale / (float)valid : 0.0f;
            total = fmaf(p.weights[d], mean, total);
        }
        __syncthreads();  // s_loss / s_count are reused by the next dataset
    }
    if (t == 0) p.loss[0] = total;
}

// One thread per logit element (coalesced in NHWC): (softmax - onehot) * scale of the sample's
// dataset inside its head, 0 on padding channels and on ignored pixels.
template <typename T>
__global__ void __launch_bounds__(kCeElemThreads) ce_dlogits(const cdcl_cross_entropy_params p) {
    if (error_raised(p.err)) return;
    const CeGeometry g = ce_geometry(p);
    const CeWorkspace ws = ce_workspace(p);
    const T* x = static_cast<const T*>(p.logits);
    T* dx = static_cast<T*>(p.dlogits);
    const long long total = g.pixels * p.cmax;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const long long pix = e / p.cmax;
        const int c = (int)(e - pix * p.cmax);
        const int d = ce_dataset_of(p, (int)(pix / g.hw));
        float v = 0.0f;
        if (d >= 0 && c < p.num_classes[d]) {
            const int label = ce_label(p.labels, p.label_dtype, pix);
            if (label != CDCL_IGNORE_LABEL) {
                const float prob = expf(to_f32(x[e]) - ws.lse[pix]);
                v = (prob - (c == label ? 1.0f : 0.0f)) * ws.scale[d];
            }
        }
        dx[e] = from_f32<T>(v);
    }
}

__host__ inline bool ce_params_ok(const cdcl_cross_entropy_params* p) {
    if (!p || p->n <= 0 || p->h <= 0 || p->w <= 0 || p->cmax <= 0 || p->num_datasets <= 0) return false;
    if (p->label_dtype != CDCL_DTYPE_U8 && p->label_dtype != CDCL_DTYPE_I32) return false;
    const CeGeometry g = ce_geometry(*p);
    return p->dataset && p->num_classes && p->weights && p->logits && p->labels && p->loss && p->workspace &&
           p->err && g.pixels <= 2147483647LL && (long long)p->n * g.chunks <= 2147483647LL;
}

__host__ inline unsigned ce_elem_blocks(const cdcl_cross_entropy_params& p) {
    const long long total = ce_geometry(p).pixels * p.cmax;
    const long long b = (total + kCeElemThreads - 1) / kCeElemThreads;
    return (unsigned)(b < 1 ? 1 : (b > kCeMaxElemBlocks ? kCeMaxElemBlocks : b));
}

}  // namespace CDCL_NAMESPACE

using namespace CDCL_NAMESPACE;

CDCL_API size_t CDCL_PREFIX(cross_entropy_workspace_bytes)(const cdcl_cross_entropy_params* p) {
    if (!p || p->n <= 0 || p->h <= 0 || p->w <= 0 || p->num_datasets <= 0) return 0;
    const CeGeometry g = ce_geometry(*p);
    return (2 * (size_t)p->n * (size_t)g.chunks + (size_t)p->num_datasets + (size_t)g.pixels) * sizeof(float);
}

CDCL_API int32_t CDCL_PREFIX(cross_entropy)(const cdcl_cross_entropy_params* pp, void* stream) {
    if (!ce_params_ok(pp)) return CDCL_ERR_INVALID_PARAMS;
    const cdcl_cross_entropy_params p = *pp;
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        const unsigned chunks = (unsigned)(p.n * ce_geometry(p).chunks);
        int st = CDCL_LAUNCH(ce_partial<T>, dim3(chunks), dim3(kCeChunkPixels), 0, stream, p);
        if (st == CDCL_OK) st = CDCL_LAUNCH(ce_finalize, dim3(1), dim3(kCeFinalizeThreads), 0, stream, p);
        if (st == CDCL_OK && p.dlogits)
            st = CDCL_LAUNCH(ce_dlogits<T>, dim3(ce_elem_blocks(p)), dim3(kCeElemThreads), 0, stream, p);
        return st;
    });
}
