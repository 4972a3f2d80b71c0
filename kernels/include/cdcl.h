/*
 * cdcl.h — the C ABI between the Rust crate and the kernels. The only header Rust sees.
 *
 * Every kernel family takes ONE Params struct (CUTLASS / FlashAttention style). The same
 * launchers are compiled twice: by nvcc for the GPU (symbols `cdcl_cuda_*`) and by the host
 * C++ compiler with CDCL_EMULATE for the CPU emulator (symbols `cdcl_emu_*`). A launcher
 * returns a cdcl_status; it never aborts the process.
 *
 * `stream` is a cudaStream_t for the GPU build and a cdcl_emu_stream* for the emulator.
 */
#ifndef CDCL_H
#define CDCL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Storage element types. Statistics and accumulation are always f32. */
typedef enum cdcl_dtype {
    CDCL_DTYPE_F32 = 0,
    CDCL_DTYPE_F16 = 1,
    CDCL_DTYPE_BF16 = 2,
    CDCL_DTYPE_I32 = 3,
    CDCL_DTYPE_U8 = 4
} cdcl_dtype;

typedef enum cdcl_status {
    CDCL_OK = 0,
    /* The launcher rejected its Params (the Rust wrapper validates first, so this is a bug). */
    CDCL_ERR_INVALID_PARAMS = 1,
    /* The launch failed: a CUDA error, or an emulator fault (message: cdcl_emu_stream_last_error). */
    CDCL_ERR_LAUNCH = 2,
    /* The requested storage dtype has no instantiation of this kernel. */
    CDCL_ERR_UNSUPPORTED_DTYPE = 3
} cdcl_status;

/*
 * Bad data found on the device. Each slot holds the smallest key
 * (position << 32 | (uint32_t)value) of the errors of that kind, set with atomicMin, so the
 * reported error is the first in element order whatever the schedule. An untouched slot holds
 * CDCL_NO_ERROR. Kernels that see any slot set write nothing.
 */
#define CDCL_NO_ERROR 0xFFFFFFFFFFFFFFFFull
typedef enum cdcl_error_slot {
    /* position = sample, value = the dataset index found */
    CDCL_ERRSLOT_DATASET_INDEX = 0,
    /* position = dataset, value = number of values per channel (training BN needs > 1) */
    CDCL_ERRSLOT_TOO_FEW_VALUES = 1,
    /* position = linear element index, value = the label found */
    CDCL_ERRSLOT_LABEL = 2,
    /* position = linear pixel index, value = the predicted class found (confusion matrix) */
    CDCL_ERRSLOT_PREDICTION = 3,
    CDCL_ERRSLOT_COUNT = 4
} cdcl_error_slot;

typedef struct cdcl_error_record {
    unsigned long long first[CDCL_ERRSLOT_COUNT];
} cdcl_error_record;

/* ------------------------------------------------------------------------------------------ */
/* DSBN: dataset-specific batch normalisation, NHWC, one dataset index per sample.             */
/* ------------------------------------------------------------------------------------------ */
typedef struct cdcl_dsbn_params {
    /* x, y, dy, dx: [n, h, w, c] in `dtype`. dataset: [n] int32. Tables: [num_datasets, c] f32. */
    int32_t n;
    int32_t h;
    int32_t w;
    int32_t c;
    int32_t num_datasets;
    int32_t dtype; /* cdcl_dtype: F32, F16 or BF16 */
    int32_t relu;  /* nonzero: ReLU after the affine transform (and its mask in backward) */
    float eps;
    float momentum;
    const int32_t* dataset;
    const void* x;
    void* y;
    const void* dy;
    void* dx;
    const float* gamma;
    const float* beta;
    float* running_mean; /* updated in place by training forward, for present datasets only */
    float* running_var;
    float* save_mean;   /* training forward writes, backward reads: batch mean per (d, c) */
    float* save_invstd; /* 1 / sqrt(biased var + eps) per (d, c) */
    float* dgamma;      /* backward: per (d, c); zero for datasets absent from the batch */
    float* dbeta;
    float* workspace; /* cdcl_*_dsbn_workspace_bytes() bytes, any content */
    cdcl_error_record* err;
    /* Pixels per statistics chunk: 0 = the kernels' own (256); the convolution's training
       epilogue writes partials for 64-pixel chunks (CDCL_CONV_STATS_CHUNK). */
    int32_t chunk_pixels;
    /* Optional, like x: added after the affine transform, before the ReLU (ResNet's
       BN + residual + ReLU); backward reads it for the mask and writes dresidual = masked dy. */
    const void* residual;
    void* dresidual;
} cdcl_dsbn_params;

