// Part of kernels/conv.cu, included there inside its namespace after the tile constants and
// the DSBN helpers (bn_affine, sample_dataset): the operands' thread mapping and per-thread
// iterators of the implicit-GEMM mainloops. Not a standalone header.
#pragma once

// ---- operands: the thread mapping and the per-thread iterators ---------------------------------
//
// Each step, a block loads a 16 (reduction) x 64 (rows of A, or columns of B) slab of each
// operand, 4 values per thread. The general mapping puts 16 consecutive threads on 16
// consecutive reduction indices of one row, and works for any sizes. When 4 consecutive
// elements along one axis are contiguous and aligned in memory, a thread loads them with one
// vector instruction instead:
//   kAlongK:  4 consecutive reduction indices of one row (thread t: row t/4, k 4(t%4)..+3);
//   kAlongMN: 4 consecutive rows at one reduction index (thread t: k t/16, rows 4(t%16)..+3).
// Which applies is a property of the problem (its kVecA / kVecB) and of the sizes and pointers
// (its vec_a() / vec_b(), uniform per launch).
//
// In every mapping a thread keeps the same rows and one reduction lane (k advancing by kBK per
// step) for the whole k-loop. So each operand is an iterator: its rows are decomposed once,
// before the loop (pixel -> n, p, q with fast divisors); the lane's coordinates ((r, s, c) of a
// filter tap, or a pixel) advance incrementally, a carry into the next tap costing one fast
// division only when the lane wraps. The k-loop holds no division (tests/sass.rs checks it).
constexpr int kNoVec = 0, kAlongK = 1, kAlongMN = 2;

// The prologue's DSBN tables, staged in shared memory (see Prologue below) for at most this
// many datasets; the launchers refuse a prologue with more.
constexpr int kStageDatasets = 8;

struct alignas(16) BnEntry {
    float mean, invstd, gamma, beta;
};

// A thread's share of one operand's slab: its reduction lane and its 4 rows (offsets in the slab).
struct Mapping {
    int klane;
    int row[4];
};
template <int kMode>
__device__ __forceinline__ Mapping mapping(bool vec) {
    const int t = (int)threadIdx.x;
    Mapping m;
    CDCL_UNROLL
    for (int j = 0; j < 4; ++j) {
        if (kMode == kAlongK && vec) {
            m.klane = (t % 4) * 4;
            m.row[j] = t / 4;
        } else if (kMode == kAlongMN && vec) {
            m.klane = t / 16;
            m.row[j] = (t % 16) * 4 + j;
        } else {
            m.klane = t % 16;
            m.row[j] = t / 16 + 16 * j;
        }
    }
    return m;
}

// Writes what an iterator loaded: `store(k, i, v)` with k the reduction offset in the step and
// i the row offset in the slab.
template <int kMode, bool V, class Store>
__device__ __forceinline__ void stash_operand(const float (&r)[4], Store store) {
    const int t = (int)threadIdx.x;
    if constexpr (kMode != kNoVec) {
        if constexpr (V) {
            CDCL_UNROLL
            for (int j = 0; j < 4; ++j) {
                if (kMode == kAlongK)
                    store((t % 4) * 4 + j, t / 4, r[j]);
                else
                    store(t / 16, (t % 16) * 4 + j, r[j]);
            }
            return;
        }
    }
    if constexpr (kMode == kNoVec || !V) {
        CDCL_UNROLL
        for (int j = 0; j < 4; ++j) store(t % 16, t / 16 + 16 * j, r[j]);
    }
}

// The element of storage type T at `base + off` as f32, or 0 when `in` is false; and the 4
// elements there (one vector load). A masked-off load reads `base` itself (always valid) and
// is discarded: a select instead of a branch around each load.
template <typename T>
__device__ __forceinline__ float load_or_zero(bool in, const T* base, long long off) {
    const float v = to_f32(base[in ? off : 0]);
    return in ? v : 0.0f;
}
template <typename T>
__device__ __forceinline__ void load4_or_zero(bool in, const T* base, long long off, float (&v)[4]) {
    const Vec4<T> x4 = *reinterpret_cast<const Vec4<T>*>(base + (in ? off : 0));
    CDCL_UNROLL
    for (int j = 0; j < 4; ++j) v[j] = in ? to_f32(x4.v[j]) : 0.0f;
}

