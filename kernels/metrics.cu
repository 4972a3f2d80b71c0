// Evaluation kernels of a multi-head segmentation model:
//  - argmax:           per pixel, the class of the largest logit of the sample's own head;
//  - confusion_matrix: per dataset, counts of (label, prediction) pairs over non-ignored pixels.
//
//   argmax:           metrics_validate_datasets -> argmax_pixels
//   confusion_matrix: confusion_validate -> confusion_count
//
// The first kernel of each op only validates; the second returns at once when the error record
// holds an entry, so bad data writes nothing. Counts use integer atomics, whose result does not
// depend on the order in which they land. Design and cost model: docs/kernels.md.
#include "cdcl_device.cuh"

namespace CDCL_NAMESPACE {

constexpr int kMetricThreads = 256;
constexpr unsigned kMetricMaxBlocks = 1024;
// Pixels of one sample per confusion block: amortises the zeroing and flushing of the block's
// shared histogram over 16 pixels per thread.
constexpr int kHistPixels = 4096;
// Histogram bins kept in shared memory (32 KiB of int); larger heads count in global memory.
constexpr int kMaxSharedBins = 8192;

__host__ inline unsigned metric_blocks(long long work) {
    const long long b = (work + kMetricThreads - 1) / kMetricThreads;
    return (unsigned)(b < 1 ? 1 : (b > kMetricMaxBlocks ? kMetricMaxBlocks : b));
}

__device__ __forceinline__ int metric_label(const void* labels, int label_dtype, long long pix) {
    if (label_dtype == CDCL_DTYPE_U8) return (int)static_cast<const unsigned char*>(labels)[pix];
    return static_cast<const int32_t*>(labels)[pix];
}

__global__ void metrics_validate_datasets(const int32_t* dataset, int n, int num_datasets, cdcl_error_record* err) {
    for (int i = (int)threadIdx.x; i < n; i += (int)blockDim.x) {
        const int d = dataset[i];
        if (d < 0 || d >= num_datasets) raise_error(err, CDCL_ERRSLOT_DATASET_INDEX, (unsigned)i, d);
    }
}

// One thread per pixel: strict `>` keeps the first maximum on ties; a NaN wins over any number
// and the first NaN is kept (torch.argmax treats NaN as the maximum).
template <typename T>
__global__ void __launch_bounds__(kMetricThreads) argmax_pixels(const cdcl_argmax_params p) {
    if (error_raised(p.err)) return;
    const long long hw = (long long)p.h * p.w;
    const long long pixels = (long long)p.n * hw;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long pix = (long long)blockIdx.x * blockDim.x + threadIdx.x; pix < pixels; pix += stride) {
        const int d = p.dataset[pix / hw];  // in range: validated by the previous kernel
        const int classes = p.num_classes[d];
        const T* x = static_cast<const T*>(p.logits) + pix * p.cmax;
        float best = to_f32(x[0]);
        int arg = 0;
        for (int c = 1; c < classes && !isnan(best); ++c) {
            const float v = to_f32(x[c]);
            if (v > best || isnan(v)) {
                best = v;
                arg = c;
            }
        }
        p.pred[pix] = arg;
    }
}

// Every pixel: its sample's dataset index, and where the label is not ignored, the label and
// the prediction must be classes of that dataset's head.
__global__ void __launch_bounds__(kMetricThreads) confusion_validate(const cdcl_confusion_params p) {
    const long long hw = (long long)p.h * p.w;
    const long long pixels = (long long)p.n * hw;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long pix = (long long)blockIdx.x * blockDim.x + threadIdx.x; pix < pixels; pix += stride) {
        const int n = (int)(pix / hw);
        const int d = p.dataset[n];
        if (d < 0 || d >= p.num_datasets) {
            raise_error(p.err, CDCL_ERRSLOT_DATASET_INDEX, (unsigned)n, d);
            continue;
        }
        const int label = metric_label(p.labels, p.label_dtype, pix);
        if (label == CDCL_IGNORE_LABEL) continue;
        const int classes = p.num_classes[d];
        if (label < 0 || label >= classes) raise_error(p.err, CDCL_ERRSLOT_LABEL, (unsigned)pix, label);
        const int pred = p.pred[pix];
        if (pred < 0 || pred >= classes) raise_error(p.err, CDCL_ERRSLOT_PREDICTION, (unsigned)pix, pred);
    }
}