/* ------------------------------------------------------------------------------------------ */
/* Convolution as implicit GEMM: x NHWC [n,h,w,c], weights KRSC [k,r,s,c], y NHWC [n,p,q,k].   */
/* p = (h + 2*pad_h - dil_h*(r-1) - 1) / stride_h + 1, likewise q.                             */
/* ------------------------------------------------------------------------------------------ */
typedef struct cdcl_conv_params {
    int32_t n;
    int32_t h;
    int32_t w;
    int32_t c;
    int32_t k;
    int32_t r;
    int32_t s;
    int32_t p;
    int32_t q;
    int32_t stride_h;
    int32_t stride_w;
    int32_t pad_h;
    int32_t pad_w;
    int32_t dil_h;
    int32_t dil_w;
    int32_t dtype;       /* storage of x, w, y, residual, dy, dx, dw: F32; F16 / BF16 for the forward */
    const void* x;       /* forward, filter gradient */
    const void* weight;  /* forward, data gradient */
    const float* bias;   /* forward, optional (null: none) */
    void* y;             /* forward output */
    const void* dy;      /* data / filter gradient input, [n,p,q,k] */
    void* dx;            /* data gradient output */
    void* dweight;       /* filter gradient output, KRSC */
    float* dbias;        /* filter-gradient launcher, optional: sum of dy over n,p,q */
    float* workspace;    /* cdcl_*_conv_workspace_bytes() bytes */

    /* Prologue (forward and filter gradient): the input is read as
       relu?(fma((x - pro_mean[d,c]) * pro_invstd[d,c], pro_gamma[d,c], pro_beta[d,c])) with
       d = dataset[n]: the previous block's DSBN + ReLU applied on load, never written.
       Padding stays zero. Off when pro_mean is null. */
    const int32_t* dataset; /* [n], needed by the prologue and the epilogues */
    int32_t num_datasets;
    int32_t pro_relu;
    const float* pro_mean;
    const float* pro_invstd;
    const float* pro_gamma;
    const float* pro_beta;

    /* Training epilogue (forward): with stats non-null, output tiles are aligned to samples and
       each (64-row tile, channel) writes the mean and M2 of y into stats in the DSBN partial
       layout: [2][n * ceil(p*q/64)][k] (means, then M2s). */
    float* stats;

    /* Inference epilogue (forward): with epi_mean non-null,
       y = relu?(fma((conv - mean) * rsqrt(var + eps), gamma, beta) [+ residual]) per sample's
       dataset, from the running statistics. */
    const float* epi_mean;
    const float* epi_var;
    const float* epi_gamma;
    const float* epi_beta;
    float epi_eps;
    int32_t epi_relu;
    const void* residual; /* like y, optional */

    /* F32 storage only: nonzero runs the three problems on tensor cores in TF32 (every operand
       rounded to nearest, ties away from zero, to 10 mantissa bits; f32 accumulation), as
       PyTorch's allow_tf32 for cuDNN convolutions; zero keeps the exact f32 FFMA mainloop.
       Ignored for F16 / BF16. */
    int32_t allow_tf32;
} cdcl_conv_params;

/* Rows of the convolution's output tiles: the statistics chunk of its training epilogue. */
#define CDCL_CONV_STATS_CHUNK 64
/* Multi-head cross-entropy: every dataset d has its own head of num_classes[d] classes, the    */
/* first num_classes[d] channels of the logits of its samples (the rest is padding).            */
/* ------------------------------------------------------------------------------------------ */
/* Labels equal to this are ignored (no loss, zero gradient). */
#define CDCL_IGNORE_LABEL 255

