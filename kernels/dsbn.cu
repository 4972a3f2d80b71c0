// Dataset-specific batch normalisation (DSBN) over NHWC activations: every sample n carries a
// dataset index d = dataset[n], and normalisation uses the statistics and the gamma/beta slice
// of its own dataset. A batch that mixes datasets is one launch sequence.
//
// Training forward:  validate -> stats_partial -> stats_finalize -> apply
// Inference forward: validate -> infer
// Backward:          validate -> backward_partial -> backward_finalize -> backward_dx
//
// Reductions are deterministic: every partial sum has a fixed owner and a fixed merge order,
// no floating-point atomics. The design and the cost model are in docs/kernels.md.
#include "cdcl_device.cuh"

namespace CDCL_NAMESPACE {

// A chunk is up to kChunkPixels consecutive pixels of one sample; its per-channel partials are
// the unit of the fixed-order reduction. Blocks are 32 channels x 8 pixel rows: consecutive
// threads read consecutive channels (coalesced in NHWC), 8 rows give each block 256 threads.
constexpr int kChunkPixels = 256;
constexpr int kChanPerBlock = 32;
constexpr int kRows = 8;
constexpr int kElemThreads = 256;

struct Geometry {
    long long hw;      // pixels per sample
    int chunk;         // pixels per chunk: kChunkPixels, or the producer's tile (conv epilogue: 64)
    int chunks;        // chunks per sample
    long long total;   // n * hw * c elements
};

__host__ __device__ __forceinline__ Geometry geometry(const cdcl_dsbn_params& p) {
    Geometry g;
    g.hw = (long long)p.h * p.w;
    g.chunk = p.chunk_pixels > 0 ? p.chunk_pixels : kChunkPixels;
    g.chunks = (int)((g.hw + g.chunk - 1) / g.chunk);
    g.total = (long long)p.n * g.hw * p.c;
    return g;
}

// The single definition of the normalised-and-affine value: forward output and the backward's
// recomputed ReLU mask come from the same expression, so they agree bit for bit.
__device__ __forceinline__ float affine(float x, float mean, float invstd, float gamma, float beta) {
    return fmaf((x - mean) * invstd, gamma, beta);
}

// Chan et al.'s pairwise update: merges (nb, mean_b, m2_b) into (na, mean_a, m2_a).
__device__ __forceinline__ void chan_merge(float& na, float& mean_a, float& m2_a, float nb, float mean_b, float m2_b) {
    if (nb == 0.0f) return;
    const float n = na + nb;
    const float delta = mean_b - mean_a;
    const float f = nb / n;
    mean_a = fmaf(delta, f, mean_a);
    m2_a = m2_a + m2_b + delta * delta * na * f;
    na = n;
}

// Dataset of sample n, or -1 when it is out of range (the validate kernel reports it).
__device__ __forceinline__ int dataset_of(const cdcl_dsbn_params& p, int n) {
    const int d = p.dataset[n];
    return (d >= 0 && d < p.num_datasets) ? d : -1;
}

__global__ void dsbn_validate(const cdcl_dsbn_params p, int training) {
    const int t = (int)threadIdx.x;
    for (int n = t; n < p.n; n += (int)blockDim.x) {
        const int d = p.dataset[n];
        if (d < 0 || d >= p.num_datasets) raise_error(p.err, CDCL_ERRSLOT_DATASET_INDEX, (unsigned)n, d);
    }
    // Training statistics need more than one value per channel (PyTorch refuses too): only a
    // 1x1 input can give a dataset a single value.
    if (training && (long long)p.h * p.w == 1) {
        for (int d = t; d < p.num_datasets; d += (int)blockDim.x) {
            int count = 0;
            for (int n = 0; n < p.n; ++n) count += (p.dataset[n] == d);
            if (count == 1) raise_error(p.err, CDCL_ERRSLOT_TOO_FEW_VALUES, (unsigned)d, 1);
        }
    }
}

// Per (chunk, channel): count, mean and M2 of x (Welford per thread, Chan across the 8 rows).
template <typename T>
__global__ void dsbn_stats_partial(const cdcl_dsbn_params p) {
    if (error_raised(p.err)) return;
    const Geometry g = geometry(p);
    const int chunk = (int)blockIdx.x;
    const int n = chunk / g.chunks;
    const long long pix0 = (long long)(chunk % g.chunks) * g.chunk;
    const long long pix1 = pix0 + g.chunk < g.hw ? pix0 + g.chunk : g.hw;
    const int c = (int)(blockIdx.y * kChanPerBlock + threadIdx.x);
    const T* x = static_cast<const T*>(p.x);

    float cnt = 0.0f, mean = 0.0f, m2 = 0.0f;
    if (c < p.c) {
        for (long long pix = pix0 + threadIdx.y; pix < pix1; pix += kRows) {
            const float v = to_f32(x[((long long)n * g.hw + pix) * p.c + c]);
            cnt += 1.0f;
            const float delta = v - mean;
            mean += delta / cnt;
            m2 = fmaf(delta, v - mean, m2);
        }
    }
    CDCL_SHARED(float, s_cnt, [kRows][kChanPerBlock]);
    CDCL_SHARED(float, s_mean, [kRows][kChanPerBlock]);
    CDCL_SHARED(float, s_m2, [kRows][kChanPerBlock]);
    s_cnt[threadIdx.y][threadIdx.x] = cnt;
    s_mean[threadIdx.y][threadIdx.x] = mean;
    s_m2[threadIdx.y][threadIdx.x] = m2;
    __syncthreads();
    if (threadIdx.y == 0 && c < p.c) {
        for (int r = 1; r < kRows; ++r)
            chan_merge(cnt, mean, m2, s_cnt[r][threadIdx.x], s_mean[r][threadIdx.x], s_m2[r][threadIdx.x]);
        const long long slot = (long long)chunk * p.c + c;
        const long long parts = (long long)p.n * g.chunks * p.c;
        p.workspace[slot] = mean;
        p.workspace[parts + slot] = m2;
    }
}

// The finalize kernels reduce each (dataset, channel)'s chunk partials with kFinLanes threads
// instead of one: the list of all chunks in sample order (index n * chunks + j) is cut into
// kFinLanes contiguous ranges by index alone, lane l merges the chunks of dataset d in its range
// in order, then the lanes' results merge in a fixed pairwise tree (lane l takes lane l + 1,
// then l + 2, l + 4, ...: always the left range first). The shape of the reduction depends only
// on n, the chunk count and kFinLanes, never on the schedule, so the result has the same bits
// for any block order. Blocks are kFinChans channels (consecutive: coalesced partial reads) x
// kFinLanes lanes, one dataset per grid row.
constexpr int kFinLanes = 16;
constexpr int kFinChans = 16;

// The half-open range of chunk indices (of `total`) that lane `lane` reduces.
__device__ __forceinline__ void lane_range(int total, int lane, int& i0, int& i1) {
    i0 = (int)((long long)total * lane / kFinLanes);
    i1 = (int)((long long)total * (lane + 1) / kFinLanes);
}

// Walks chunk indices i0..i1 of the sample-ordered list, calling f(i, j) for each chunk (j its
// index within its sample) whose sample belongs to dataset d. One division before the walk.
template <class F>
__device__ __forceinline__ void for_dataset_chunks(const cdcl_dsbn_params& p, int chunks, int d, int i0, int i1, F f) {
    if (i0 >= i1) return;
    int n = i0 / chunks, j = i0 - n * chunks;
    bool mine = dataset_of(p, n) == d;
    for (int i = i0; i < i1; ++i) {
        if (mine) f(i, j);
        if (++j == chunks) {
            j = 0;
            ++n;
            mine = n < p.n && dataset_of(p, n) == d;
        }
    }
}

// Per (dataset, channel): merges the chunk partials of that dataset's samples (the tree above),
// writes mean and 1/sqrt(var + eps), and moves the running statistics of present datasets.
__global__ void dsbn_stats_finalize(const cdcl_dsbn_params p) {
    if (error_raised(p.err)) return;
    const int tx = (int)threadIdx.x, lane = (int)threadIdx.y;
    const int c = (int)blockIdx.x * kFinChans + tx, d = (int)blockIdx.y;
    const Geometry g = geometry(p);
    const long long parts = (long long)p.n * g.chunks * p.c;
    int i0, i1;
    lane_range(p.n * g.chunks, lane, i0, i1);
    float cnt = 0.0f, mean = 0.0f, m2 = 0.0f;
    if (c < p.c)
        for_dataset_chunks(p, g.chunks, d, i0, i1, [&](int i, int j) {
            const long long rest = g.hw - (long long)j * g.chunk;
            const float nb = (float)(rest < g.chunk ? rest : g.chunk);
            const long long slot = (long long)i * p.c + c;
            chan_merge(cnt, mean, m2, nb, p.workspace[slot], p.workspace[parts + slot]);
        });
    CDCL_SHARED(float, s_cnt, [kFinLanes][kFinChans]);
    CDCL_SHARED(float, s_mean, [kFinLanes][kFinChans]);
    CDCL_SHARED(float, s_m2, [kFinLanes][kFinChans]);
    s_cnt[lane][tx] = cnt;
    s_mean[lane][tx] = mean;
    s_m2[lane][tx] = m2;
    for (int step = 1; step < kFinLanes; step *= 2) {
        __syncthreads();
        if (lane % (2 * step) == 0) {
            chan_merge(cnt, mean, m2, s_cnt[lane + step][tx], s_mean[lane + step][tx], s_m2[lane + step][tx]);
            s_cnt[lane][tx] = cnt;
            s_mean[lane][tx] = mean;
            s_m2[lane][tx] = m2;
        }
    }
    if (lane != 0 || c >= p.c) return;
    const int i = d * p.c + c;
    if (cnt == 0.0f) {  // dataset absent from the batch: its running statistics stay as they are
        p.save_mean[i] = 0.0f;
        p.save_invstd[i] = 0.0f;
        return;
    }
    const float var = m2 / cnt;
    p.save_mean[i] = mean;
    p.save_invstd[i] = rsqrtf(var + p.eps);
    const float unbiased = cnt > 1.0f ? m2 / (cnt - 1.0f) : var;
    p.running_mean[i] = fmaf(p.momentum, mean - p.running_mean[i], p.running_mean[i]);
    p.running_var[i] = fmaf(p.momentum, unbiased - p.running_var[i], p.running_var[i]);
}

// The elementwise passes (apply, infer, backward dx) tile each sample's pixels: a block covers
// kTilePixels pixels x kChanPerBlock channels of one sample (grid x: sample-major tiles, grid
// y: channel blocks), so a thread's dataset and channel, hence its table entries, are fixed:
// it reads them once and its per-element work is a load, an affine transform and a store, with
// 64-bit offsets by multiply-add and no division (tests/sass.rs checks the SASS). Consecutive
// threads take consecutive channels: coalesced in NHWC.
constexpr int kTilePixels = 64;

struct ElemTile {
    int n, c;          // the block's sample and the thread's channel
    long long base;    // offset of (n, pixel 0, c)
    int pix0, pix1;    // the tile's pixels
};
__device__ __forceinline__ ElemTile elem_tile(const cdcl_dsbn_params& p, unsigned tiles_per_sample) {
    ElemTile t;
    t.n = (int)(blockIdx.x / tiles_per_sample);
    const int tile = (int)(blockIdx.x - (unsigned)t.n * tiles_per_sample);
    t.c = (int)(blockIdx.y * kChanPerBlock + threadIdx.x);
    const int hw = p.h * p.w;
    t.base = (long long)t.n * hw * p.c + t.c;
    t.pix0 = tile * kTilePixels + (int)threadIdx.y;
    t.pix1 = (tile + 1) * kTilePixels < hw ? (tile + 1) * kTilePixels : hw;
    return t;
}

template <typename T>
__global__ void dsbn_apply(const cdcl_dsbn_params p, unsigned tiles_per_sample) {
    if (error_raised(p.err)) return;
    const ElemTile t = elem_tile(p, tiles_per_sample);
    const int d = dataset_of(p, t.n);
    if (t.c >= p.c || d < 0) return;
    const int s = d * p.c + t.c;
    const float mean = p.save_mean[s], invstd = p.save_invstd[s], gamma = p.gamma[s], beta = p.beta[s];
    const T* x = static_cast<const T*>(p.x);
    const T* res = static_cast<const T*>(p.residual);
    T* y = static_cast<T*>(p.y);
    for (int pix = t.pix0; pix < t.pix1; pix += kRows) {
        const long long e = t.base + (long long)pix * p.c;
        float v = affine(to_f32(x[e]), mean, invstd, gamma, beta);
        if (res) v += to_f32(res[e]);
        if (p.relu) v = fmaxf(v, 0.0f);
        y[e] = from_f32<T>(v);
    }
}

template <typename T>
__global__ void dsbn_infer(const cdcl_dsbn_params p, unsigned tiles_per_sample) {
    if (error_raised(p.err)) return;
    const ElemTile t = elem_tile(p, tiles_per_sample);
    const int d = dataset_of(p, t.n);
    if (t.c >= p.c || d < 0) return;
    const int s = d * p.c + t.c;
    const float mean = p.running_mean[s], invstd = rsqrtf(p.running_var[s] + p.eps), gamma = p.gamma[s],
                beta = p.beta[s];
    const T* x = static_cast<const T*>(p.x);
    const T* res = static_cast<const T*>(p.residual);
    T* y = static_cast<T*>(p.y);
    for (int pix = t.pix0; pix < t.pix1; pix += kRows) {
        const long long e = t.base + (long long)pix * p.c;
        float v = affine(to_f32(x[e]), mean, invstd, gamma, beta);
        if (res) v += to_f32(res[e]);
        if (p.relu) v = fmaxf(v, 0.0f);
        y[e] = from_f32<T>(v);
    }
}

// The statistics a backward pass normalises with: the saved batch statistics (training) or the
// running statistics (inference / frozen BN).
struct NormStats {
    float mean, invstd;
};
__device__ __forceinline__ NormStats norm_stats(const cdcl_dsbn_params& p, int s, bool training) {
    if (training) return NormStats{p.save_mean[s], p.save_invstd[s]};
    return NormStats{p.running_mean[s], rsqrtf(p.running_var[s] + p.eps)};
}

// The upstream gradient after the ReLU mask, recomputing the forward output (normalised x plus
// the residual, if any) with the forward's own expressions.
template <typename T>
__device__ __forceinline__ float masked_grad(const cdcl_dsbn_params& p, float dy, float x, NormStats st, int s, long long e) {
    if (!p.relu) return dy;
    float v = affine(x, st.mean, st.invstd, p.gamma[s], p.beta[s]);
    if (p.residual) v += to_f32(static_cast<const T*>(p.residual)[e]);
    return v > 0.0f ? dy : 0.0f;
}

// Per (chunk, channel): sum of g and of g * xhat, in a fixed order (8 row partials in shared
// memory, merged by row 0).
template <typename T>
__global__ void dsbn_backward_partial(const cdcl_dsbn_params p, int training) {
    if (error_raised(p.err)) return;
    const Geometry g = geometry(p);
    const int chunk = (int)blockIdx.x;
    const int n = chunk / g.chunks;
    const long long pix0 = (long long)(chunk % g.chunks) * g.chunk;
    const long long pix1 = pix0 + g.chunk < g.hw ? pix0 + g.chunk : g.hw;
    const int c = (int)(blockIdx.y * kChanPerBlock + threadIdx.x);
    const int d = dataset_of(p, n);
    const T* x = static_cast<const T*>(p.x);
    const T* dy = static_cast<const T*>(p.dy);

    float sum_g = 0.0f, sum_gx = 0.0f;
    if (c < p.c && d >= 0) {
        const int s = d * p.c + c;
        const NormStats st = norm_stats(p, s, training != 0);
        for (long long pix = pix0 + threadIdx.y; pix < pix1; pix += kRows) {
            const long long e = ((long long)n * g.hw + pix) * p.c + c;
            const float xv = to_f32(x[e]);
            const float gv = masked_grad<T>(p, to_f32(dy[e]), xv, st, s, e);
            sum_g += gv;
            sum_gx = fmaf(gv, (xv - st.mean) * st.invstd, sum_gx);
        }
    }
    CDCL_SHARED(float, s_g, [kRows][kChanPerBlock]);
    CDCL_SHARED(float, s_gx, [kRows][kChanPerBlock]);
    s_g[threadIdx.y][threadIdx.x] = sum_g;
    s_gx[threadIdx.y][threadIdx.x] = sum_gx;
    __syncthreads();
    if (threadIdx.y == 0 && c < p.c) {
        for (int r = 1; r < kRows; ++r) {
            sum_g += s_g[r][threadIdx.x];
            sum_gx += s_gx[r][threadIdx.x];
        }
        const long long slot = (long long)chunk * p.c + c;
        const long long parts = (long long)p.n * g.chunks * p.c;
        p.workspace[slot] = sum_g;
        p.workspace[parts + slot] = sum_gx;
    }
}

// Per (dataset, channel): dbeta = sum g, dgamma = sum g * xhat over that dataset's chunks, with
// the lanes and the fixed tree of dsbn_stats_finalize. Absent datasets get exact zeros.
__global__ void dsbn_backward_finalize(const cdcl_dsbn_params p) {
    if (error_raised(p.err)) return;
    const int tx = (int)threadIdx.x, lane = (int)threadIdx.y;
    const int c = (int)blockIdx.x * kFinChans + tx, d = (int)blockIdx.y;
    const Geometry g = geometry(p);
    const long long parts = (long long)p.n * g.chunks * p.c;
    int i0, i1;
    lane_range(p.n * g.chunks, lane, i0, i1);
    float sum_g = 0.0f, sum_gx = 0.0f;
    if (c < p.c)
        for_dataset_chunks(p, g.chunks, d, i0, i1, [&](int i, int) {
            const long long slot = (long long)i * p.c + c;
            sum_g += p.workspace[slot];
            sum_gx += p.workspace[parts + slot];
        });
    CDCL_SHARED(float, s_g, [kFinLanes][kFinChans]);
    CDCL_SHARED(float, s_gx, [kFinLanes][kFinChans]);
    s_g[lane][tx] = sum_g;
    s_gx[lane][tx] = sum_gx;
    for (int step = 1; step < kFinLanes; step *= 2) {
        __syncthreads();
        if (lane % (2 * step) == 0) {
            sum_g += s_g[lane + step][tx];
            sum_gx += s_gx[lane + step][tx];
            s_g[lane][tx] = sum_g;
            s_gx[lane][tx] = sum_gx;
        }
    }
    if (lane != 0 || c >= p.c) return;
    const int i = d * p.c + c;
    p.dbeta[i] = sum_g;
    p.dgamma[i] = sum_gx;
    if (c == 0) {
        int samples = 0;
        for (int n = 0; n < p.n; ++n) samples += (dataset_of(p, n) == d);
        p.workspace[2 * parts + d] = samples ? 1.0f / ((float)samples * (float)g.hw) : 0.0f;
    }
}

// dx = gamma * invstd * (g - dbeta / M - xhat * dgamma / M) with batch statistics (M values per
// channel of the sample's dataset); with frozen statistics the mean and variance are constants
// and dx = gamma * invstd * g. Tiled like dsbn_apply.
template <typename T>
__global__ void dsbn_backward_dx(const cdcl_dsbn_params p, int training, unsigned tiles_per_sample, long long inv_m_at) {
    if (error_raised(p.err)) return;
    const ElemTile t = elem_tile(p, tiles_per_sample);
    const int d = dataset_of(p, t.n);
    if (t.c >= p.c || d < 0) return;
    const int s = d * p.c + t.c;
    const NormStats st = norm_stats(p, s, training != 0);
    const float k = p.gamma[s] * st.invstd;
    // 1/M, M = every value of dataset d (its samples times the pixels per sample), left by
    // dsbn_backward_finalize at workspace[inv_m_at + d] after the partials.
    const float inv_m = training ? p.workspace[inv_m_at + d] : 0.0f;
    const float dbeta = training ? p.dbeta[s] : 0.0f, dgamma = training ? p.dgamma[s] : 0.0f;
    const T* x = static_cast<const T*>(p.x);
    const T* dy = static_cast<const T*>(p.dy);
    T* dx = static_cast<T*>(p.dx);
    for (int pix = t.pix0; pix < t.pix1; pix += kRows) {
        const long long e = t.base + (long long)pix * p.c;
        const float xv = to_f32(x[e]);
        const float gv = masked_grad<T>(p, to_f32(dy[e]), xv, st, s, e);
        if (p.dresidual) static_cast<T*>(p.dresidual)[e] = from_f32<T>(gv);  // the residual branch's gradient
        float v;
        if (training) {
            const float xhat = (xv - st.mean) * st.invstd;
            v = k * (gv - dbeta * inv_m - xhat * dgamma * inv_m);
        } else {
            v = k * gv;
        }
        dx[e] = from_f32<T>(v);
    }
}

// The elementwise passes' grid: sample-major pixel tiles x channel blocks; and the tiles per sample.
__host__ inline unsigned elem_tiles(const cdcl_dsbn_params& p) { return ceil_div((unsigned)(p.h * p.w), kTilePixels); }
__host__ inline dim3 elem_grid(const cdcl_dsbn_params& p) {
    return dim3((unsigned)p.n * elem_tiles(p), ceil_div((unsigned)p.c, kChanPerBlock), 1);
}

__host__ inline bool params_ok(const cdcl_dsbn_params* p) {
    return p && p->n > 0 && p->h > 0 && p->w > 0 && p->c > 0 && p->num_datasets > 0 && p->dataset && p->x &&
           p->err && (long long)p->n * geometry(*p).chunks <= 2147483647LL &&
           (long long)p->num_datasets * p->c <= 2147483647LL && p->num_datasets < 65536 &&
           (long long)p->h * p->w <= 2147483647LL - kTilePixels &&
           (long long)p->n * (((long long)p->h * p->w + kTilePixels - 1) / kTilePixels) <= 2147483647LL &&
           (p->c + kChanPerBlock - 1) / kChanPerBlock < 65536;
}

__host__ inline dim3 partial_grid(const cdcl_dsbn_params& p) {
    return dim3((unsigned)(p.n * geometry(p).chunks), ceil_div((unsigned)p.c, kChanPerBlock), 1);
}

// The finalize kernels' grid and block: kFinChans channels x kFinLanes lanes, one dataset per
// grid row.
__host__ inline dim3 finalize_grid(const cdcl_dsbn_params& p) {
    return dim3(ceil_div((unsigned)p.c, kFinChans), (unsigned)p.num_datasets, 1);
}
__host__ inline dim3 finalize_block() { return dim3(kFinChans, kFinLanes, 1); }

}  // namespace CDCL_NAMESPACE

