// Convolution as implicit GEMM over NHWC activations and KRSC weights, f32 (FFMA, or tensor cores
// in TF32 with allow_tf32) or f16 / bf16 storage through tensor cores (nvcuda::wmma, f32
// accumulation), forward and backward, any
// stride, padding and dilation, any channel counts. One tiled GEMM mainloop serves three problems:
//   forward:          M = N*P*Q, N = K, K = R*S*C   (A = im2col(x), B = w^T)
//   data gradient:    M = N*H*W, N = C, K = R*S*K   (A = the strided gather of dy, B = w)
//   filter gradient:  M = K,     N = R*S*C, K = N*P*Q (A = dy^T, B = im2col(x)), split over the
//                     reduction into fixed slices summed in a fixed order (deterministic split-K)
// The im2col matrices are never formed: each problem's loader computes the source element of a
// (row, reduction) pair on the fly and returns 0 outside the image. Design and model:
// docs/kernels.md.
#include "cdcl_device.cuh"

namespace CDCL_NAMESPACE {

// 64x64 output tile per block of 256 threads, 4x4 outputs per thread (the FFMA mainloop: a
// contiguous 4x4 micro-tile), 16-deep reduction steps,
// double-buffered through shared memory with one barrier per step.
constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kBK = 16;
constexpr int kThreads = 256;
constexpr int kPad = 4;  // row padding of the shared tiles (bank spreading)
// Split-K of the filter gradient: slices of this many reduction rows (N*P*Q), at most kMaxSplit.
constexpr long long kSplitRows = 8192;
constexpr int kMaxSplit = 32;

__host__ __device__ __forceinline__ int conv_split(const cdcl_conv_params& p) {
    const long long rows = (long long)p.n * p.p * p.q;
    long long s = (rows + kSplitRows - 1) / kSplitRows;
    return (int)(s < 1 ? 1 : (s > kMaxSplit ? kMaxSplit : s));
}

// ---- fused DSBN: prologue (previous block's BN + ReLU on load), epilogues -----------------------

// The same expression as kernels/dsbn.cu's affine(): fused and unfused chains agree bit for bit.
__device__ __forceinline__ float bn_affine(float x, float mean, float invstd, float gamma, float beta) {
    return fmaf((x - mean) * invstd, gamma, beta);
}

__device__ __forceinline__ int sample_dataset(const cdcl_conv_params& p, int n) {
    const int d = p.dataset[n];
    return (d >= 0 && d < p.num_datasets) ? d : -1;
}

#include "conv_operands.cuh"

// ---- the three problems: sizes, operands, epilogues --------------------------------------------

// T: the storage type of x, weight, residual and y (f32, or f16 / bf16 for the tensor-core
// mainloop); values are f32 in registers.
template <typename T>
struct ConvForward {
    const cdcl_conv_params& p;
    __device__ long long rows() const { return (long long)p.n * p.p * p.q; }
    __device__ int cols() const { return p.k; }
    __device__ long long depth() const { return (long long)p.r * p.s * p.c; }
    // Both operands are contiguous along the reduction (4 consecutive indices = 4 channels of
    // one filter tap) when C is a multiple of 4.
    static constexpr int kVecA = kAlongK, kVecB = kAlongK;
    __device__ bool vec_a() const { return p.c % 4 == 0 && vec4_aligned<T>(p.x); }
    __device__ bool vec_b() const { return p.c % 4 == 0 && vec4_aligned<T>(p.weight); }
    using IterA = Im2colRows<T>;
    struct IterB : Strided<T, kAlongK> {
        __device__ IterB(const cdcl_conv_params& p, long long base, long long bound, long long k0, long long kend, bool v)
            : Strided<T, kAlongK>(static_cast<const T*>(p.weight), (long long)p.r * p.s * p.c, 1, base, bound, k0,
                                  kend, v) {}
    };
    // The prologue's table: per k-step, 16 lanes x the datasets (a barrier between its store and
    // its use when the prologue is on).
    static constexpr int kStageEntries = kStageDatasets * kBK;
    static constexpr bool kStagePerStep = true, kHasPrologue = true;
    // With a per-dataset epilogue, rows are tiled per sample (a tile's statistics belong to one
    // dataset; the inference epilogue knows its sample without a division).
    __device__ long long segment() const { return (p.stats || p.epi_mean) ? (long long)p.p * p.q : 0; }
    // The value written to y: conv + bias, then the inference epilogue if any. `sample` is the
    // tile's sample when rows are tiled per sample.
    __device__ float finish(long long sample, long long m, int col, float v) const {
        if (p.bias) v += p.bias[col];
        if (p.epi_mean) {
            const int d = sample_dataset(p, (int)sample);
            if (d < 0) return 0.0f;
            const int s = d * p.k + col;
            v = bn_affine(v, p.epi_mean[s], rsqrtf(p.epi_var[s] + p.epi_eps), p.epi_gamma[s], p.epi_beta[s]);
            if (p.residual) v += to_f32(static_cast<const T*>(p.residual)[m * p.k + col]);
            if (p.epi_relu) v = fmaxf(v, 0.0f);
        }
        return v;
    }
    // Returns the value as stored, which is what the statistics describe.
    __device__ float store(long long m, int col, float v, int) const {
        const T t = from_f32<T>(v);
        static_cast<T*>(p.y)[m * p.k + col] = t;
        return to_f32(t);
    }
};

template <typename T>
struct ConvBackwardData {
    const cdcl_conv_params& p;
    // A (dy) is contiguous along the reduction when K is a multiple of 4 (4 consecutive indices
    // = 4 output channels of one tap); B (the weight) along its columns (input channels) when C
    // is.
    static constexpr int kVecA = kAlongK, kVecB = kAlongMN;
    __device__ bool vec_a() const { return p.k % 4 == 0 && vec4_aligned<T>(p.dy); }
    __device__ bool vec_b() const { return p.c % 4 == 0 && vec4_aligned<T>(p.weight); }
    __device__ long long rows() const { return (long long)p.n * p.h * p.w; }
    __device__ int cols() const { return p.c; }
    __device__ long long depth() const { return (long long)p.r * p.s * p.k; }
    using IterA = DgradRows<T>;
    using IterB = DgradWeights<T>;
    static constexpr int kStageEntries = 1;
    static constexpr bool kStagePerStep = false, kHasPrologue = false;
    __device__ long long segment() const { return 0; }
    __device__ float finish(long long, long long, int, float v) const { return v; }
    __device__ float store(long long m, int col, float v, int) const {
        const T t = from_f32<T>(v);
        static_cast<T*>(p.dx)[m * p.c + col] = t;
        return to_f32(t);
    }
};

// With 16-bit storage the split-K slices stay f32 in the workspace; only the final sum (here
// when unsplit, else in conv_filter_reduce) is rounded to T.
template <typename T>
struct ConvBackwardFilter {
    const cdcl_conv_params& p;
    // A (dy^T) is contiguous along its rows (output channels) when K is a multiple of 4, B
    // (im2col(x)) along its columns (4 input channels of one tap) when C is.
    static constexpr int kVecA = kAlongMN, kVecB = kAlongMN;
    __device__ bool vec_a() const { return p.k % 4 == 0 && vec4_aligned<T>(p.dy); }
    __device__ bool vec_b() const { return p.c % 4 == 0 && vec4_aligned<T>(p.x); }
    __device__ long long rows() const { return p.k; }
    __device__ int cols() const { return p.r * p.s * p.c; }
    __device__ long long depth() const { return (long long)p.n * p.p * p.q; }
    struct IterA : Strided<T, kAlongMN> {  // dy^T[m, j] = dy[j * K + m]
        __device__ IterA(const cdcl_conv_params& p, long long base, long long bound, long long k0, long long kend, bool v)
            : Strided<T, kAlongMN>(static_cast<const T*>(p.dy), 1, p.k, base, bound, k0, kend, v) {}
    };
    using IterB = Im2colCols<T>;
    // The prologue's table: the block's 64 columns x the datasets, staged once.
    static constexpr int kStageEntries = kStageDatasets * kBN;
    static constexpr bool kStagePerStep = false, kHasPrologue = true;
    __device__ long long segment() const { return 0; }
    __device__ float finish(long long, long long, int, float v) const { return v; }
    __device__ float store(long long m, int col, float v, int slice) const {
        const long long i = m * cols() + col;
        if (conv_split(p) == 1) {
            const T t = from_f32<T>(v);
            static_cast<T*>(p.dweight)[i] = t;
            return to_f32(t);
        }
        p.workspace[(long long)slice * p.k * cols() + i] = v;
        return v;
    }
};

// Both operands' iterators and registers, shared by the FFMA and the tensor-core mainloops:
// load() issues the next step's global loads (and the prologue table's), stash() writes them to
// shared memory through `sa` / `sb` after the math of the current step.
template <class Prob>
struct Operands {
    typename Prob::IterA ia;
    typename Prob::IterB ib;
    float ra[4], rb[4];
    __device__ Operands(const cdcl_conv_params& p, long long m0, long long rows, int n0, int cols, long long k_begin,
                        long long k_end, bool va, bool vb)
        : ia(p, m0, rows, k_begin, k_end, va), ib(p, n0, cols, k_begin, k_end, vb) {}
    template <bool V, bool Pro>
    __device__ __forceinline__ void load() {
        ia.template stage_fetch<Pro>();
        ia.template load<V>(ra);
        ib.template load<V>(rb);
        ia.template next<Pro>();
        ib.template next<Pro>();
    }
    template <bool V, bool Pro, class SA, class SB>
    __device__ __forceinline__ void stash(BnEntry* stage, SA sa, SB sb) {
        if constexpr (Prob::kStagePerStep && Pro) {
            ia.template stage_store<Pro>(stage);
            __syncthreads();
        }
        ia.template finish<V, Pro>(ra, stage);
        ib.template finish<V, Pro>(rb, stage);
        stash_operand<Prob::kVecA, V>(ra, sa);
        stash_operand<Prob::kVecB, V>(rb, sb);
    }
};

// Training epilogue: per channel of the tile, the mean and M2 of its (up to 64) valid rows, in a
// fixed order: Welford over 16 rows in each of 4 groups, then Chan merges of the groups in
// order. Written in kernels/dsbn.cu's partial layout for its finalize kernel.
// `vals` holds the tile's outputs, staged by the caller before a barrier.
template <int kLd>
__device__ __forceinline__ void tile_statistics(const cdcl_conv_params& p, const float (*vals)[kLd], long long m0,
                                                long long rows, int n0, int cols, unsigned tile) {
    CDCL_SHARED(float, g_cnt, [4][kBN]);
    CDCL_SHARED(float, g_mean, [4][kBN]);
    CDCL_SHARED(float, g_m2, [4][kBN]);
    const int t = (int)threadIdx.x;
    const int col = t % kBN, grp = t / kBN;
    float cnt = 0.0f, mean = 0.0f, m2 = 0.0f;
    for (int r = grp * 16; r < grp * 16 + 16 && m0 + r < rows; ++r) {
        const float v = vals[r][col];
        cnt += 1.0f;
        const float delta = v - mean;
        mean += delta / cnt;
        m2 = fmaf(delta, v - mean, m2);
    }
    g_cnt[grp][col] = cnt;
    g_mean[grp][col] = mean;
    g_m2[grp][col] = m2;
    __syncthreads();
    if (grp == 0 && n0 + col < cols) {
        for (int g = 1; g < 4; ++g) {
            const float nb = g_cnt[g][col];
            if (nb == 0.0f) continue;
            const float n = cnt + nb, delta = g_mean[g][col] - mean, f = nb / n;
            mean = fmaf(delta, f, mean);
            m2 = m2 + g_m2[g][col] + delta * delta * cnt * f;
            cnt = n;
        }
        const long long parts = (long long)p.n * (((long long)p.p * p.q + kBM - 1) / kBM) * p.k;
        const long long slot = (long long)tile * p.k + n0 + col;
        p.stats[slot] = mean;
        p.stats[parts + slot] = m2;
    }
}

// Runs f(Flag<V>, Flag<Pro>) with V (the vector mapping, for both operands) and Pro (the
// prologue on) as compile-time constants: each path gets its own k-loop holding only its own
// code (the choice is uniform per launch).
template <bool B>
struct Flag {
    static constexpr bool value = B;
};
template <class Prob, class F>
__device__ __forceinline__ void dispatch_paths(bool vec, bool pro, F&& f) {
    if constexpr (Prob::kHasPrologue) {
        if (pro) {
            if (vec)
                f(Flag<true>{}, Flag<true>{});
            else
                f(Flag<false>{}, Flag<true>{});
            return;
        }
    }
    if (vec)
        f(Flag<true>{}, Flag<false>{});
    else
        f(Flag<false>{}, Flag<false>{});
}

// The shared mainloop. Tile loads put 16 consecutive threads on 16 consecutive reduction
// indices, which for the forward's A (channels of one pixel) and B (one filter) are contiguous
// in memory. blockIdx.z selects a reduction slice of `slice_len` (the whole depth unless split).
template <class Prob>
__global__ void __launch_bounds__(kThreads, 1) implicit_gemm(const cdcl_conv_params p, long long slice_len) {
    const Prob prob{p};
    const int cols = prob.cols();
    const long long depth = prob.depth();
    // Rows are tiled flat, or per segment (one sample's P*Q rows) when the epilogue needs
    // tiles that do not straddle samples.
    const long long seg = prob.segment();
    const long long tiles_per_seg = seg > 0 ? (seg + kBM - 1) / kBM : 0;
    const long long seg_idx = seg > 0 ? blockIdx.x / tiles_per_seg : 0;
    const long long m0 = seg > 0 ? seg_idx * seg + (blockIdx.x % tiles_per_seg) * kBM : (long long)blockIdx.x * kBM;
    const long long rows = seg > 0 ? (seg_idx + 1) * seg : prob.rows();  // end of this tile's rows
    const int n0 = (int)blockIdx.y * kBN;
    const long long k_begin = (long long)blockIdx.z * slice_len;
    const long long k_end = k_begin + slice_len < depth ? k_begin + slice_len : depth;
    const int t = (int)threadIdx.x;
    // compute: the 4x4 micro-tile of rows 4ty..4ty+3 and columns 4tx..4tx+3, so that each
    // k-step reads its 4 A values and 4 B values with one 128-bit shared load each (LDS.128).
    const int tx = t % 16, ty = t / 16;

    struct alignas(16) FTiles {  // rows of kBM + kPad = 68 floats: every 4-aligned float4 16-byte aligned
        float a[2][kBK][kBM + kPad];
        float b[2][kBK][kBN + kPad];
    };
    CDCL_SHARED(FTiles, ft, );
    auto& As = ft.a;
    auto& Bs = ft.b;
    CDCL_SHARED(BnEntry, stage, [Prob::kStageEntries]);
    const bool vec = prob.vec_a() && prob.vec_b();  // the vector fast paths (see Mapping)
    Operands<Prob> ops(p, m0, rows, n0, cols, k_begin, k_end, vec, vec);

    float acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    const long long tiles = k_end > k_begin ? (k_end - k_begin + kBK - 1) / kBK : 0;
    ops.ia.stage_block(stage);
    ops.ib.stage_block(stage);
    dispatch_paths<Prob>(vec, p.pro_mean != nullptr, [&](auto vec_flag, auto pro_flag) {
        using VF = decltype(vec_flag);
        using PF = decltype(pro_flag);
        auto stash = [&](int buf) {
            ops.template stash<VF::value, PF::value>(
                stage, [&](int k, int i, float v) { As[buf][k][i] = v; }, [&](int k, int i, float v) { Bs[buf][k][i] = v; });
        };
        if (tiles > 0) ops.template load<VF::value, PF::value>();
        __syncthreads();  // the block's prologue table
        if (tiles > 0) stash(0);
        __syncthreads();
        for (long long tile = 0; tile < tiles; ++tile) {
            const int cur = (int)(tile & 1);
            const bool more = tile + 1 < tiles;
            if (more) ops.template load<VF::value, PF::value>();  // global loads overlap the math below
            for (int kk = 0; kk < kBK; ++kk) {
                const float4 a4 = *reinterpret_cast<const float4*>(&As[cur][kk][4 * ty]);
                const float4 b4 = *reinterpret_cast<const float4*>(&Bs[cur][kk][4 * tx]);
                const float a[4] = {a4.x, a4.y, a4.z, a4.w}, b[4] = {b4.x, b4.y, b4.z, b4.w};
                for (int i = 0; i < 4; ++i)
                    for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
            }
            if (more) stash(cur ^ 1);
            __syncthreads();
        }
    });
    CDCL_UNROLL
    for (int i = 0; i < 4; ++i) {
        const long long m = m0 + 4 * ty + i;
        CDCL_UNROLL
        for (int j = 0; j < 4; ++j) {
            const int col = n0 + 4 * tx + j;
            if (m < rows && col < cols) acc[i][j] = prob.store(m, col, prob.finish(seg_idx, m, col, acc[i][j]), (int)blockIdx.z);
        }
    }
    if (p.stats && seg > 0) {
        CDCL_SHARED(float, vals, [kBM][kBN + 1]);
        CDCL_UNROLL
        for (int i = 0; i < 4; ++i)
            CDCL_UNROLL
            for (int j = 0; j < 4; ++j) vals[4 * ty + i][4 * tx + j] = acc[i][j];
        __syncthreads();
        tile_statistics(p, vals, m0, rows, n0, cols, blockIdx.x);
    }
}

// What the tensor cores take for storage type T: the m16n16k16 shape on T itself for 16-bit
// storage; for f32 storage (TF32, `allow_tf32`), the m16n16k8 shape on precision::tf32 with
// every operand rounded once by __float_to_tf32 (cvt.rna.tf32.f32) as it is written to shared
// memory, so the fragments hold TF32 values and the k-loop converts nothing.
template <typename T>
struct MmaOperand {
    using type = T;
    static constexpr int kK = 16;
    __device__ static __forceinline__ T from(float v) { return from_f32<T>(v); }
};
template <>
struct MmaOperand<float> {
    using type = nvcuda::wmma::precision::tf32;
    static constexpr int kK = 8;
    __device__ static __forceinline__ float from(float v) { return nvcuda::wmma::__float_to_tf32(v); }
};

// The tensor-core mainloop for 16-bit storage (T = __half or __nv_bfloat16) and for f32 storage
// through TF32 (T = float), same tiles, loaders and epilogues as implicit_gemm: 64x64 block
// tile, 16-deep reduction steps double-buffered in shared memory as T (A [64][16+pad] row-major,
// B [16][64+pad] row-major, rows padded by 16 bytes, every fragment pointer 32-byte aligned),
// 8 warps each computing a 16x32 strip with two 16x16 accumulators (f32), one (16-bit) or two
// (TF32: k = 8) mma steps per 16-deep step. The accumulators then go through a shared f32 tile
// to the per-element epilogue, whose value is rounded to T before the statistics so that they
// describe what is stored.
template <class Prob, typename T>
__global__ void __launch_bounds__(kThreads, 1) implicit_gemm_wmma(const cdcl_conv_params p, long long slice_len) {
    using namespace nvcuda;
    using Mma = MmaOperand<T>;
    constexpr int kMK = Mma::kK;
    constexpr int kPadT = 16 / (int)sizeof(T);
    constexpr int kLdA = kBK + kPadT, kLdB = kBN + kPadT, kLdC = kBN + 4;
    struct alignas(32) Tiles {
        T a[2][kBM][kLdA];
        T b[2][kBK][kLdB];
        float c[kBM][kLdC];
        BnEntry stage[Prob::kStageEntries];
    };
    const Prob prob{p};
    const int cols = prob.cols();
    const long long depth = prob.depth();
    const long long seg = prob.segment();
    const long long tiles_per_seg = seg > 0 ? (seg + kBM - 1) / kBM : 0;
    const long long seg_idx = seg > 0 ? blockIdx.x / tiles_per_seg : 0;
    const long long m0 = seg > 0 ? seg_idx * seg + (blockIdx.x % tiles_per_seg) * kBM : (long long)blockIdx.x * kBM;
    const long long rows = seg > 0 ? (seg_idx + 1) * seg : prob.rows();
    const int n0 = (int)blockIdx.y * kBN;
    const long long k_begin = (long long)blockIdx.z * slice_len;
    const long long k_end = k_begin + slice_len < depth ? k_begin + slice_len : depth;
    const int t = (int)threadIdx.x;
    const int tx = t % 16, ty = t / 16;
    const int warp = t / 32, wr = (warp % 4) * 16, wc = (warp / 4) * 32;

    CDCL_SHARED(Tiles, sm, );
    const bool vec = prob.vec_a() && prob.vec_b();  // the vector fast paths, as in implicit_gemm
    Operands<Prob> ops(p, m0, rows, n0, cols, k_begin, k_end, vec, vec);

    wmma::fragment<wmma::accumulator, 16, 16, kMK, float> acc[2];
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
    const long long tiles = k_end > k_begin ? (k_end - k_begin + kBK - 1) / kBK : 0;
    ops.ia.stage_block(sm.stage);
    ops.ib.stage_block(sm.stage);
    dispatch_paths<Prob>(vec, p.pro_mean != nullptr, [&](auto vec_flag, auto pro_flag) {
        using VF = decltype(vec_flag);
        using PF = decltype(pro_flag);
        auto stash = [&](int buf) {
            ops.template stash<VF::value, PF::value>(
                sm.stage, [&](int k, int i, float v) { sm.a[buf][i][k] = Mma::from(v); },
                [&](int k, int i, float v) { sm.b[buf][k][i] = Mma::from(v); });
        };
        if (tiles > 0) ops.template load<VF::value, PF::value>();
        __syncthreads();  // the block's prologue table
        if (tiles > 0) stash(0);
        __syncthreads();
        for (long long tile = 0; tile < tiles; ++tile) {
            const int cur = (int)(tile & 1);
            const bool more = tile + 1 < tiles;
            if (more) ops.template load<VF::value, PF::value>();
            CDCL_UNROLL
            for (int kk = 0; kk < kBK; kk += kMK) {
                wmma::fragment<wmma::matrix_a, 16, 16, kMK, typename Mma::type, wmma::row_major> fa;
                wmma::load_matrix_sync(fa, &sm.a[cur][wr][kk], kLdA);
                CDCL_UNROLL
                for (int j = 0; j < 2; ++j) {
                    wmma::fragment<wmma::matrix_b, 16, 16, kMK, typename Mma::type, wmma::row_major> fb;
                    wmma::load_matrix_sync(fb, &sm.b[cur][kk][wc + 16 * j], kLdB);
                    wmma::mma_sync(acc[j], fa, fb, acc[j]);
                }
            }
            if (more) stash(cur ^ 1);
            __syncthreads();
        }
    });
    CDCL_UNROLL
    for (int j = 0; j < 2; ++j) wmma::store_matrix_sync(&sm.c[wr][wc + 16 * j], acc[j], kLdC, wmma::mem_row_major);
    __syncthreads();
    CDCL_UNROLL
    for (int i = 0; i < 4; ++i) {
        const long long m = m0 + ty + 16 * i;
        CDCL_UNROLL
        for (int j = 0; j < 4; ++j) {
            const int col = n0 + tx + 16 * j;
            float v = sm.c[ty + 16 * i][tx + 16 * j];
            if (m < rows && col < cols) v = prob.store(m, col, prob.finish(seg_idx, m, col, v), (int)blockIdx.z);
            sm.c[ty + 16 * i][tx + 16 * j] = v;  // what the statistics describe; read back by this thread only
        }
    }
    if (p.stats && seg > 0) {
        __syncthreads();
        tile_statistics(p, sm.c, m0, rows, n0, cols, blockIdx.x);
    }
}

// dweight = sum of the split-K slices in slice order, rounded once to the storage type.
template <typename T>
__global__ void conv_filter_reduce(const cdcl_conv_params p, int split) {
    const long long total = (long long)p.k * p.r * p.s * p.c;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        float v = 0.0f;
        for (int z = 0; z < split; ++z) v += p.workspace[(long long)z * total + i];
        static_cast<T*>(p.dweight)[i] = from_f32<T>(v);
    }
}