typedef struct cdcl_cross_entropy_params {
    /* logits, dlogits: [n, h, w, cmax] in `dtype` ([n, logit_h, logit_w, cmax] with upsample).
       labels: [n, h, w] in `label_dtype`. dataset: [n] int32. num_classes: [num_datasets]
       int32, each in 1..=cmax. weights: [num_datasets] f32. n*h*w < 2^31. */
    int32_t n;
    int32_t h;
    int32_t w;
    int32_t cmax;
    int32_t num_datasets;
    int32_t dtype;       /* cdcl_dtype: F32, F16 or BF16 */
    int32_t label_dtype; /* cdcl_dtype: U8 or I32 */
    float grad_scale;    /* gradient of the total loss coming from above (1 for the loss itself) */
    const int32_t* dataset;
    const int32_t* num_classes;
    const float* weights;
    const void* logits;
    const void* labels;
    void* dlogits; /* NULL: loss only */
    float* loss;   /* [1 + num_datasets]: the weighted total, then the mean loss of each dataset */
    float* workspace; /* cdcl_*_cross_entropy_workspace_bytes() bytes, any content */
    cdcl_error_record* err;
    /* Fused bilinear upsampling (upsample != 0): the logits are [n, logit_h, logit_w, cmax] and
       label pixel (h, w) reads its logits interpolated to the labels' h x w as PyTorch's
       interpolate(mode="bilinear", size=(h, w), align_corners) would; dlogits is the gradient
       with respect to those low-resolution logits. Every spatial size <= 2^24. Unused (and the
       logits [n, h, w, cmax]) when upsample == 0. */
    int32_t upsample;
    int32_t align_corners;
    int32_t logit_h;
    int32_t logit_w;
} cdcl_cross_entropy_params;

/* ------------------------------------------------------------------------------------------ */
/* Metrics: per-head argmax and per-dataset confusion matrices.                                 */
/* ------------------------------------------------------------------------------------------ */
typedef struct cdcl_argmax_params {
    /* logits: [n, h, w, cmax] in `dtype`; pred: [n, h, w] int32, argmax over the first
       num_classes[dataset[n]] channels (first maximum on ties; a NaN counts as the maximum). */
    int32_t n;
    int32_t h;
    int32_t w;
    int32_t cmax;
    int32_t num_datasets;
    int32_t dtype;
    const int32_t* dataset;
    const int32_t* num_classes;
    const void* logits;
    int32_t* pred;
    cdcl_error_record* err;
} cdcl_argmax_params;

typedef struct cdcl_confusion_params {
    /* pred: [n, h, w] int32; labels: [n, h, w] in `label_dtype` (255 = ignore). counts: one
       flat int32 buffer; dataset d's [num_classes[d], num_classes[d]] matrix (row = label,
       column = prediction) starts at offsets[d] (offsets[d] = sum of num_classes[e]^2, e < d).
       counts must be zero on entry; each launch adds one batch. n*h*w < 2^31. */
    int32_t n;
    int32_t h;
    int32_t w;
    int32_t num_datasets;
    int32_t label_dtype;
    int32_t max_classes; /* max over d of num_classes[d]: sizes the shared-memory histogram */
    const int32_t* dataset;
    const int32_t* num_classes;
    const int32_t* offsets;
    const int32_t* pred;
    const void* labels;
    int32_t* counts;
    cdcl_error_record* err;
} cdcl_confusion_params;
/* Pyramid pooling building blocks, NHWC: adaptive average pooling and bilinear resize.       */
/* ------------------------------------------------------------------------------------------ */
typedef struct cdcl_pool_params {
    /* The op maps its input [n, in_h, in_w, c] (x; dx in backward) to its output
       [n, out_h, out_w, c] (y; dy in backward). The output is a channel slice of a larger
       tensor [n, out_h, out_w, out_c_total]: its channel k is channel out_c_offset + k there.
       Forward writes only those channels of y; backward reads only those channels of dy and
       writes all of dx. */
    int32_t n;
    int32_t c;
    int32_t in_h;
    int32_t in_w;
    int32_t out_h;
    int32_t out_w;
    int32_t out_c_total;  /* channels of the tensor y / dy (>= out_c_offset + c) */
    int32_t out_c_offset; /* first channel of the slice */
    int32_t dtype;        /* cdcl_dtype: F32, F16 or BF16, the same for all four tensors */
    int32_t align_corners; /* resize only: nonzero = PyTorch's align_corners=True */
    const void* x;
    void* y;
    const void* dy;
    void* dx;
} cdcl_pool_params;