// What every iterator has: its reduction index, the end of its slice, which mapping it uses and
// which of its rows exist. load() fills r with the current step's elements (zero outside the
// matrix), next() moves one step on. Iterators without a prologue stage nothing.
struct IterBase {
    long long k, k_end;
    bool vec;
    bool ok[4];
    __device__ void stage_block(BnEntry*) const {}
    template <bool Pro>
    __device__ void stage_fetch() {}
    template <bool Pro>
    __device__ void stage_store(BnEntry*) const {}
    template <bool V, bool Pro>
    __device__ void finish(float (&)[4], const BnEntry*) const {}
};

// The prologue: an in-image element of x is read as relu?(bn_affine(x, table[d, c])) with d the
// sample's dataset (0 for an invalid one), so the operands see the previous block's DSBN + ReLU
// without it ever being written. The four table entries of (d, c) come from shared memory,
// staged by the iterator that reads x: per k-step for the forward (16 reduction lanes, i.e. 16
// channels, times the datasets), once per block for the filter gradient (its 64 columns, i.e.
// fixed channels, times the datasets). The raw values are loaded with the step's operands and
// transformed when stashed, so the global loads still overlap the math.
__device__ __forceinline__ float prologue_value(const cdcl_conv_params& p, float raw, const BnEntry& e) {
    const float v = bn_affine(raw, e.mean, e.invstd, e.gamma, e.beta);
    return p.pro_relu ? fmaxf(v, 0.0f) : v;
}
__device__ __forceinline__ BnEntry table_entry(const cdcl_conv_params& p, int d, int c) {
    const int s = d * p.c + c;
    return BnEntry{p.pro_mean[s], p.pro_invstd[s], p.pro_gamma[s], p.pro_beta[s]};
}

// A reduction lane over the filter taps (r, s, ch), ch of `chans` channels: kk = (r*S + s)*chans
// + ch, advancing by kBK with a carry into s and r when ch wraps.
struct TapLane {
    int r, s, ch;
    __device__ void init(int kk, const FastDiv& fch, const FastDiv& fs) {
        const int rs = fch.div(kk);
        ch = kk - rs * fch.d;
        r = fs.div(rs);
        s = rs - r * fs.d;
    }
    // Returns true when the tap changed.
    __device__ __forceinline__ bool next(const FastDiv& fch, const FastDiv& fs) {
        ch += kBK;
        if (ch < fch.d) return false;
        const int carry = fch.div(ch);
        ch -= carry * fch.d;
        s += carry;
        if (s >= fs.d) {
            const int c2 = fs.div(s);
            s -= c2 * fs.d;
            r += c2;
        }
        return true;
    }
};

// The forward's A, im2col(x)[pixel, (r, s, c)]: rows are output pixels (n, p, q).
template <typename T>
struct Im2colRows : IterBase {
    const cdcl_conv_params& p;
    long long xrow[4];  // offset in x of (n, h0, w0, 0), h0 = p*stride - pad (may be outside)
    int h0[4], w0[4];
    int ds[4];  // the row's dataset, for the prologue (-1: invalid index)
    int klane;
    bool live[4];  // the loaded element is in the image (the prologue applies)
    FastDiv fc, fs;
    TapLane lane;
    int rdh, sdw;
    long long koff;  // offset of (r*dil_h, s*dil_w, c) from a pixel window's origin
    // The per-step table: thread t < 16 * datasets holds entry (t / 16, lane t % 16).
    int tc;
    BnEntry te;

