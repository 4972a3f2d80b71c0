// Universal Semi-Supervised Segmentation (USSS) entropy regularisation over NHWC pixel
// features. Every sample n carries a dataset index d = dataset[n]; the class prototypes of all
// datasets form one [P, E] f32 table whose rows proto_offset[d'] .. proto_offset[d'+1] belong to
// dataset d'. For an included pixel with feature f and every dataset d':
//     s_j = <f, proto_j> / T  (j in d'),   p = softmax(s),   H_d' = -sum_j p_j log p_j
// L_within = mean over included pixels of H_d (own dataset); L_cross = mean over included pixels
// of the mean of H_d' over the D-1 other datasets (0 when D = 1);
// loss = alpha * L_cross + beta * L_within.
//
// Forward:  validate -> transpose -> pixels_forward -> finalize
// Backward: validate -> transpose -> count -> pixels_backward
//
// One warp owns one pixel at a time (grid-stride over pixels, fixed by the problem shape): it
// stages f in shared memory, computes the P logits (lane j: prototype j, from the transposed
// table so that the lanes read consecutive addresses), then lane d' computes the stable
// log-sum-exp and entropy of dataset d'. Sums have fixed owners and a fixed merge order (lane ->
// warp -> block partial -> one finalize block), no floating-point atomics. Design and cost model:
// docs/kernels.md.
#include "cdcl_device.cuh"

namespace CDCL_NAMESPACE {

constexpr int kWarp = 32;
constexpr int kMaxWarps = 8;          // 256 threads per block at most
constexpr int kFinalizeThreads = 256;
constexpr unsigned kMaxBlocks = 1024;  // grid-stride beyond: 8192 warps fill an H100
// Dynamic shared memory per block: kept under 48 KiB together with the static reduction arrays.
constexpr int kDynSmemBudget = 40 * 1024;

struct Geometry {
    long long pixels;  // n * h * w
    int stride;        // floats of shared memory per warp: f[e], s[P], 3 per dataset
    int warps;         // warps per block
    unsigned blocks;
};

__host__ __device__ __forceinline__ Geometry geometry(const cdcl_usss_params& p) {
    Geometry g;
    g.pixels = (long long)p.n * p.h * p.w;
    g.stride = p.e + p.num_protos + 3 * p.num_datasets;
    int w = kDynSmemBudget / (g.stride * (int)sizeof(float));
    g.warps = w < 1 ? 1 : (w > kMaxWarps ? kMaxWarps : w);
    const long long b = (g.pixels + g.warps - 1) / g.warps;
    g.blocks = (unsigned)(b < 1 ? 1 : (b > (long long)kMaxBlocks ? (long long)kMaxBlocks : b));
    return g;
}

// Workspace: transposed prototypes [e][P], dataset of each prototype [P], then per block the
// partial sums (within, cross) and the included-pixel count.
struct Workspace {
    float* proto_t;
    int* proto_dataset;
    float* partial;
    unsigned* count;
};

__host__ __device__ __forceinline__ size_t workspace_floats(const cdcl_usss_params& p) {
    const Geometry g = geometry(p);
    return (size_t)p.e * p.num_protos + (size_t)p.num_protos + 3 * (size_t)g.blocks;
}

__device__ __forceinline__ Workspace workspace(const cdcl_usss_params& p) {
    const Geometry g = geometry(p);
    float* base = static_cast<float*>(p.workspace);
    Workspace ws;
    ws.proto_t = base;
    ws.proto_dataset = reinterpret_cast<int*>(base + (size_t)p.e * p.num_protos);
    ws.partial = base + (size_t)p.e * p.num_protos + p.num_protos;
    ws.count = reinterpret_cast<unsigned*>(ws.partial + 2 * (size_t)g.blocks);
    return ws;
}

// Dataset of the pixel's sample when the pixel takes part, else -1 (excluded by the mask, or a
// bad dataset index, which the validate kernel reports).
__device__ __forceinline__ int pixel_dataset(const cdcl_usss_params& p, long long pix, long long hw) {
    const int d = p.dataset[pix / hw];
    if (d < 0 || d >= p.num_datasets) return -1;
    if (p.mask && p.mask[pix] == 0) return -1;
    return d;
}

__global__ void usss_validate(const cdcl_usss_params p) {
    for (int n = (int)threadIdx.x; n < p.n; n += (int)blockDim.x) {
        const int d = p.dataset[n];
        if (d < 0 || d >= p.num_datasets) raise_error(p.err, CDCL_ERRSLOT_DATASET_INDEX, (unsigned)n, d);
    }
}

// proto_t[k][j] = protos[j][k]; proto_dataset[j] = the dataset that owns row j.
__global__ void usss_transpose(const cdcl_usss_params p) {
    if (error_raised(p.err)) return;
    const Workspace ws = workspace(p);
    const long long total = (long long)p.e * p.num_protos;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int j = (int)(i % p.num_protos);
        const long long k = i / p.num_protos;
        ws.proto_t[i] = p.protos[(long long)j * p.e + k];
        if (k == 0) {
            int d = 0;
            while (d + 1 < p.num_datasets && p.proto_offset[d + 1] <= j) ++d;
            ws.proto_dataset[j] = d;
        }
    }
}