/* The pyramid pooling module's input gradient in one pass (one read of each source, one write
   of dx): dx [n, h, w, c] = base + the adaptive-average-pooling backward of each level, added in
   level order, where base is channels 0..c of a [n, h, w, base_c_total] tensor (the identity
   slice of the module's output gradient) and level l's gradient dpooled[l] is
   [n, out_h[l], out_w[l], c]. Each level's sum is adaptive_avg_pool_backward's and the levels
   are added in f32, so with f32 storage the result equals that op followed by element-wise
   adds, bit for bit (16-bit storage rounds once, at the end). */
#define CDCL_PPM_MAX_LEVELS 8
typedef struct cdcl_ppm_backward_params {
    int32_t n;
    int32_t h;
    int32_t w;
    int32_t c;
    int32_t base_c_total; /* >= c */
    int32_t num_levels;   /* 0..=CDCL_PPM_MAX_LEVELS */
    int32_t dtype;        /* cdcl_dtype: F32, F16 or BF16, the same for every tensor */
    int32_t out_h[CDCL_PPM_MAX_LEVELS];
    int32_t out_w[CDCL_PPM_MAX_LEVELS];
    const void* base;
    const void* dpooled[CDCL_PPM_MAX_LEVELS];
    void* dx;
} cdcl_ppm_backward_params;

/* ------------------------------------------------------------------------------------------ */
/* Max pooling over NHWC, PyTorch's max_pool2d with indices (no dilation, floor mode).         */
/* p = (h + 2*pad_h - kernel_h) / stride_h + 1, likewise q; pad <= kernel / 2 (as PyTorch).    */
/* indices: [n, p, q, c] int32, flat h*w_in + w within the (sample, channel) plane.            */
/* ------------------------------------------------------------------------------------------ */
typedef struct cdcl_maxpool_params {
    int32_t n;
    int32_t h;
    int32_t w;
    int32_t c;
    int32_t p;
    int32_t q;
    int32_t kernel_h;
    int32_t kernel_w;
    int32_t stride_h;
    int32_t stride_w;
    int32_t pad_h;
    int32_t pad_w;
    int32_t dtype;    /* storage of x, y, dy, dx: F32, F16 or BF16 */
    const void* x;    /* forward input [n, h, w, c] */
    void* y;          /* forward output [n, p, q, c] */
    int32_t* indices; /* forward writes, backward reads */
    const void* dy;   /* backward input [n, p, q, c] */
    void* dx;         /* backward output [n, h, w, c] */
} cdcl_maxpool_params;

/* ------------------------------------------------------------------------------------------ */
/* Element-wise ops over `numel` elements of one storage type (any shape, contiguous).         */
/*   add: y = a + b;  relu: y = relu(a);  add_relu: y = relu(a + b);                           */
/*   relu_backward: y = (b > 0 or b is NaN) ? a : 0 with a = dy, b = the forward OUTPUT.       */
/* ------------------------------------------------------------------------------------------ */
typedef struct cdcl_eltwise_params {
    int64_t numel;
    int32_t dtype; /* F32, F16 or BF16, the same for a, b and y */
    const void* a;
    const void* b; /* unused by relu */
    void* y;
} cdcl_eltwise_params;