    __device__ Im2colRows(const cdcl_conv_params& pr, long long base, long long bound, long long k0, long long kend,
                          bool v)
        : p(pr), fc(pr.c), fs(pr.s) {
        const Mapping mp = mapping<kAlongK>(v);
        k = k0 + mp.klane;
        k_end = kend;
        vec = v;
        klane = mp.klane;
        const FastDiv fq(p.q), fp(p.p);
        CDCL_UNROLL
        for (int j = 0; j < 4; ++j) {
            const long long m = base + mp.row[j];
            ok[j] = m < bound;
            const int mi = ok[j] ? (int)m : 0;
            const int t = fq.div(mi), q = mi - t * p.q;
            const int n = fp.div(t), pp = t - n * p.p;
            h0[j] = pp * p.stride_h - p.pad_h;
            w0[j] = q * p.stride_w - p.pad_w;
            xrow[j] = (((long long)n * p.h + h0[j]) * p.w + w0[j]) * p.c;
            ds[j] = p.pro_mean ? sample_dataset(p, n) : -1;
            live[j] = false;
        }
        lane.init((int)k, fc, fs);
        rdh = lane.r * p.dil_h;
        sdw = lane.s * p.dil_w;
        koff = ((long long)rdh * p.w + sdw) * p.c + lane.ch;
        tc = fc.mod((int)(k0 + threadIdx.x % 16));
    }
    __device__ __forceinline__ bool inside(int j) const {
        const int h = h0[j] + rdh, w = w0[j] + sdw;
        return ok[j] && k < k_end && (unsigned)h < (unsigned)p.h && (unsigned)w < (unsigned)p.w;
    }
    template <bool V>
    __device__ __forceinline__ void load(float (&r)[4]) {
        const T* x = static_cast<const T*>(p.x);
        if constexpr (V) {
            live[0] = inside(0);
            load4_or_zero(live[0], x, xrow[0] + koff, r);
        } else {
            CDCL_UNROLL
            for (int j = 0; j < 4; ++j) {
                live[j] = inside(j);
                r[j] = load_or_zero(live[j], x, xrow[j] + koff);
            }
        }
    }
    template <bool Pro>
    __device__ __forceinline__ void next() {
        k += kBK;
        if (lane.next(fc, fs)) {
            rdh = lane.r * p.dil_h;
            sdw = lane.s * p.dil_w;
            koff = ((long long)rdh * p.w + sdw) * p.c + lane.ch;
        } else {
            koff += kBK;
        }
    }
    // The table of the step being loaded, fetched into registers with its operands.
    template <bool Pro>
    __device__ __forceinline__ void stage_fetch() {
        if constexpr (Pro) {
            const int d = (int)threadIdx.x / 16;
            if (d < p.num_datasets && d < kStageDatasets) te = table_entry(p, d, tc);
            tc += kBK;
            if (tc >= p.c) tc -= fc.div(tc) * p.c;
        }
    }
    template <bool Pro>
    __device__ __forceinline__ void stage_store(BnEntry* stage) const {
        const int d = (int)threadIdx.x / 16;
        if (Pro && d < p.num_datasets && d < kStageDatasets) stage[threadIdx.x] = te;
    }
    template <bool V, bool Pro>
    __device__ __forceinline__ void finish(float (&r)[4], const BnEntry* stage) const {
        if constexpr (!Pro) {
        } else if constexpr (V) {
            CDCL_UNROLL
            for (int j = 0; j < 4; ++j)
                r[j] = live[0] && ds[0] >= 0 ? prologue_value(p, r[j], stage[ds[0] * 16 + klane + j]) : 0.0f;
        } else {
            CDCL_UNROLL
            for (int j = 0; j < 4; ++j)
                r[j] = live[j] && ds[j] >= 0 ? prologue_value(p, r[j], stage[ds[j] * 16 + klane]) : 0.0f;
        }
    }
};

// The filter gradient's B, im2col(x)[pixel, (r, s, c)]: columns are filter taps (fixed per
// thread), the reduction runs over output pixels (n, p, q).
template <typename T>
struct Im2colCols : IterBase {
    const cdcl_conv_params& p;
    long long coff[4];  // offset of (r*dil_h, s*dil_w, c) from a pixel window's origin
    int rdh[4], sdw[4];
    int col0;  // the thread's first column offset in the block's 64 (prologue table index)
    bool live[4];
    FastDiv fq, fp;
    int n, pp, q, h0, w0, d, dl;  // the lane's pixel, its window origin and dataset; dl: at load
    long long xrow;