// dbias[k] = sum of dy over n, p, q: 32 filters x 8 rows per block over a chunk of 1024 rows,
// fixed-order row merge in shared memory; then chunks summed in order by conv_bias_finalize.
constexpr int kBiasRows = 1024;
template <typename T>
__global__ void conv_bias_partial(const cdcl_conv_params p, float* partial) {
    const long long rows = (long long)p.n * p.p * p.q;
    const long long r0 = (long long)blockIdx.x * kBiasRows;
    const long long r1 = r0 + kBiasRows < rows ? r0 + kBiasRows : rows;
    const int k = (int)(blockIdx.y * 32 + threadIdx.x);
    float sum = 0.0f;
    if (k < p.k)
        for (long long r = r0 + threadIdx.y; r < r1; r += 8) sum += to_f32(static_cast<const T*>(p.dy)[r * p.k + k]);
    CDCL_SHARED(float, s_sum, [8][32]);
    s_sum[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && k < p.k) {
        for (int y = 1; y < 8; ++y) sum += s_sum[y][threadIdx.x];
        partial[(long long)blockIdx.x * p.k + k] = sum;
    }
}

__global__ void conv_bias_finalize(const cdcl_conv_params p, const float* partial, int chunks) {
    const int k = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (k >= p.k) return;
    float sum = 0.0f;
    for (int i = 0; i < chunks; ++i) sum += partial[(long long)i * p.k + k];
    p.dbias[k] = sum;
}