/* ------------------------------------------------------------------------------------------ */
/* Dropout2d over NHWC: channel c of sample n is dropped when u(seed, n, c) < p, where          */
/* u = (splitmix64 output number n*2^32 + c of the stream seeded with `seed`) >> 40, / 2^24.   */
/* Kept channels are scaled by 1 / (1 - p). Backward is the same map applied to dy.            */
/* ------------------------------------------------------------------------------------------ */
typedef struct cdcl_dropout_params {
    int32_t n;
    int32_t h;
    int32_t w;
    int32_t c;
    int32_t dtype; /* F32, F16 or BF16 */
    float p;       /* drop probability in [0, 1] */
    uint64_t seed;
    const void* x; /* forward: the input; backward: dy */
    void* y;       /* forward: the output; backward: dx */
    float* workspace; /* cdcl_*_dropout_workspace_bytes() bytes: the per-(n, c) multiplier */
} cdcl_dropout_params;

/* ------------------------------------------------------------------------------------------ */
/* Multi-tensor SGD (PyTorch's formula, dampening 0, no Nesterov), f32, in place:              */
/*   d = g + weight_decay * p;  buf = first_step ? d : momentum * buf + d;  p -= lr * buf.      */
/* One launch updates every tensor of the table: one block per chunk of CDCL_SGD_CHUNK         */
/* elements, chunks numbered across the tensors in table order. A tensor viewed as             */
/* [numel / row_len, row_len] may have up to 64 frozen rows (the DSBN rows of datasets absent  */
/* from a step), whose parameter and buffer elements are neither read nor written.            */
/* ------------------------------------------------------------------------------------------ */
#define CDCL_SGD_CHUNK 4096

typedef struct cdcl_sgd_tensor {
    float* param;
    const float* grad;
    float* momentum_buffer;
    int64_t numel;       /* >= 1 */
    int64_t first_chunk; /* index of this tensor's first chunk; strictly increasing in the table */
    int64_t row_len;     /* >= 1, divides numel; read only when frozen_rows != 0 (< 1: tensor skipped) */
    uint64_t frozen_rows; /* bit r set: row r is left untouched; bits >= numel / row_len are 0 */
    float lr;
    int32_t reserved; /* explicit padding: the struct has no implicit padding bytes */
} cdcl_sgd_tensor;

typedef struct cdcl_sgd_params {
    const cdcl_sgd_tensor* tensors; /* device memory, num_tensors entries */
    int32_t num_tensors;
    int32_t first_step; /* nonzero: the momentum buffers are initialised (buf = d), not read */
    int64_t total_chunks;
    float momentum;
    float weight_decay;
    /* Mixed precision. null, or a device array of num_tensors addresses (a null entry: none) of */
    /* 16-bit copies of the parameters, each written as round(p) from the updated parameter in  */
    /* the same pass (the weights the convolutions read); copy_dtype is F16 or BF16.           */
    void* const* copies;
    int32_t copy_dtype;
    int32_t reserved;
    /* null, or an f32 flag in device memory: when it is nonzero the launch writes nothing (a  */
    /* step skipped for a loss-scaling overflow, decided on the device: no host round trip).   */
    const float* skip_if;
} cdcl_sgd_params;

/* Multi-tensor scaled sum (the gradients of a mixed-precision step, gathered from every pass  */
/* that used a parameter and unscaled): dst[i] = scale * (src_0[i] + src_1[i] + ...) in f32,   */
/* the sources of one entry in order, in one launch over the table (chunks of CDCL_SGD_CHUNK   */
/* elements, as the SGD table). Any source value that is infinite or NaN sets *nonfinite to    */
/* 1.0f (it must hold 0 on entry).                                                             */
typedef struct cdcl_sum_entry {
    float* dst;              /* numel f32 */
    const void* const* srcs; /* device array of num_srcs addresses of numel elements each */
    int64_t numel;           /* >= 1 */
    int64_t first_chunk;     /* index of this entry's first chunk; strictly increasing */
    int32_t num_srcs;        /* >= 1 */
    int32_t src_dtype;       /* F32, F16 or BF16 */
} cdcl_sum_entry;