// Stages the feature of pixel `pix` in f and writes its P logits s_j = <f, proto_j> / T to s.
// Every lane of the warp calls it.
template <typename T>
__device__ __forceinline__ void logits(const cdcl_usss_params& p, const float* proto_t, long long pix, int lane,
                                       float* f, float* s) {
    const T* x = static_cast<const T*>(p.x) + pix * p.e;
    for (int k = lane; k < p.e; k += kWarp) f[k] = to_f32(x[k]);
    __syncwarp();
    for (int j = lane; j < p.num_protos; j += kWarp) {
        float acc = 0.0f;
        for (int k = 0; k < p.e; ++k) acc = fmaf(f[k], proto_t[(long long)k * p.num_protos + j], acc);
        s[j] = acc * p.inv_temperature;
    }
    __syncwarp();
}

// Log-sum-exp and entropy of the logits s[o0..o1) with the maximum subtracted:
// z_j = s_j - m, Z = sum e^z, log p_j = z_j - log Z, H = log Z - (sum e^z z) / Z.
struct SegmentStats {
    float lse;  // m + log Z
    float entropy;
};

__device__ __forceinline__ SegmentStats segment_stats(const float* s, int o0, int o1) {
    float m = -INFINITY;
    for (int j = o0; j < o1; ++j) m = fmaxf(m, s[j]);
    float z_sum = 0.0f, a_sum = 0.0f;
    for (int j = o0; j < o1; ++j) {
        const float z = s[j] - m;
        const float ez = expf(z);
        z_sum += ez;
        a_sum = fmaf(ez, z, a_sum);
    }
    const float log_z = logf(z_sum);
    SegmentStats st;
    st.lse = m + log_z;
    st.entropy = log_z - a_sum / z_sum;
    return st;
}

// Per block: sum over its included pixels of H_own and of sum_{d' != d} H_d', and the count.
// Lane d' accumulates the entropies of dataset d' (datasets beyond 32 loop), so the merge order
// is lane, then warp, then block, all fixed.
template <typename T>
__global__ void usss_pixels_forward(const cdcl_usss_params p) {
    if (error_raised(p.err)) return;
    const Geometry g = geometry(p);
    const Workspace ws = workspace(p);
    const long long hw = (long long)p.h * p.w;
    const int lane = (int)(threadIdx.x % kWarp), warp = (int)(threadIdx.x / kWarp);
    CDCL_DYNAMIC_SHARED(float, smem);
    float* f = smem + (size_t)warp * g.stride;
    float* s = f + p.e;

    float acc_within = 0.0f, acc_cross = 0.0f;
    unsigned count = 0;
    for (long long pix = (long long)blockIdx.x * g.warps + warp; pix < g.pixels; pix += (long long)gridDim.x * g.warps) {
        const int d = pixel_dataset(p, pix, hw);  // the same for every lane of the warp
        if (d < 0) continue;
        logits<T>(p, ws.proto_t, pix, lane, f, s);
        for (int dd = lane; dd < p.num_datasets; dd += kWarp) {
            const float h = segment_stats(s, p.proto_offset[dd], p.proto_offset[dd + 1]).entropy;
            if (dd == d)
                acc_within += h;
            else
                acc_cross += h;
        }
        count += (lane == 0);
        // No barrier needed here: the next pixel writes s only after the __syncwarp in
        // logits(), which every lane reaches after it has finished reading s above.
    }

    CDCL_SHARED(float, s_within, [kMaxWarps][kWarp]);
    CDCL_SHARED(float, s_cross, [kMaxWarps][kWarp]);
    CDCL_SHARED(unsigned, s_count, [kMaxWarps]);
    s_within[warp][lane] = acc_within;
    s_cross[warp][lane] = acc_cross;
    if (lane == 0) s_count[warp] = count;
    __syncthreads();
    if (threadIdx.x == 0) {
        float sw = 0.0f, sc = 0.0f;
        unsigned cnt = 0;
        for (int w = 0; w < g.warps; ++w) {
            for (int l = 0; l < kWarp; ++l) {
                sw += s_within[w][l];
                sc += s_cross[w][l];
            }
            cnt += s_count[w];
        }
        ws.partial[2 * blockIdx.x] = sw;
        ws.partial[2 * blockIdx.x + 1] = sc;
        ws.count[blockIdx.x] = cnt;
    }
}