// One block per kHistPixels pixels of one sample (so of one dataset). With `shared_bins`, the
// block counts into a shared histogram of its dataset's C x C bins and adds the non-zero bins to
// the global matrix; otherwise it adds every pixel to the global matrix directly.
__global__ void __launch_bounds__(kMetricThreads) confusion_count(const cdcl_confusion_params p, int shared_bins) {
    if (error_raised(p.err)) return;
    const long long hw = (long long)p.h * p.w;
    const int blocks_per_sample = (int)((hw + kHistPixels - 1) / kHistPixels);
    const int n = (int)blockIdx.x / blocks_per_sample;
    const long long pix0 = (long long)((int)blockIdx.x % blocks_per_sample) * kHistPixels;
    const long long pix1 = pix0 + kHistPixels < hw ? pix0 + kHistPixels : hw;
    const int d = p.dataset[n];
    const int classes = p.num_classes[d];
    const int bins = classes * classes;
    int* out = p.counts + p.offsets[d];
    const int t = (int)threadIdx.x;
    if (shared_bins) {
        CDCL_DYNAMIC_SHARED(int, hist);
        for (int i = t; i < bins; i += (int)blockDim.x) hist[i] = 0;
        __syncthreads();
        for (long long pix = pix0 + t; pix < pix1; pix += blockDim.x) {
            const long long e = (long long)n * hw + pix;
            const int label = metric_label(p.labels, p.label_dtype, e);
            if (label != CDCL_IGNORE_LABEL) atomicAdd(&hist[label * classes + p.pred[e]], 1);
        }
        __syncthreads();
        for (int i = t; i < bins; i += (int)blockDim.x)
            if (hist[i]) atomicAdd(&out[i], hist[i]);
    } else {
        for (long long pix = pix0 + t; pix < pix1; pix += blockDim.x) {
            const long long e = (long long)n * hw + pix;
            const int label = metric_label(p.labels, p.label_dtype, e);
            if (label != CDCL_IGNORE_LABEL) atomicAdd(&out[label * classes + p.pred[e]], 1);
        }
    }
}

}  // namespace CDCL_NAMESPACE

using namespace CDCL_NAMESPACE;

CDCL_API int32_t CDCL_PREFIX(argmax)(const cdcl_argmax_params* pp, void* stream) {
    if (!pp || pp->n <= 0 || pp->h <= 0 || pp->w <= 0 || pp->cmax <= 0 || pp->num_datasets <= 0 || !pp->dataset ||
        !pp->num_classes || !pp->logits || !pp->pred || !pp->err || (long long)pp->n * pp->h * pp->w > 2147483647LL)
        return CDCL_ERR_INVALID_PARAMS;
    const cdcl_argmax_params p = *pp;
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        int st = CDCL_LAUNCH(metrics_validate_datasets, dim3(1), dim3(kMetricThreads), 0, stream, p.dataset, p.n,
                             p.num_datasets, p.err);
        const long long pixels = (long long)p.n * p.h * p.w;
        if (st == CDCL_OK)
            st = CDCL_LAUNCH(argmax_pixels<T>, dim3(metric_blocks(pixels)), dim3(kMetricThreads), 0, stream, p);
        return st;
    });
}

CDCL_API int32_t CDCL_PREFIX(confusion_matrix)(const cdcl_confusion_params* pp, void* stream) {
    if (!pp || pp->n <= 0 || pp->h <= 0 || pp->w <= 0 || pp->num_datasets <= 0 || pp->max_classes <= 0 ||
        !pp->dataset || !pp->num_classes || !pp->offsets || !pp->pred || !pp->labels || !pp->counts || !pp->err ||
        (long long)pp->n * pp->h * pp->w > 2147483647LL)
        return CDCL_ERR_INVALID_PARAMS;
    if (pp->label_dtype != CDCL_DTYPE_U8 && pp->label_dtype != CDCL_DTYPE_I32) return CDCL_ERR_UNSUPPORTED_DTYPE;
    const cdcl_confusion_params p = *pp;
    const long long hw = (long long)p.h * p.w;
    const long long blocks = (long long)p.n * ((hw + kHistPixels - 1) / kHistPixels);
    if (blocks > 2147483647LL) return CDCL_ERR_INVALID_PARAMS;
    const long long max_bins = (long long)p.max_classes * p.max_classes;
    const int shared_bins = max_bins <= kMaxSharedBins ? 1 : 0;
    const size_t smem = shared_bins ? (size_t)max_bins * sizeof(int) : 0;
    int st = CDCL_LAUNCH(confusion_validate, dim3(metric_blocks(p.n * hw)), dim3(kMetricThreads), 0, stream, p);
    if (st == CDCL_OK)
        st = CDCL_LAUNCH(confusion_count, dim3((unsigned)blocks), dim3(kMetricThreads), smem, stream, p, shared_bins);
    return st;
}