    __device__ Im2colCols(const cdcl_conv_params& pr, long long base, long long bound, long long k0, long long kend,
                          bool v)
        : p(pr), fq(pr.q), fp(pr.p) {
        const Mapping mp = mapping<kAlongMN>(v);
        k = k0 + mp.klane;
        k_end = kend;
        vec = v;
        col0 = mp.row[0];
        const FastDiv fc(p.c), fs(p.s);
        CDCL_UNROLL
        for (int j = 0; j < 4; ++j) {
            const long long col = base + mp.row[j];
            ok[j] = col < bound;
            TapLane tap;
            tap.init(ok[j] ? (int)col : 0, fc, fs);
            rdh[j] = tap.r * p.dil_h;
            sdw[j] = tap.s * p.dil_w;
            coff[j] = ((long long)rdh[j] * p.w + sdw[j]) * p.c + tap.ch;
            live[j] = false;
        }
        const int kk = (int)k, t = fq.div(kk);
        q = kk - t * p.q;
        n = fp.div(t);
        pp = t - n * p.p;
        dl = -1;
        window<false>();
        d = p.pro_mean ? sample_dataset(p, n) : -1;
    }
    template <bool Pro>
    __device__ __forceinline__ void window() {
        h0 = pp * p.stride_h - p.pad_h;
        w0 = q * p.stride_w - p.pad_w;
        xrow = (((long long)n * p.h + h0) * p.w + w0) * p.c;
        if constexpr (Pro) d = n < p.n ? sample_dataset(p, n) : -1;
    }
    __device__ __forceinline__ bool inside(int j) const {
        const int h = h0 + rdh[j], w = w0 + sdw[j];
        return ok[j] && k < k_end && (unsigned)h < (unsigned)p.h && (unsigned)w < (unsigned)p.w;
    }
    template <bool V>
    __device__ __forceinline__ void load(float (&r)[4]) {
        const T* x = static_cast<const T*>(p.x);
        dl = d;
        if constexpr (V) {
            live[0] = inside(0);
            load4_or_zero(live[0], x, xrow + coff[0], r);
        } else {
            CDCL_UNROLL
            for (int j = 0; j < 4; ++j) {
                live[j] = inside(j);
                r[j] = load_or_zero(live[j], x, xrow + coff[j]);
            }
        }
    }
    template <bool Pro>
    __device__ __forceinline__ void next() {
        k += kBK;
        q += kBK;
        if (q >= p.q) {
            const int carry = fq.div(q);
            q -= carry * p.q;
            pp += carry;
            if (pp >= p.p) {
                const int c2 = fp.div(pp);
                pp -= c2 * p.p;
                n += c2;
            }
        }
        window<Pro>();
    }
    // The block's 64 columns are fixed: their table entries for every dataset, staged once.
    __device__ void stage_block(BnEntry* stage) const {
        if (!p.pro_mean) return;
        const int cols = p.r * p.s * p.c, n0 = (int)blockIdx.y * kBN;
        const int datasets = p.num_datasets < kStageDatasets ? p.num_datasets : kStageDatasets;
        for (int i = (int)threadIdx.x; i < datasets * kBN; i += kThreads) {
            const int col = n0 + i % kBN;
            if (col < cols) stage[i] = table_entry(p, i / kBN, col % p.c);
        }
    }
    template <bool V, bool Pro>
    __device__ __forceinline__ void finish(float (&r)[4], const BnEntry* stage) const {
        if constexpr (Pro) {
            CDCL_UNROLL
            for (int j = 0; j < 4; ++j) {
                const bool in = V ? live[0] : live[j];
                const int col = V ? col0 + j : col0 + 16 * j;
                r[j] = in && dl >= 0 ? prologue_value(p, r[j], stage[dl * kBN + col]) : 0.0f;
            }
        }
    }
};

// A matrix whose rows are `stride` apart and whose reduction index is contiguous (the forward's
// weights, [k][r*s*c]) or the other way round (dy^T for the filter gradient, [pixel][k]):
// element (row, kk) at row * row_step + kk * k_step, one of the steps 1.
template <typename T, int kMode>
struct Strided : IterBase {
    const T* base_ptr;
    long long roff[4];
    long long koff, kstep;
    __device__ Strided(const T* ptr, long long row_step, long long k_step, long long base, long long bound, long long k0,
                       long long kend, bool v)
        : base_ptr(ptr) {
        const Mapping mp = mapping<kMode>(v);
        k = k0 + mp.klane;
        k_end = kend;
        vec = v;
        CDCL_UNROLL
        for (int j = 0; j < 4; ++j) {
            const long long row = base + mp.row[j];
            ok[j] = row < bound;
            roff[j] = row * row_step;
        }
        koff = k * k_step;
        kstep = kBK * k_step;
    }
    template <bool V>
    __device__ __forceinline__ void load(float (&r)[4]) {
        const bool kin = k < k_end;
        if constexpr (V) {
            load4_or_zero(ok[0] && kin, base_ptr, roff[0] + koff, r);
        } else {
            CDCL_UNROLL
            for (int j = 0; j < 4; ++j) r[j] = load_or_zero(ok[j] && kin, base_ptr, roff[j] + koff);
        }
    }
    template <bool Pro>
    __device__ __forceinline__ void next() {
        k += kBK;
        koff += kstep;
    }
};