__host__ inline int bias_chunks(const cdcl_conv_params& p) {
    const long long rows = (long long)p.n * p.p * p.q;
    return (int)((rows + kBiasRows - 1) / kBiasRows);
}

__host__ inline bool conv_params_ok(const cdcl_conv_params* p) {
    if (!p || p->n <= 0 || p->h <= 0 || p->w <= 0 || p->c <= 0 || p->k <= 0 || p->r <= 0 || p->s <= 0) return false;
    if (p->stride_h <= 0 || p->stride_w <= 0 || p->dil_h <= 0 || p->dil_w <= 0 || p->pad_h < 0 || p->pad_w < 0) return false;
    const long long ph = ((long long)p->h + 2LL * p->pad_h - (long long)p->dil_h * (p->r - 1) - 1) / p->stride_h + 1;
    const long long pw = ((long long)p->w + 2LL * p->pad_w - (long long)p->dil_w * (p->s - 1) - 1) / p->stride_w + 1;
    if (ph != p->p || pw != p->q || ph <= 0 || pw <= 0) return false;
    // The iterators index pixels (output rows of the forward and the filter gradient, input
    // rows of the data gradient) as 32-bit ints, with room for the lanes' overshoot.
    if ((long long)p->n * ph * pw > 2147483647LL - 64 || (long long)p->n * p->h * p->w > 2147483647LL - 64) return false;
    // The prologue's tables are staged in shared memory for at most kStageDatasets datasets.
    if (p->pro_mean && p->num_datasets > kStageDatasets) return false;
    // Grid limits: y and z below 65536 blocks.
    const long long rsc = (long long)p->r * p->s * p->c;
    return (p->k + kBN - 1) / kBN < 65536 && (p->c + kBN - 1) / kBN < 65536 && (rsc + kBN - 1) / kBN < 65536 &&
           rsc <= 2147483647LL && (long long)p->r * p->s * p->k <= 2147483647LL;
}