using namespace CDCL_NAMESPACE;

CDCL_API size_t CDCL_PREFIX(dsbn_workspace_bytes)(const cdcl_dsbn_params* p) {
    if (!p || p->n <= 0 || p->h <= 0 || p->w <= 0 || p->c <= 0) return 0;
    // Two partials per (chunk, channel), then 1/M per dataset.
    return (2 * (size_t)p->n * (size_t)geometry(*p).chunks * (size_t)p->c + (size_t)(p->num_datasets > 0 ? p->num_datasets : 0)) *
           sizeof(float);
}

CDCL_API int32_t CDCL_PREFIX(dsbn_forward_train)(const cdcl_dsbn_params* pp, void* stream) {
    if (!params_ok(pp) || !pp->y || !pp->gamma || !pp->beta || !pp->running_mean || !pp->running_var ||
        !pp->save_mean || !pp->save_invstd || !pp->workspace)
        return CDCL_ERR_INVALID_PARAMS;
    const cdcl_dsbn_params p = *pp;
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        int st = CDCL_LAUNCH(dsbn_validate, dim3(1), dim3(kElemThreads), 0, stream, p, 1);
        if (st == CDCL_OK) st = CDCL_LAUNCH(dsbn_stats_partial<T>, partial_grid(p), dim3(kChanPerBlock, kRows), 0, stream, p);
        if (st == CDCL_OK) st = CDCL_LAUNCH(dsbn_stats_finalize, finalize_grid(p), finalize_block(), 0, stream, p);
        if (st == CDCL_OK) st = CDCL_LAUNCH(dsbn_apply<T>, elem_grid(p), dim3(kChanPerBlock, kRows), 0, stream, p, elem_tiles(p));
        return st;
    });
}