// The data gradient's A[m, kk], m = (n, h, w) and kk = (r, s, k): dx[n,h,w,c] sums
// dy[n, p, q, k] * w[k, r, s, c] over the taps with h = p*stride - pad + r*dil, so only offsets
// that land on the stride grid contribute (checked with fast divisors by the strides).
template <typename T>
struct DgradRows : IterBase {
    const cdcl_conv_params& p;
    long long dyn[4];  // offset of sample n in dy
    int hp0[4], wp0[4];  // h + pad_h, w + pad_w
    FastDiv fk, fs, fsh, fsw;
    TapLane lane;
    int rdh, sdw;
    __device__ DgradRows(const cdcl_conv_params& pr, long long base, long long bound, long long k0, long long kend,
                         bool v)
        : p(pr), fk(pr.k), fs(pr.s), fsh(pr.stride_h), fsw(pr.stride_w) {
        const Mapping mp = mapping<kAlongK>(v);
        k = k0 + mp.klane;
        k_end = kend;
        vec = v;
        const FastDiv fw(p.w), fh(p.h);
        CDCL_UNROLL
        for (int j = 0; j < 4; ++j) {
            const long long m = base + mp.row[j];
            ok[j] = m < bound;
            const int mi = ok[j] ? (int)m : 0;
            const int t = fw.div(mi), w = mi - t * p.w;
            const int n = fh.div(t), h = t - n * p.h;
            hp0[j] = h + p.pad_h;
            wp0[j] = w + p.pad_w;
            dyn[j] = (long long)n * p.p * p.q * p.k;
        }
        lane.init((int)k, fk, fs);
        rdh = lane.r * p.dil_h;
        sdw = lane.s * p.dil_w;
    }
    // The offset in dy of row j's element, or -1 where no output position reads it.
    __device__ __forceinline__ long long at(int j) const {
        const int hp = hp0[j] - rdh, wp = wp0[j] - sdw;
        if (!ok[j] || k >= k_end || hp < 0 || wp < 0) return -1;
        const int ph = fsh.div(hp), pw = fsw.div(wp);
        if (ph * p.stride_h != hp || pw * p.stride_w != wp || ph >= p.p || pw >= p.q) return -1;
        return dyn[j] + ((long long)ph * p.q + pw) * p.k + lane.ch;
    }
    template <bool V>
    __device__ __forceinline__ void load(float (&r)[4]) {
        const T* dy = static_cast<const T*>(p.dy);
        if constexpr (V) {
            const long long o = at(0);
            load4_or_zero(o >= 0, dy, o, r);
        } else {
            CDCL_UNROLL
            for (int j = 0; j < 4; ++j) {
                const long long o = at(j);
                r[j] = load_or_zero(o >= 0, dy, o);
            }
        }
    }
    template <bool Pro>
    __device__ __forceinline__ void next() {
        k += kBK;
        if (lane.next(fk, fs)) {
            rdh = lane.r * p.dil_h;
            sdw = lane.s * p.dil_w;
        }
    }
};

// The data gradient's B[kk, col] = w[k, r, s, col], kk = (r, s, k) flattened as (r*S + s)*K + k.
template <typename T>
struct DgradWeights : IterBase {
    const cdcl_conv_params& p;
    long long woff;  // offset of w[k, r, s, 0]
    int col[4];
    FastDiv fk;
    int kout, rs;
    __device__ DgradWeights(const cdcl_conv_params& pr, long long base, long long bound, long long k0, long long kend,
                            bool v)
        : p(pr), fk(pr.k) {
        const Mapping mp = mapping<kAlongMN>(v);
        k = k0 + mp.klane;
        k_end = kend;
        vec = v;
        CDCL_UNROLL
        for (int j = 0; j < 4; ++j) {
            col[j] = (int)base + mp.row[j];
            ok[j] = col[j] < bound;
        }
        rs = fk.div((int)k);
        kout = (int)k - rs * p.k;
        woff = ((long long)kout * p.r * p.s + rs) * p.c;
    }
    template <bool V>
    __device__ __forceinline__ void load(float (&r)[4]) {
        const T* w = static_cast<const T*>(p.weight);
        const bool kin = k < k_end;
        if constexpr (V) {
            load4_or_zero(ok[0] && kin, w, woff + col[0], r);
        } else {
            CDCL_UNROLL
            for (int j = 0; j < 4; ++j) r[j] = load_or_zero(ok[j] && kin, w, woff + col[j]);
        }
    }
    template <bool Pro>
    __device__ __forceinline__ void next() {
        k += kBK;
        kout += kBK;
        if (kout >= p.k) {
            const int carry = fk.div(kout);
            kout -= carry * p.k;
            rs += carry;
        }
        woff = ((long long)kout * p.r * p.s + rs) * p.c;
    }
};