__host__ inline bool conv_dtype_ok(int32_t dtype) {
    return dtype == CDCL_DTYPE_F32 || dtype == CDCL_DTYPE_F16 || dtype == CDCL_DTYPE_BF16;
}

__host__ inline dim3 gemm_grid(long long rows, long long cols, int split) {
    return dim3((unsigned)((rows + kBM - 1) / kBM), (unsigned)((cols + kBN - 1) / kBN), (unsigned)split);
}

}  // namespace CDCL_NAMESPACE

using namespace CDCL_NAMESPACE;

CDCL_API size_t CDCL_PREFIX(conv_workspace_bytes)(const cdcl_conv_params* p) {
    if (!conv_params_ok(p)) return 0;
    const int split = conv_split(*p);
    const size_t filter = split > 1 ? (size_t)split * p->k * p->r * p->s * p->c : 0;
    const size_t bias = (size_t)bias_chunks(*p) * p->k;
    return (filter > bias ? filter : bias) * sizeof(float);
}

CDCL_API int32_t CDCL_PREFIX(conv_forward)(const cdcl_conv_params* pp, void* stream) {
    if (!conv_params_ok(pp) || !pp->x || !pp->weight || !pp->y) return CDCL_ERR_INVALID_PARAMS;
    if (!conv_dtype_ok(pp->dtype)) return CDCL_ERR_UNSUPPORTED_DTYPE;
    const cdcl_conv_params p = *pp;
    if ((p.pro_mean || p.epi_mean || p.stats) && (!p.dataset || p.num_datasets <= 0)) return CDCL_ERR_INVALID_PARAMS;
    if (p.pro_mean && (!p.pro_invstd || !p.pro_gamma || !p.pro_beta)) return CDCL_ERR_INVALID_PARAMS;
    if (p.epi_mean && (!p.epi_var || !p.epi_gamma || !p.epi_beta)) return CDCL_ERR_INVALID_PARAMS;
    const long long pq = (long long)p.p * p.q;
    // Training statistics: one row tile never straddles two samples.
    const long long row_tiles = (p.stats || p.epi_mean) ? p.n * ((pq + kBM - 1) / kBM) : (p.n * pq + kBM - 1) / kBM;
    if (row_tiles > 2147483647LL) return CDCL_ERR_INVALID_PARAMS;
    const dim3 grid((unsigned)row_tiles, (unsigned)((p.k + kBN - 1) / kBN), 1);
    const long long depth = (long long)p.r * p.s * p.c;
    if (p.dtype == CDCL_DTYPE_F16)
        return CDCL_LAUNCH((implicit_gemm_wmma<ConvForward<__half>, __half>), grid, dim3(kThreads), 0, stream, p, depth);
    if (p.dtype == CDCL_DTYPE_BF16)
        return CDCL_LAUNCH((implicit_gemm_wmma<ConvForward<__nv_bfloat16>, __nv_bfloat16>), grid, dim3(kThreads), 0, stream,
                           p, depth);
    if (p.allow_tf32)
        return CDCL_LAUNCH((implicit_gemm_wmma<ConvForward<float>, float>), grid, dim3(kThreads), 0, stream, p, depth);
    return CDCL_LAUNCH(implicit_gemm<ConvForward<float>>, grid, dim3(kThreads), 0, stream, p, depth);
}