// One block: merges the block partials in a fixed order and writes total, cross, within.
__global__ void usss_finalize(const cdcl_usss_params p) {
    if (error_raised(p.err)) return;
    const Geometry g = geometry(p);
    const Workspace ws = workspace(p);
    const int t = (int)threadIdx.x;
    float sw = 0.0f, sc = 0.0f;
    unsigned long long cnt = 0;
    for (unsigned b = (unsigned)t; b < g.blocks; b += kFinalizeThreads) {
        sw += ws.partial[2 * b];
        sc += ws.partial[2 * b + 1];
        cnt += ws.count[b];
    }
    CDCL_SHARED(float, s_within, [kFinalizeThreads]);
    CDCL_SHARED(float, s_cross, [kFinalizeThreads]);
    CDCL_SHARED(unsigned long long, s_count, [kFinalizeThreads]);
    s_within[t] = sw;
    s_cross[t] = sc;
    s_count[t] = cnt;
    __syncthreads();
    for (int half = kFinalizeThreads / 2; half > 0; half /= 2) {
        if (t < half) {
            s_within[t] += s_within[t + half];
            s_cross[t] += s_cross[t + half];
            s_count[t] += s_count[t + half];
        }
        __syncthreads();
    }
    if (t == 0) {
        const unsigned long long m = s_count[0];
        float within = 0.0f, cross = 0.0f;
        if (m > 0) {
            within = s_within[0] / (float)m;
            if (p.num_datasets > 1) cross = s_cross[0] / ((float)m * (float)(p.num_datasets - 1));
        }
        p.out[0] = fmaf(p.alpha, cross, p.beta * within);
        p.out[1] = cross;
        p.out[2] = within;
    }
}

// Per block: the number of included pixels of the same pixel ranges as the pixel kernels.
__global__ void usss_count(const cdcl_usss_params p) {
    if (error_raised(p.err)) return;
    const Geometry g = geometry(p);
    const Workspace ws = workspace(p);
    const long long hw = (long long)p.h * p.w;
    unsigned cnt = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long pix = (long long)blockIdx.x * blockDim.x + threadIdx.x; pix < g.pixels; pix += stride)
        cnt += (pixel_dataset(p, pix, hw) >= 0);
    CDCL_SHARED(unsigned, s_count, [kMaxWarps * kWarp]);
    s_count[threadIdx.x] = cnt;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned total = 0;
        for (unsigned i = 0; i < blockDim.x; ++i) total += s_count[i];
        ws.count[blockIdx.x] = total;
    }
}

// dx = sum over the datasets d' of the pixel of w_d' * sum_j dH_d'/ds_j * proto_j / T, with
// dH/ds_j = -p_j (log p_j + H), w_own = grad * beta / M and w_other = grad * alpha / (M (D-1)),
// M = the number of included pixels. Excluded pixels get 0.
template <typename T>
__global__ void usss_pixels_backward(const cdcl_usss_params p) {
    if (error_raised(p.err)) return;
    const Geometry g = geometry(p);
    const Workspace ws = workspace(p);
    const long long hw = (long long)p.h * p.w;
    const int lane = (int)(threadIdx.x % kWarp), warp = (int)(threadIdx.x / kWarp);
    CDCL_DYNAMIC_SHARED(float, smem);
    float* f = smem + (size_t)warp * g.stride;
    float* s = f + p.e;
    float* seg = s + p.num_protos;  // per dataset: log-sum-exp, entropy, weight
    T* dx = static_cast<T*>(p.dx);

    // M: integer sum of the count kernel's per-block counts (exact, so any order gives it).
    unsigned long long m = 0;
    for (unsigned b = (unsigned)lane; b < g.blocks; b += kWarp) m += ws.count[b];
    for (int o = kWarp / 2; o > 0; o /= 2) m += __shfl_xor_sync(0xffffffffu, m, o);
    const float w_own = m ? p.grad * p.beta / (float)m : 0.0f;
    const float w_other = (m && p.num_datasets > 1) ? p.grad * p.alpha / ((float)m * (float)(p.num_datasets - 1)) : 0.0f;

    for (long long pix = (long long)blockIdx.x * g.warps + warp; pix < g.pixels; pix += (long long)gridDim.x * g.warps) {
        const int d = pixel_dataset(p, pix, hw);
        T* out = dx + pix * p.e;
        if (d < 0) {
            for (int k = lane; k < p.e; k += kWarp) out[k] = from_f32<T>(0.0f);
            continue;
        }
        logits<T>(p, ws.proto_t, pix, lane, f, s);
        for (int dd = lane; dd < p.num_datasets; dd += kWarp) {
            const SegmentStats st = segment_stats(s, p.proto_offset[dd], p.proto_offset[dd + 1]);
            seg[3 * dd] = st.lse;
            seg[3 * dd + 1] = st.entropy;
            seg[3 * dd + 2] = dd == d ? w_own : w_other;
        }
        __syncwarp();
        // Lane j turns its own logit into the coefficient of proto_j (it alone reads s[j] here).
        for (int j = lane; j < p.num_protos; j += kWarp) {
            const int dd = ws.proto_dataset[j];
            const float log_p = s[j] - seg[3 * dd];
            const float prob = expf(log_p);
            s[j] = -seg[3 * dd + 2] * p.inv_temperature * prob * (log_p + seg[3 * dd + 1]);
        }
        __syncwarp();
        for (int k = lane; k < p.e; k += kWarp) {
            float acc = 0.0f;
            for (int j = 0; j < p.num_protos; ++j) acc = fmaf(s[j], p.protos[(long long)j * p.e + k], acc);
            out[k] = from_f32<T>(acc);
        }
        // The next pixel rewrites f before its first __syncwarp (f is not read after the logits)
        // and s and seg only after it, when every lane has left the loop above.
    }
}

