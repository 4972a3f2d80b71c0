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
    int32_t dtype;       /* storage of x, w, y, dy, dx, dw: F32 for now */
    const void* x;       /* forward, filter gradient */
    const void* weight;  /* forward, data gradient */
    const float* bias;   /* forward, optional (null: none) */
    void* y;             /* forward output */
    const void* dy;      /* data / filter gradient input, [n,p,q,k] */
    void* dx;            /* data gradient output */
    void* dweight;       /* filter gradient output, KRSC */
    float* dbias;        /* filter-gradient launcher, optional: sum of dy over n,p,q */
    float* workspace;    /* cdcl_*_conv_workspace_bytes() bytes */
} cdcl_conv_params;

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
CDCL_DECLARE_BOTH(size_t, conv_workspace_bytes, (const cdcl_conv_params* p))
CDCL_DECLARE_BOTH(int32_t, conv_forward, (const cdcl_conv_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, conv_backward_data, (const cdcl_conv_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, conv_backward_filter, (const cdcl_conv_params* p, void* stream))
CDCL_DECLARE_BOTH(size_t, usss_workspace_bytes, (const cdcl_usss_params* p))
CDCL_DECLARE_BOTH(int32_t, usss_forward, (const cdcl_usss_params* p, void* stream))
CDCL_DECLARE_BOTH(int32_t, usss_backward, (const cdcl_usss_params* p, void* stream))

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
    CDCL_SELFTEST_ATOMICS_DYNAMIC_SHARED = 11
} cdcl_emu_selftest;

/* Runs one self-test kernel writing `out` (n floats, emulator memory). */
int32_t cdcl_emu_run_selftest(int32_t which, float* out, int32_t n, void* stream);

/* The emulator's f32 <-> f16 / bf16 conversions, exposed so tests can compare them bit for bit
   with an independent implementation. */
uint16_t cdcl_emu_f32_to_f16_bits(float v);
float cdcl_emu_f16_bits_to_f32(uint16_t bits);
uint16_t cdcl_emu_f32_to_bf16_bits(float v);
float cdcl_emu_bf16_bits_to_f32(uint16_t bits);

#ifdef __cplusplus
}
#endif

#endif /* CDCL_H */