CDCL_API int32_t CDCL_PREFIX(dsbn_forward_infer)(const cdcl_dsbn_params* pp, void* stream) {
    if (!params_ok(pp) || !pp->y || !pp->gamma || !pp->beta || !pp->running_mean || !pp->running_var)
        return CDCL_ERR_INVALID_PARAMS;
    const cdcl_dsbn_params p = *pp;
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        int st = CDCL_LAUNCH(dsbn_validate, dim3(1), dim3(kElemThreads), 0, stream, p, 0);
        if (st == CDCL_OK) st = CDCL_LAUNCH(dsbn_infer<T>, elem_grid(p), dim3(kChanPerBlock, kRows), 0, stream, p, elem_tiles(p));
        return st;
    });
}

static int32_t dsbn_backward(const cdcl_dsbn_params* pp, void* stream, int training) {
    if (!params_ok(pp) || !pp->dy || !pp->dx || !pp->gamma || !pp->beta || !pp->dgamma || !pp->dbeta ||
        !pp->workspace)
        return CDCL_ERR_INVALID_PARAMS;
    if (training ? (!pp->save_mean || !pp->save_invstd) : (!pp->running_mean || !pp->running_var))
        return CDCL_ERR_INVALID_PARAMS;
    const cdcl_dsbn_params p = *pp;
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        int st = CDCL_LAUNCH(dsbn_validate, dim3(1), dim3(kElemThreads), 0, stream, p, 0);
        if (st == CDCL_OK)
            st = CDCL_LAUNCH(dsbn_backward_partial<T>, partial_grid(p), dim3(kChanPerBlock, kRows), 0, stream, p, training);
        if (st == CDCL_OK) st = CDCL_LAUNCH(dsbn_backward_finalize, finalize_grid(p), finalize_block(), 0, stream, p);
        if (st == CDCL_OK) st = CDCL_LAUNCH(dsbn_backward_dx<T>, elem_grid(p), dim3(kChanPerBlock, kRows), 0, stream, p, training,
                                     elem_tiles(p), 2 * (long long)p.n * geometry(p).chunks * p.c);
        return st;
    });
}