// The three storage types of the backward passes: f32 through the FFMA mainloop (or the
// tensor-core one in TF32 with allow_tf32), f16 / bf16 through the tensor-core one.
template <template <typename> class Prob>
__host__ inline int launch_gemm(const cdcl_conv_params& p, dim3 grid, long long slice, void* stream) {
    if (p.dtype == CDCL_DTYPE_F16)
        return CDCL_LAUNCH((implicit_gemm_wmma<Prob<__half>, __half>), grid, dim3(kThreads), 0, stream, p, slice);
    if (p.dtype == CDCL_DTYPE_BF16)
        return CDCL_LAUNCH((implicit_gemm_wmma<Prob<__nv_bfloat16>, __nv_bfloat16>), grid, dim3(kThreads), 0, stream, p,
                           slice);
    if (p.allow_tf32)
        return CDCL_LAUNCH((implicit_gemm_wmma<Prob<float>, float>), grid, dim3(kThreads), 0, stream, p, slice);
    return CDCL_LAUNCH(implicit_gemm<Prob<float>>, grid, dim3(kThreads), 0, stream, p, slice);
}

CDCL_API int32_t CDCL_PREFIX(conv_backward_data)(const cdcl_conv_params* pp, void* stream) {
    if (!conv_params_ok(pp) || !pp->dy || !pp->weight || !pp->dx) return CDCL_ERR_INVALID_PARAMS;
    if (!conv_dtype_ok(pp->dtype)) return CDCL_ERR_UNSUPPORTED_DTYPE;
    const cdcl_conv_params p = *pp;
    const long long rows = (long long)p.n * p.h * p.w;
    const long long depth = (long long)p.r * p.s * p.k;
    return launch_gemm<ConvBackwardData>(p, gemm_grid(rows, p.c, 1), depth, stream);
}