typedef struct cdcl_sum_params {
    const cdcl_sum_entry* entries; /* device memory, num_entries entries */
    int32_t num_entries;
    int32_t reserved;
    int64_t total_chunks;
    float scale;
    int32_t reserved2;
    float* nonfinite; /* [1] f32 */
} cdcl_sum_params;

/* ------------------------------------------------------------------------------------------ */
/* USSS entropy regularisation: pixel features x NHWC [n,h,w,e] against fixed class prototypes */
/* of every dataset, one [num_protos, e] f32 table whose rows of dataset d are                 */
/* proto_offset[d] .. proto_offset[d+1]. Per pixel and dataset d': s_j = <x, proto_j> / T over  */
/* the rows of d', p = softmax(s), H_d' = -sum p log p. Within: d' = the sample's own dataset;  */
/* cross: the mean of H_d' over the other datasets (0 when there is one dataset).               */
/* ------------------------------------------------------------------------------------------ */
typedef struct cdcl_usss_params {
    int32_t n;
    int32_t h;
    int32_t w;
    int32_t e;            /* feature channels */
    int32_t num_datasets;
    int32_t num_protos;   /* proto_offset[num_datasets] */
    int32_t dtype;        /* storage of x and dx: F32, F16 or BF16 */
    float inv_temperature;
    float alpha;          /* weight of the cross-dataset loss */
    float beta;           /* weight of the within-dataset loss */
    float grad;           /* backward: incoming gradient of the total loss */
    const int32_t* dataset;      /* [n] */
    const int32_t* proto_offset; /* [num_datasets + 1], 0 = first, increasing */
    const float* protos;         /* [num_protos, e] */
    const uint8_t* mask;         /* [n, h, w], nonzero = the pixel counts; null: every pixel */
    const void* x;
    void* dx;                    /* backward output, like x; 0 for excluded pixels */
    float* out;                  /* forward output: total, cross, within */
    void* workspace;             /* cdcl_*_usss_workspace_bytes() bytes, any content */
    cdcl_error_record* err;
} cdcl_usss_params;

/* ------------------------------------------------------------------------------------------ */
/* Launchers. CDCL_DECLARE_BOTH declares the GPU and the emulator symbol of one launcher.      */
/* ------------------------------------------------------------------------------------------ */
#define CDCL_DECLARE_BOTH(ret, name, args) \
    ret cdcl_cuda_##name args;             \
    ret cdcl_emu_##name args;

