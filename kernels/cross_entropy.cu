// Multi-head cross-entropy over NHWC logits: sample n belongs to dataset d = dataset[n], whose
// classifier head has num_classes[d] classes, the first num_classes[d] channels of the sample's
// logits (channels beyond are padding: never read into the loss, gradient 0). Label 255 is
// ignored. Loss_d is the mean NLL over the valid pixels of dataset d's samples; the total is
// sum_d weights[d] * Loss_d. A dataset without valid pixels contributes 0 loss and 0 gradient.
//
//   ce_partial  -> ce_finalize -> ce_dlogits (only when dlogits is requested)
//
// With `upsample`, the logits are at a lower resolution than the labels (PSPNet predicts at
// 1/8 and upsamples bilinearly before the loss): ce_partial interpolates each label pixel's
// logits on the fly with the taps of resize.cuh, and ce_dlogits_up writes the gradient with
// respect to the low-resolution logits as a gather — one thread per low-resolution element sums
// the gradients of the label pixels that read it, recomputed in place, in the order of the
// resize backward — so the upsampled logits and their gradient never exist in memory.
//
// ce_partial validates (dataset indices, labels) and writes per-chunk partials and each
// pixel's log-sum-exp to the workspace only; the later kernels return at once when the error
// record holds an entry, so bad data writes no output. Reductions have fixed owners and a fixed
// order (warp shuffle tree, warps in order, chunks in order): no floating-point atomics. The
// design and the cost model are in docs/kernels.md.
#include "cdcl_device.cuh"
#include "resize.cuh"

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

// log(sum_{c < classes} exp(logit(c))) in one online pass: running max m and sum s of
// exp(x - m). `logit(c)` returns class c's logit in f32.
template <typename Logit>
__device__ __forceinline__ float online_lse(const Logit& logit, int classes) {
    float m = logit(0), s = 1.0f;
    for (int c = 1; c < classes; ++c) {
        const float v = logit(c);
        if (v > m) {
            s = fmaf(s, expf(m - v), 1.0f);
            m = v;
        } else {
            s += expf(v - m);
        }
    }
    return m + logf(s);
}

// The logits of one pixel as stored.
template <typename T>
struct StoredLogits {
    const T* x;
    __device__ __forceinline__ float operator()(int c) const { return to_f32(x[c]); }
};

// The logits of label pixel (h, w) of sample n, bilinearly interpolated from the
// [n, logit_h, logit_w, cmax] logits: the value resize_bilinear_fwd would have stored.
template <typename T>
struct UpsampledLogits {
    const T *x00, *x01, *x10, *x11;
    Tap th, tw;
    __device__ __forceinline__ float operator()(int c) const {
        return bilerp(to_f32(x00[c]), to_f32(x01[c]), to_f32(x10[c]), to_f32(x11[c]), th, tw);
    }
};

template <typename T>
__device__ __forceinline__ UpsampledLogits<T> upsampled_logits(const cdcl_cross_entropy_params& p, int n, int h, int w) {
    const T* x = static_cast<const T*>(p.logits);
    UpsampledLogits<T> u;
    u.th = resize_tap(h, p.logit_h, resize_scale(p.logit_h, p.h, p.align_corners), p.align_corners);
    u.tw = resize_tap(w, p.logit_w, resize_scale(p.logit_w, p.w, p.align_corners), p.align_corners);
    const long long row_lo = ((long long)n * p.logit_h + u.th.lo) * p.logit_w;
    const long long row_hi = ((long long)n * p.logit_h + u.th.hi) * p.logit_w;
    u.x00 = x + (row_lo + u.tw.lo) * p.cmax;
    u.x01 = x + (row_lo + u.tw.hi) * p.cmax;
    u.x10 = x + (row_hi + u.tw.lo) * p.cmax;
    u.x11 = x + (row_hi + u.tw.hi) * p.cmax;
    return u;
}

// One block per chunk of one sample, one thread per pixel: checks the label, computes the
// log-sum-exp of the sample's head in one online pass (running max m and sum s of exp(x - m)),
// and the NLL lse - x[label]. Writes lse per pixel and (loss sum, valid count) per chunk.
// Upsample: the pixel's logits are interpolated from the low-resolution logits as they are read.
template <typename T, bool Upsample>
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
                float lse, x_label;
                if constexpr (Upsample) {
                    const int h = (int)(local / p.w);
                    const int w = (int)(local - (long long)h * p.w);
                    const UpsampledLogits<T> x = upsampled_logits<T>(p, n, h, w);
                    lse = online_lse(x, classes);
                    x_label = x(label);
                } else {
                    const StoredLogits<T> x{static_cast<const T*>(p.logits) + pix * p.cmax};
                    lse = online_lse(x, classes);
                    x_label = x(label);
                }
                ws.lse[pix] = lse;
                loss = lse - x_label;
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