CDCL_API int32_t CDCL_PREFIX(dsbn_backward_train)(const cdcl_dsbn_params* pp, void* stream) {
    return dsbn_backward(pp, stream, 1);
}

CDCL_API int32_t CDCL_PREFIX(dsbn_backward_infer)(const cdcl_dsbn_params* pp, void* stream) {
    return dsbn_backward(pp, stream, 0);
}

// Statistics from partials a producer already wrote into the workspace in this file's layout
// (the convolution's training epilogue: chunk_pixels = its 64-row tile): validate, finalize.
CDCL_API int32_t CDCL_PREFIX(dsbn_stats_from_partials)(const cdcl_dsbn_params* pp, void* stream) {
    if (!params_ok(pp) || !pp->running_mean || !pp->running_var || !pp->save_mean || !pp->save_invstd || !pp->workspace)
        return CDCL_ERR_INVALID_PARAMS;
    const cdcl_dsbn_params p = *pp;
    int st = CDCL_LAUNCH(dsbn_validate, dim3(1), dim3(kElemThreads), 0, stream, p, 1);
    if (st == CDCL_OK) st = CDCL_LAUNCH(dsbn_stats_finalize, finalize_grid(p), finalize_block(), 0, stream, p);
    return st;
}

// The apply pass alone, with saved statistics (and optional residual): y = relu?(BN(x) + r).
CDCL_API int32_t CDCL_PREFIX(dsbn_apply)(const cdcl_dsbn_params* pp, void* stream) {
    if (!params_ok(pp) || !pp->y || !pp->gamma || !pp->beta || !pp->save_mean || !pp->save_invstd)
        return CDCL_ERR_INVALID_PARAMS;
    const cdcl_dsbn_params p = *pp;
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        int st = CDCL_LAUNCH(dsbn_validate, dim3(1), dim3(kElemThreads), 0, stream, p, 0);
        if (st == CDCL_OK) st = CDCL_LAUNCH(dsbn_apply<T>, elem_grid(p), dim3(kChanPerBlock, kRows), 0, stream, p, elem_tiles(p));
        return st;
    });
}

// Dataset indices only: for fused consumers (the convolution's epilogues) that read them.
CDCL_API int32_t CDCL_PREFIX(dsbn_validate_indices)(const cdcl_dsbn_params* pp, void* stream) {
    if (!pp || pp->n <= 0 || pp->num_datasets <= 0 || !pp->dataset || !pp->err) return CDCL_ERR_INVALID_PARAMS;
    const cdcl_dsbn_params p = *pp;
    return CDCL_LAUNCH(dsbn_validate, dim3(1), dim3(kElemThreads), 0, stream, p, 0);
}