CDCL_DECLARE_BOTH(size_t, dsbn_workspace_bytes, (const cdcl_dsbn_params* p))
CDCL_DECLARE_BOTH(int32_t, dsbn_forward_train, (const cdcl_dsbn_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, dsbn_forward_infer, (const cdcl_dsbn_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, dsbn_backward_train, (const cdcl_dsbn_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, dsbn_backward_infer, (const cdcl_dsbn_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, dsbn_stats_from_partials, (const cdcl_dsbn_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, dsbn_apply, (const cdcl_dsbn_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, dsbn_validate_indices, (const cdcl_dsbn_params* p, void* stream))
CDCL_DECLARE_BOTH(size_t, conv_workspace_bytes, (const cdcl_conv_params* p))
CDCL_DECLARE_BOTH(int32_t, conv_forward, (const cdcl_conv_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, conv_backward_data, (const cdcl_conv_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, conv_backward_filter, (const cdcl_conv_params* p, void* stream))
CDCL_DECLARE_BOTH(size_t, cross_entropy_workspace_bytes, (const cdcl_cross_entropy_params* p))
CDCL_DECLARE_BOTH(int32_t, cross_entropy, (const cdcl_cross_entropy_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, argmax, (const cdcl_argmax_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, confusion_matrix, (const cdcl_confusion_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, adaptive_avg_pool_forward, (const cdcl_pool_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, adaptive_avg_pool_backward, (const cdcl_pool_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, resize_bilinear_forward, (const cdcl_pool_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, resize_bilinear_backward, (const cdcl_pool_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, ppm_pool_backward, (const cdcl_ppm_backward_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, maxpool_forward, (const cdcl_maxpool_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, maxpool_backward, (const cdcl_maxpool_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, eltwise_add, (const cdcl_eltwise_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, eltwise_relu, (const cdcl_eltwise_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, eltwise_add_relu, (const cdcl_eltwise_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, eltwise_relu_backward, (const cdcl_eltwise_params* p, void* stream))
CDCL_DECLARE_BOTH(size_t, dropout_workspace_bytes, (const cdcl_dropout_params* p))
CDCL_DECLARE_BOTH(int32_t, dropout2d, (const cdcl_dropout_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, sgd_step, (const cdcl_sgd_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, sum_scaled, (const cdcl_sum_params* p, void* stream))
CDCL_DECLARE_BOTH(size_t, usss_workspace_bytes, (const cdcl_usss_params* p))
CDCL_DECLARE_BOTH(int32_t, usss_forward, (const cdcl_usss_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, usss_backward, (const cdcl_usss_params* p, void* stream))
/* ------------------------------------------------------------------------------------------ */
/* A training step's error records (kernels/runtime.cu). The ops of one step write their       */
/* records into one array that the host reads once, with the losses. Before the optimiser      */
/* step, one thread turns "any record holds an error, or in_flag is set" into an f32 flag      */
/* that the SGD kernel's skip_if reads, so a step with bad data changes no parameter.          */
/* ------------------------------------------------------------------------------------------ */
typedef struct cdcl_step_flag_params {
    const cdcl_error_record* records; /* num_records records */
    int32_t num_records;
    int32_t reserved;
    const float* in_flag; /* null, or an f32 flag (nonzero: skip), e.g. a loss-scaling overflow */
    float* out_flag;      /* f32: 1 when in_flag is nonzero or any slot holds an error, else 0 */
} cdcl_step_flag_params;

CDCL_DECLARE_BOTH(int32_t, step_flag, (const cdcl_step_flag_params* p, void* stream))
/* The CUDA runtime error of the last launch that failed on this thread (cudaError_t; 0 on the
   emulator), and its name and description (static strings). */
CDCL_DECLARE_BOTH(int32_t, last_launch_error, (void* stream))
CDCL_DECLARE_BOTH(const char*, error_name, (int32_t code))
CDCL_DECLARE_BOTH(const char*, error_string, (int32_t code))
/* Kernels launched so far: on the emulator, on this stream; on the GPU, by this process (the
   GPU build has no per-stream state of its own). Step accounting reads the difference. */
CDCL_DECLARE_BOTH(uint64_t, kernel_launch_count, (void* stream))

/* ------------------------------------------------------------------------------------------ */
/* Emulator runtime (CPU only).                                                                */
/* ------------------------------------------------------------------------------------------ */
typedef struct cdcl_emu_stream cdcl_emu_stream;

/* seed: shuffles block order and thread resumption order. threads: worker OS threads, 0 = all cores. */
cdcl_emu_stream* cdcl_emu_stream_create(uint64_t seed, uint32_t threads);
void cdcl_emu_stream_destroy(cdcl_emu_stream* stream);
/* Copies the last launch failure message (NUL-terminated, truncated to len) and returns its full length. */
size_t cdcl_emu_stream_last_error(const cdcl_emu_stream* stream, char* buf, size_t len);

/* "Device" memory of the emulator: plain host memory, 256-byte aligned like cudaMalloc. */
void* cdcl_emu_malloc(size_t bytes);
void cdcl_emu_free(void* ptr);

/* Average cost in nanoseconds of one fiber switch, measured over `iters` round trips. */
double cdcl_emu_fiber_switch_ns(uint64_t iters);

/* Self-test kernels that break the CUDA rules on purpose (kernels/emu/selftest.cu). */
typedef enum cdcl_emu_selftest {
    CDCL_SELFTEST_DIVERGENT_SYNCTHREADS = 0,
    CDCL_SELFTEST_EARLY_RETURN_THEN_BARRIER = 1,
    CDCL_SELFTEST_PARTIAL_MASK_SHUFFLE = 2,
    CDCL_SELFTEST_POISONED_SHARED_READ = 3,
    CDCL_SELFTEST_SHARED_RACE = 4,
    CDCL_SELFTEST_OUT_OF_BOUNDS_WRITE = 5,
    CDCL_SELFTEST_BLOCK_TOO_LARGE = 6,
    CDCL_SELFTEST_TOO_MUCH_SHARED = 7,
    CDCL_SELFTEST_WARP_REDUCE = 8,
    CDCL_SELFTEST_ZERO_GRID = 9,
    CDCL_SELFTEST_COLLECTIVES = 10,
    CDCL_SELFTEST_ATOMICS_DYNAMIC_SHARED = 11,
    CDCL_SELFTEST_WMMA_GEMM_F16 = 12,
    CDCL_SELFTEST_WMMA_GEMM_BF16 = 13,
    CDCL_SELFTEST_WMMA_GEMM_F16_TILED = 14,
    CDCL_SELFTEST_WMMA_GEMM_BF16_TILED = 15,
    CDCL_SELFTEST_WMMA_DIVERGENT_POINTER = 16,
    CDCL_SELFTEST_WMMA_PARTIAL_WARP = 17,
    CDCL_SELFTEST_WMMA_ASSUMED_LAYOUT = 18,
    CDCL_SELFTEST_MISALIGNED_FLOAT4_LOAD = 19,
    CDCL_SELFTEST_MISALIGNED_FLOAT2_STORE = 20,
    CDCL_SELFTEST_MISALIGNED_SHARED_UINT4 = 21,
    CDCL_SELFTEST_MISALIGNED_HALF2 = 22,
    CDCL_SELFTEST_MISALIGNED_WMMA_LOAD = 23,
    CDCL_SELFTEST_SHARED_READ_WRITE_RACE = 24,
    CDCL_SELFTEST_GLOBAL_RACE = 25,
    CDCL_SELFTEST_ATOMIC_VS_PLAIN_WRITE = 26,
    CDCL_SELFTEST_WARP_EXCHANGE_SYNCED = 27,
    CDCL_SELFTEST_WARP_EXCHANGE_UNSYNCED = 28,
    CDCL_SELFTEST_LOST_UPDATE_PREEMPTIVE = 29,
    CDCL_SELFTEST_LOST_UPDATE_RACECHECK = 30,
    CDCL_SELFTEST_SHUFFLE_KIND_MISMATCH = 31,
    CDCL_SELFTEST_SHUFFLE_WIDTH_MISMATCH = 32,
    CDCL_SELFTEST_POISONED_SHARED_INT = 33,
    CDCL_SELFTEST_BEYOND_LAUNCH_BOUNDS = 34,
    CDCL_SELFTEST_WITHIN_LAUNCH_BOUNDS = 35,
    CDCL_SELFTEST_FP_CONTRACTION = 36
} cdcl_emu_selftest;

/* Runs one self-test kernel writing `out` (n floats, emulator memory). */
int32_t cdcl_emu_run_selftest(int32_t which, float* out, int32_t n, void* stream);

/* The emulator's f32 <-> f16 / bf16 conversions, exposed so tests can compare them bit for bit
   with an independent implementation. */
uint16_t cdcl_emu_f32_to_f16_bits(float v);
float cdcl_emu_f16_bits_to_f32(uint16_t bits);
uint16_t cdcl_emu_f32_to_bf16_bits(float v);
float cdcl_emu_bf16_bits_to_f32(uint16_t bits);
/* The emulator's wmma::__float_to_tf32 (cvt.rna.tf32.f32), for the same comparison. */
float cdcl_emu_f32_to_tf32(float v);

#ifdef __cplusplus
}
#endif

#endif /* CDCL_H */