// Upsample: one thread per low-resolution logit element (n, i, j, c), coalesced in NHWC. Its
// gradient is the sum over the label pixels (oh, ow) whose bilinear taps read (i, j) of
// tap weight x (softmax - onehot) * scale at (oh, ow, c), the softmax recomputed from the
// interpolated logit and the pixel's lse. The candidate pixels, the taps and the summation
// order (rows, then columns within a row, both increasing) are resize_bilinear_bwd's, and each
// pixel's term is ce_dlogits's expression: in f32 the result equals upsample -> cross-entropy
// -> resize backward bit for bit. 0 on padding channels; ignored pixels contribute 0.
template <typename T>
__global__ void __launch_bounds__(kCeElemThreads) ce_dlogits_up(const cdcl_cross_entropy_params p) {
    if (error_raised(p.err)) return;
    const CeWorkspace ws = ce_workspace(p);
    const T* x = static_cast<const T*>(p.logits);
    T* dx = static_cast<T*>(p.dlogits);
    const float sh = resize_scale(p.logit_h, p.h, p.align_corners);
    const float sw = resize_scale(p.logit_w, p.w, p.align_corners);
    const long long total = (long long)p.n * p.logit_h * p.logit_w * p.cmax;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int c = (int)(e % p.cmax);
        long long r = e / p.cmax;
        const int j = (int)(r % p.logit_w);
        r /= p.logit_w;
        const int i = (int)(r % p.logit_h);
        const int n = (int)(r / p.logit_h);
        const int d = ce_dataset_of(p, n);
        float acc = 0.0f;
        if (d >= 0 && c < p.num_classes[d]) {
            const float scale = ws.scale[d];
            int oh0, oh1, ow0, ow1;
            resize_candidates(i, p.logit_h, p.h, p.align_corners, oh0, oh1);
            resize_candidates(j, p.logit_w, p.w, p.align_corners, ow0, ow1);
            for (int oh = oh0; oh <= oh1; ++oh) {
                const Tap th = resize_tap(oh, p.logit_h, sh, p.align_corners);
                if (th.lo != i && th.hi != i) continue;
                const long long row_lo = ((long long)n * p.logit_h + th.lo) * p.logit_w;
                const long long row_hi = ((long long)n * p.logit_h + th.hi) * p.logit_w;
                float row = 0.0f;
                for (int ow = ow0; ow <= ow1; ++ow) {
                    const Tap tw = resize_tap(ow, p.logit_w, sw, p.align_corners);
                    if (tw.lo != j && tw.hi != j) continue;
                    const long long pix = ((long long)n * p.h + oh) * p.w + ow;
                    const int label = ce_label(p.labels, p.label_dtype, pix);
                    float g = 0.0f;
                    if (label != CDCL_IGNORE_LABEL) {
                        const float v = bilerp(to_f32(x[(row_lo + tw.lo) * p.cmax + c]), to_f32(x[(row_lo + tw.hi) * p.cmax + c]),
                                               to_f32(x[(row_hi + tw.lo) * p.cmax + c]), to_f32(x[(row_hi + tw.hi) * p.cmax + c]),
                                               th, tw);
                        const float prob = expf(v - ws.lse[pix]);
                        g = (prob - (c == label ? 1.0f : 0.0f)) * scale;
                    }
                    row = fmaf(tap_weight(tw, j), g, row);
                }
                acc = fmaf(tap_weight(th, i), row, acc);
            }
        }
        dx[e] = from_f32<T>(acc);
    }
}

// Source indices are f32, as PyTorch's: exact integers only up to 2^24 (as pool.cu).
constexpr int kCeMaxResizeDim = 1 << 24;

__host__ inline bool ce_params_ok(const cdcl_cross_entropy_params* p) {
    if (!p || p->n <= 0 || p->h <= 0 || p->w <= 0 || p->cmax <= 0 || p->num_datasets <= 0) return false;
    if (p->label_dtype != CDCL_DTYPE_U8 && p->label_dtype != CDCL_DTYPE_I32) return false;
    if (p->upsample && (p->logit_h <= 0 || p->logit_w <= 0 || p->logit_h > kCeMaxResizeDim ||
                        p->logit_w > kCeMaxResizeDim || p->h > kCeMaxResizeDim || p->w > kCeMaxResizeDim))
        return false;
    const CeGeometry g = ce_geometry(*p);
    return p->dataset && p->num_classes && p->weights && p->logits && p->labels && p->loss && p->workspace &&
           p->err && g.pixels <= 2147483647LL && (long long)p->n * g.chunks <= 2147483647LL;
}

// Blocks for one thread per logit element (the low-resolution ones with upsample).
__host__ inline unsigned ce_elem_blocks(const cdcl_cross_entropy_params& p) {
    const long long total =
        (p.upsample ? (long long)p.n * p.logit_h * p.logit_w : ce_geometry(p).pixels) * (long long)p.cmax;
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
        int st = p.upsample ? CDCL_LAUNCH((ce_partial<T, true>), dim3(chunks), dim3(kCeChunkPixels), 0, stream, p)
                            : CDCL_LAUNCH((ce_partial<T, false>), dim3(chunks), dim3(kCeChunkPixels), 0, stream, p);
        if (st == CDCL_OK) st = CDCL_LAUNCH(ce_finalize, dim3(1), dim3(kCeFinalizeThreads), 0, stream, p);
        if (st == CDCL_OK && p.dlogits) {
            const dim3 grid(ce_elem_blocks(p));
            st = p.upsample ? CDCL_LAUNCH(ce_dlogits_up<T>, grid, dim3(kCeElemThreads), 0, stream, p)
                            : CDCL_LAUNCH(ce_dlogits<T>, grid, dim3(kCeElemThreads), 0, stream, p);
        }
        return st;
    });
}