CDCL_API int32_t CDCL_PREFIX(conv_backward_filter)(const cdcl_conv_params* pp, void* stream) {
    if (!conv_params_ok(pp) || !pp->dy || !pp->x || !pp->dweight) return CDCL_ERR_INVALID_PARAMS;
    if (!conv_dtype_ok(pp->dtype)) return CDCL_ERR_UNSUPPORTED_DTYPE;
    const cdcl_conv_params p = *pp;
    const int split = conv_split(p);
    if ((split > 1 || p.dbias) && !p.workspace) return CDCL_ERR_INVALID_PARAMS;
    if (p.pro_mean && (!p.dataset || p.num_datasets <= 0 || !p.pro_invstd || !p.pro_gamma || !p.pro_beta))
        return CDCL_ERR_INVALID_PARAMS;
    const long long reduction = (long long)p.n * p.p * p.q;
    const long long slice = (reduction + split - 1) / split;
    const long long rsc = (long long)p.r * p.s * p.c;
    int st = launch_gemm<ConvBackwardFilter>(p, gemm_grid(p.k, rsc, split), slice, stream);
    const auto by_dtype = [&](auto tag) -> int {
        using T = decltype(tag);
        int s = CDCL_OK;
        if (split > 1) {
            const long long total = p.k * rsc;
            const unsigned blocks = (unsigned)((total + 255) / 256 < 1024 ? (total + 255) / 256 : 1024);
            s = CDCL_LAUNCH(conv_filter_reduce<T>, dim3(blocks), dim3(256), 0, stream, p, split);
        }
        if (s == CDCL_OK && p.dbias) {
            // The workspace is free again once the filter reduction has consumed it (same stream).
            const int chunks = bias_chunks(p);
            s = CDCL_LAUNCH(conv_bias_partial<T>, dim3((unsigned)chunks, ceil_div((unsigned)p.k, 32)), dim3(32, 8), 0,
                            stream, p, p.workspace);
            if (s == CDCL_OK)
                s = CDCL_LAUNCH(conv_bias_finalize, dim3(ceil_div((unsigned)p.k, 256)), dim3(256), 0, stream, p,
                                (const float*)p.workspace, chunks);
        }
        return s;
    };
    return st != CDCL_OK ? st : dispatch_float_dtype(p.dtype, by_dtype);
}