__host__ inline bool params_ok(const cdcl_usss_params* p) {
    if (!p || p->n <= 0 || p->h <= 0 || p->w <= 0 || p->e <= 0 || p->num_datasets <= 0 || p->num_protos <= 0 ||
        !p->dataset || !p->proto_offset || !p->protos || !p->x || !p->workspace || !p->err ||
        !(p->inv_temperature > 0.0f))
        return false;
    const long long stride = (long long)p->e + p->num_protos + 3LL * p->num_datasets;
    return stride * (long long)sizeof(float) <= kDynSmemBudget;
}

__host__ inline unsigned transpose_blocks(const cdcl_usss_params& p) {
    const long long b = ((long long)p.e * p.num_protos + 255) / 256;
    return (unsigned)(b < 1 ? 1 : (b > (long long)kMaxBlocks ? (long long)kMaxBlocks : b));
}

}  // namespace CDCL_NAMESPACE

using namespace CDCL_NAMESPACE;

CDCL_API size_t CDCL_PREFIX(usss_workspace_bytes)(const cdcl_usss_params* p) {
    if (!p || p->n <= 0 || p->h <= 0 || p->w <= 0 || p->e <= 0 || p->num_datasets <= 0 || p->num_protos <= 0) return 0;
    return workspace_floats(*p) * sizeof(float);
}

CDCL_API int32_t CDCL_PREFIX(usss_forward)(const cdcl_usss_params* pp, void* stream) {
    if (!params_ok(pp) || !pp->out) return CDCL_ERR_INVALID_PARAMS;
    const cdcl_usss_params p = *pp;
    const Geometry g = geometry(p);
    const size_t smem = (size_t)g.warps * g.stride * sizeof(float);
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        int st = CDCL_LAUNCH(usss_validate, dim3(1), dim3(256), 0, stream, p);
        if (st == CDCL_OK) st = CDCL_LAUNCH(usss_transpose, dim3(transpose_blocks(p)), dim3(256), 0, stream, p);
        if (st == CDCL_OK)
            st = CDCL_LAUNCH(usss_pixels_forward<T>, dim3(g.blocks), dim3(g.warps * kWarp), smem, stream, p);
        if (st == CDCL_OK) st = CDCL_LAUNCH(usss_finalize, dim3(1), dim3(kFinalizeThreads), 0, stream, p);
        return st;
    });
}

CDCL_API int32_t CDCL_PREFIX(usss_backward)(const cdcl_usss_params* pp, void* stream) {
    if (!params_ok(pp) || !pp->dx) return CDCL_ERR_INVALID_PARAMS;
    const cdcl_usss_params p = *pp;
    const Geometry g = geometry(p);
    const size_t smem = (size_t)g.warps * g.stride * sizeof(float);
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        int st = CDCL_LAUNCH(usss_validate, dim3(1), dim3(256), 0, stream, p);
        if (st == CDCL_OK) st = CDCL_LAUNCH(usss_transpose, dim3(transpose_blocks(p)), dim3(256), 0, stream, p);
        if (st == CDCL_OK) st = CDCL_LAUNCH(usss_count, dim3(g.blocks), dim3(g.warps * kWarp), 0, stream, p);
        if (st == CDCL_OK)
            st = CDCL_LAUNCH(usss_pixels_backward<T>, dim3(g.blocks), dim3(g.warps * kWarp), smem, stream, p);
        return st;
    });
}
