// The building blocks of PSPNet's pyramid pooling module over NHWC activations:
//  - adaptive average pooling with PyTorch's bins (start = floor(i*In/Out), end = ceil((i+1)*In/Out));
//  - bilinear resize with PyTorch's source indices, align_corners true and false.
// Both forwards can write into a channel slice of a larger output (the pyramid branches are
// concatenated without copies) and both backwards read dy from such a slice.
//
// Backwards are gathers: one thread per input element sums the contributions of the output
// elements that read it, in a fixed order. No atomics, so results are bitwise reproducible.
// ppm_pool_backward gives the whole pyramid's input gradient (the identity slice plus every
// level's pooling backward) in one such pass.
// The design and the cost model are in docs/kernels.md.
#include "cdcl_device.cuh"
#include "resize.cuh"

namespace CDCL_NAMESPACE {

// Pooling forward: a block is 32 channels x up to 8 rows for one output pixel; consecutive
// threads read consecutive channels of one input pixel (coalesced in NHWC) and the rows split
// the bin's pixels, so even the 1x1 branch of a pyramid (one bin = the whole image) keeps a
// block of 256 threads busy per 32 channels.
constexpr int kChanPerBlock = 32;
constexpr int kMaxRows = 8;
constexpr int kElemThreads = 256;
constexpr unsigned kMaxElemBlocks = 1024;  // grid-stride beyond: ~262k threads fill an H100
constexpr unsigned kMaxTileBlocks = 65535; // grid-stride beyond

// ---- adaptive average pooling ------------------------------------------------------------------

// PyTorch's bin i of Out over an axis of In: [floor(i*In/Out), ceil((i+1)*In/Out)).
struct Bin {
    int start, end;
};
// I is the type of the products i*In: unsigned long long always works; unsigned (half the
// registers and far cheaper divisions on the GPU) when the launcher saw that they fit.
template <typename I = unsigned long long>
__host__ __device__ __forceinline__ Bin pool_bin(int i, int in, int out) {
    const I a = (I)i * (I)in;
    const I b = (I)(i + 1) * (I)in;
    return Bin{(int)(a / (I)out), (int)((b + (I)out - 1) / (I)out)};
}

// True when every product of the pooling index arithmetic along an axis fits in 32 bits:
// (i+1)*In + Out - 1 with i < Out (bins), and (h+1)*Out + In - 1 with h < In (backward).
__host__ inline bool fits_u32(int in, int out) {
    return (unsigned long long)in * (unsigned long long)out + (unsigned long long)in + (unsigned long long)out <
           (1ull << 32);
}

// Element index of channel c of pixel (n, h, w) in an [., hh, ww, cc] tensor.
__device__ __forceinline__ long long nhwc_index(int n, int h, int w, int c, int hh, int ww, int cc) {
    return (((long long)n * hh + h) * ww + w) * cc + c;
}

template <typename T>
__global__ void adaptive_avg_pool_fwd(const cdcl_pool_params p) {
    const T* x = static_cast<const T*>(p.x);
    T* y = static_cast<T*>(p.y);
    const int cblocks = (int)ceil_div((unsigned)p.c, kChanPerBlock);
    const long long tiles = (long long)p.n * p.out_h * p.out_w * cblocks;
    const int rows = (int)blockDim.y;
    const int tx = (int)threadIdx.x, ty = (int)threadIdx.y;
    CDCL_SHARED(float, s_part, [kMaxRows][kChanPerBlock]);
    // Every thread of the block runs the same iterations (the tile depends on blockIdx only),
    // so the barriers below are reached by all of them.
    for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int cb = (int)(tile % cblocks);
        long long pix = tile / cblocks;
        const int ow = (int)(pix % p.out_w);
        pix /= p.out_w;
        const int oh = (int)(pix % p.out_h);
        const int n = (int)(pix / p.out_h);
        const int c = cb * kChanPerBlock + tx;
        const Bin bh = pool_bin(oh, p.in_h, p.out_h);
        const Bin bw = pool_bin(ow, p.in_w, p.out_w);
        const int bw_len = bw.end - bw.start;
        const long long area = (long long)(bh.end - bh.start) * bw_len;

        // Row ty takes the bin's pixels ty, ty + rows, ty + 2 rows, ... in row-major order,
        // stepping (h, w) without a division per pixel.
        float acc = 0.0f;
        if (c < p.c) {
            const int dh = rows / bw_len, dw = rows % bw_len;
            int h = bh.start + ty / bw_len, w = bw.start + ty % bw_len;
            while (h < bh.end) {
                acc += to_f32(x[nhwc_index(n, h, w, c, p.in_h, p.in_w, p.c)]);
                h += dh;
                w += dw;
                if (w >= bw.end) {
                    w -= bw_len;
                    ++h;
                }
            }
        }
        s_part[ty][tx] = acc;
        __syncthreads();
        if (ty == 0 && c < p.c) {
            for (int r = 1; r < rows; ++r) acc += s_part[r][tx];
            y[nhwc_index(n, oh, ow, p.out_c_offset + c, p.out_h, p.out_w, p.out_c_total)] = from_f32<T>(acc / (float)area);
        }
        __syncthreads();  // s_part is rewritten by the next tile
    }
}

// dx[h, w] = sum over the bins (i, j) that contain (h, w) of dy[i, j] / area(i, j), bins in
// row-major order. Along one axis, the bins containing h are i in
// [floor(h*Out/In), ceil((h+1)*Out/In) - 1]; each candidate is still tested against its bin.
// dy is [., out_h, out_w, dy_c_total], read at channel dy_c_offset + c. The one definition of the
// pooling backward's sum, used by adaptive_avg_pool_bwd and ppm_pool_bwd.
template <typename T, typename I>
__device__ __forceinline__ float pool_bwd_gather(const T* dy, int n, int h, int w, int c, int in_h, int in_w, int out_h,
                                                 int out_w, int dy_c_total, int dy_c_offset) {
    const I oh = (I)out_h, ow = (I)out_w, ih = (I)in_h, iw = (I)in_w;
    const int i0 = (int)((I)h * oh / ih);
    const int i1 = min((int)(((I)(h + 1) * oh + ih - 1) / ih) - 1, out_h - 1);
    const int j0 = (int)((I)w * ow / iw);
    const int j1 = min((int)(((I)(w + 1) * ow + iw - 1) / iw) - 1, out_w - 1);
    float acc = 0.0f;
    for (int i = i0; i <= i1; ++i) {
        const Bin bh = pool_bin<I>(i, in_h, out_h);
        if (h < bh.start || h >= bh.end) continue;
        for (int j = j0; j <= j1; ++j) {
            const Bin bw = pool_bin<I>(j, in_w, out_w);
            if (w < bw.start || w >= bw.end) continue;
            // Bin lengths up to 2^24 are exact in f32: this is the rounded area, as in the forward.
            const float area = (float)(bh.end - bh.start) * (float)(bw.end - bw.start);
            acc += to_f32(dy[nhwc_index(n, i, j, dy_c_offset + c, out_h, out_w, dy_c_total)]) / area;
        }
    }
    return acc;
}

template <typename T, typename I>
__global__ void adaptive_avg_pool_bwd(const cdcl_pool_params p) {
    const T* dy = static_cast<const T*>(p.dy);
    T* dx = static_cast<T*>(p.dx);
    const long long total = (long long)p.n * p.in_h * p.in_w * p.c;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int c = (int)(e % p.c);
        long long r = e / p.c;
        const int w = (int)(r % p.in_w);
        r /= p.in_w;
        const int h = (int)(r % p.in_h);
        const int n = (int)(r / p.in_h);
        dx[e] = from_f32<T>(
            pool_bwd_gather<T, I>(dy, n, h, w, c, p.in_h, p.in_w, p.out_h, p.out_w, p.out_c_total, p.out_c_offset));
    }
}

// The PPM's input gradient: base (the identity slice) plus every level's pooling backward, in
// level order, each level summed exactly as adaptive_avg_pool_bwd sums it. The level loop is
// unrolled to the maximum so that the Params arrays are indexed by constants (a dynamic index
// into a kernel parameter array would copy it to local memory).
template <typename T, typename I>
__global__ void ppm_pool_bwd(const cdcl_ppm_backward_params p) {
    const T* base = static_cast<const T*>(p.base);
    T* dx = static_cast<T*>(p.dx);
    const long long total = (long long)p.n * p.h * p.w * p.c;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int c = (int)(e % p.c);
        long long r = e / p.c;
        const int w = (int)(r % p.w);
        r /= p.w;
        const int h = (int)(r % p.h);
        const int n = (int)(r / p.h);
        float acc = to_f32(base[nhwc_index(n, h, w, c, p.h, p.w, p.base_c_total)]);
        CDCL_UNROLL
        for (int l = 0; l < CDCL_PPM_MAX_LEVELS; ++l) {
            if (l < p.num_levels)
                acc += pool_bwd_gather<T, I>(static_cast<const T*>(p.dpooled[l]), n, h, w, c, p.h, p.w, p.out_h[l],
                                             p.out_w[l], p.c, 0);
        }
        dx[e] = from_f32<T>(acc);
    }
}

// ---- bilinear resize ---------------------------------------------------------------------------

template <typename T>
__global__ void resize_bilinear_fwd(const cdcl_pool_params p) {
    const T* x = static_cast<const T*>(p.x);
    T* y = static_cast<T*>(p.y);
    const float sh = resize_scale(p.in_h, p.out_h, p.align_corners);
    const float sw = resize_scale(p.in_w, p.out_w, p.align_corners);
    const long long total = (long long)p.n * p.out_h * p.out_w * p.c;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int c = (int)(e % p.c);
        long long r = e / p.c;
        const int ow = (int)(r % p.out_w);
        r /= p.out_w;
        const int oh = (int)(r % p.out_h);
        const int n = (int)(r / p.out_h);
        const Tap th = resize_tap(oh, p.in_h, sh, p.align_corners);
        const Tap tw = resize_tap(ow, p.in_w, sw, p.align_corners);
        const float v = bilerp(to_f32(x[nhwc_index(n, th.lo, tw.lo, c, p.in_h, p.in_w, p.c)]),
                               to_f32(x[nhwc_index(n, th.lo, tw.hi, c, p.in_h, p.in_w, p.c)]),
                               to_f32(x[nhwc_index(n, th.hi, tw.lo, c, p.in_h, p.in_w, p.c)]),
                               to_f32(x[nhwc_index(n, th.hi, tw.hi, c, p.in_h, p.in_w, p.c)]), th, tw);
        y[nhwc_index(n, oh, ow, p.out_c_offset + c, p.out_h, p.out_w, p.out_c_total)] = from_f32<T>(v);
    }
}

// dx[h, w] = sum over output rows oh touching h of wh(oh) * (sum over output columns ow touching
// w of ww(ow) * dy[oh, ow]), rows and columns in increasing order.
// One candidate output row's contribution to input column w of channel c: the gradient of the
// row's columns ow0..ow1 that read w, weighted by their horizontal taps, summed in column order
// (shared by the serial and the wide backward so both sum alike).
template <typename T>
__device__ __forceinline__ float resize_row_sum(const cdcl_pool_params& p, const T* dy, int n, int oh, int w, int c,
                                                int ow0, int ow1, float sw) {
    float row = 0.0f;
    for (int ow = ow0; ow <= ow1; ++ow) {
        const Tap tw = resize_tap(ow, p.in_w, sw, p.align_corners);
        if (tw.lo != w && tw.hi != w) continue;
        const float g = to_f32(dy[nhwc_index(n, oh, ow, p.out_c_offset + c, p.out_h, p.out_w, p.out_c_total)]);
        row = fmaf(tap_weight(tw, w), g, row);
    }
    return row;
}

template <typename T>
__global__ void resize_bilinear_bwd(const cdcl_pool_params p) {
    const T* dy = static_cast<const T*>(p.dy);
    T* dx = static_cast<T*>(p.dx);
    const float sh = resize_scale(p.in_h, p.out_h, p.align_corners);
    const float sw = resize_scale(p.in_w, p.out_w, p.align_corners);
    const long long total = (long long)p.n * p.in_h * p.in_w * p.c;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int c = (int)(e % p.c);
        long long r = e / p.c;
        const int w = (int)(r % p.in_w);
        r /= p.in_w;
        const int h = (int)(r % p.in_h);
        const int n = (int)(r / p.in_h);
        int oh0, oh1, ow0, ow1;
        resize_candidates(h, p.in_h, p.out_h, p.align_corners, oh0, oh1);
        resize_candidates(w, p.in_w, p.out_w, p.align_corners, ow0, ow1);
        float acc = 0.0f;
        for (int oh = oh0; oh <= oh1; ++oh) {
            const Tap th = resize_tap(oh, p.in_h, sh, p.align_corners);
            if (th.lo != h && th.hi != h) continue;
            acc = fmaf(tap_weight(th, h), resize_row_sum(p, dy, n, oh, w, c, ow0, ow1, sw), acc);
        }
        dx[e] = from_f32<T>(acc);
    }
}

// The same sums for few, large candidate windows (the pyramid's 1x1 and 2x2 bins upsampled to the
// feature map: every input pixel has thousands of candidates): one block per input pixel and 32
// channels; its kResizeLanes row lanes take candidate rows oh0 + lane, oh0 + lane + kResizeLanes,
// ... (each row summed over its columns as above), and the lanes' partials are added in lane
// order: a fixed order, so the bits do not depend on the schedule.
constexpr int kResizeLanes = 16;
template <typename T>
__global__ void resize_bilinear_bwd_wide(const cdcl_pool_params p) {
    const T* dy = static_cast<const T*>(p.dy);
    T* dx = static_cast<T*>(p.dx);
    const float sh = resize_scale(p.in_h, p.out_h, p.align_corners);
    const float sw = resize_scale(p.in_w, p.out_w, p.align_corners);
    const int c = (int)(blockIdx.y * 32 + threadIdx.x);
    const long long pixel = blockIdx.x;  // n * in_h * in_w + h * in_w + w: one division per block
    const int w = (int)(pixel % p.in_w);
    const int h = (int)(pixel / p.in_w % p.in_h);
    const int n = (int)(pixel / p.in_w / p.in_h);
    int oh0, oh1, ow0, ow1;
    resize_candidates(h, p.in_h, p.out_h, p.align_corners, oh0, oh1);
    resize_candidates(w, p.in_w, p.out_w, p.align_corners, ow0, ow1);
    float acc = 0.0f;
    if (c < p.c) {
        for (int oh = oh0 + (int)threadIdx.y; oh <= oh1; oh += kResizeLanes) {
            const Tap th = resize_tap(oh, p.in_h, sh, p.align_corners);
            if (th.lo != h && th.hi != h) continue;
            acc = fmaf(tap_weight(th, h), resize_row_sum(p, dy, n, oh, w, c, ow0, ow1, sw), acc);
        }
    }
    CDCL_SHARED(float, part, [kResizeLanes][32]);
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < p.c) {
        float sum = part[0][threadIdx.x];
        for (int l = 1; l < kResizeLanes; ++l) sum += part[l][threadIdx.x];
        dx[pixel * p.c + c] = from_f32<T>(sum);
    }
}

// ---- launch helpers ----------------------------------------------------------------------------

__host__ inline bool params_ok(const cdcl_pool_params* p) {
    return p && p->n > 0 && p->c > 0 && p->in_h > 0 && p->in_w > 0 && p->out_h > 0 && p->out_w > 0 &&
           p->out_c_offset >= 0 && p->out_c_total > 0 && (long long)p->out_c_offset + p->c <= p->out_c_total;
}

// Source indices are f32 (as PyTorch's): exact integers, and safe int conversions of the
// candidate ranges, need every spatial size <= 2^24.
constexpr int kMaxResizeDim = 1 << 24;
__host__ inline bool resize_params_ok(const cdcl_pool_params* p) {
    return params_ok(p) && p->in_h <= kMaxResizeDim && p->in_w <= kMaxResizeDim && p->out_h <= kMaxResizeDim &&
           p->out_w <= kMaxResizeDim;
}

__host__ inline unsigned elem_blocks(long long total) {
    const long long b = (total + kElemThreads - 1) / kElemThreads;
    return (unsigned)(b < 1 ? 1 : (b > kMaxElemBlocks ? kMaxElemBlocks : b));
}

// Upper bound of a bin's length along one axis: ceil(In/Out), plus one where bins overlap.
__host__ inline long long max_bin_len(int in, int out) {
    const long long len = ((long long)in + out - 1) / out + (in % out != 0 ? 1 : 0);
    return len < in ? len : in;
}

}  // namespace CDCL_NAMESPACE

using namespace CDCL_NAMESPACE;

CDCL_API int32_t CDCL_PREFIX(adaptive_avg_pool_forward)(const cdcl_pool_params* pp, void* stream) {
    if (!params_ok(pp) || !pp->x || !pp->y) return CDCL_ERR_INVALID_PARAMS;
    const cdcl_pool_params p = *pp;
    // Rows per block: enough to split the largest bin, at most 8 (small bins leave no row idle).
    const long long area = max_bin_len(p.in_h, p.out_h) * max_bin_len(p.in_w, p.out_w);
    const unsigned rows = (unsigned)(area < kMaxRows ? area : kMaxRows);
    const long long tiles = (long long)p.n * p.out_h * p.out_w * ceil_div((unsigned)p.c, kChanPerBlock);
    const unsigned blocks = (unsigned)(tiles < kMaxTileBlocks ? tiles : kMaxTileBlocks);
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        return CDCL_LAUNCH(adaptive_avg_pool_fwd<T>, dim3(blocks), dim3(kChanPerBlock, rows), 0, stream, p);
    });
}

CDCL_API int32_t CDCL_PREFIX(adaptive_avg_pool_backward)(const cdcl_pool_params* pp, void* stream) {
    if (!params_ok(pp) || !pp->dy || !pp->dx) return CDCL_ERR_INVALID_PARAMS;
    const cdcl_pool_params p = *pp;
    const unsigned blocks = elem_blocks((long long)p.n * p.in_h * p.in_w * p.c);
    const bool narrow = fits_u32(p.in_h, p.out_h) && fits_u32(p.in_w, p.out_w);
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        if (narrow) return CDCL_LAUNCH((adaptive_avg_pool_bwd<T, unsigned>), dim3(blocks), dim3(kElemThreads), 0, stream, p);
        return CDCL_LAUNCH((adaptive_avg_pool_bwd<T, unsigned long long>), dim3(blocks), dim3(kElemThreads), 0, stream, p);
    });
}

CDCL_API int32_t CDCL_PREFIX(ppm_pool_backward)(const cdcl_ppm_backward_params* pp, void* stream) {
    if (!pp || pp->n <= 0 || pp->h <= 0 || pp->w <= 0 || pp->c <= 0 || pp->base_c_total < pp->c || pp->num_levels < 0 ||
        pp->num_levels > CDCL_PPM_MAX_LEVELS || !pp->base || !pp->dx)
        return CDCL_ERR_INVALID_PARAMS;
    const cdcl_ppm_backward_params p = *pp;
    bool narrow = true;
    for (int l = 0; l < p.num_levels; ++l) {
        if (p.out_h[l] <= 0 || p.out_w[l] <= 0 || !p.dpooled[l]) return CDCL_ERR_INVALID_PARAMS;
        narrow = narrow && fits_u32(p.h, p.out_h[l]) && fits_u32(p.w, p.out_w[l]);
    }
    const unsigned blocks = elem_blocks((long long)p.n * p.h * p.w * p.c);
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        if (narrow) return CDCL_LAUNCH((ppm_pool_bwd<T, unsigned>), dim3(blocks), dim3(kElemThreads), 0, stream, p);
        return CDCL_LAUNCH((ppm_pool_bwd<T, unsigned long long>), dim3(blocks), dim3(kElemThreads), 0, stream, p);
    });
}

CDCL_API int32_t CDCL_PREFIX(resize_bilinear_forward)(const cdcl_pool_params* pp, void* stream) {
    if (!resize_params_ok(pp) || !pp->x || !pp->y) return CDCL_ERR_INVALID_PARAMS;
    const cdcl_pool_params p = *pp;
    const unsigned blocks = elem_blocks((long long)p.n * p.out_h * p.out_w * p.c);
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        return CDCL_LAUNCH(resize_bilinear_fwd<T>, dim3(blocks), dim3(kElemThreads), 0, stream, p);
    });
}

CDCL_API int32_t CDCL_PREFIX(resize_bilinear_backward)(const cdcl_pool_params* pp, void* stream) {
    if (!resize_params_ok(pp) || !pp->dy || !pp->dx) return CDCL_ERR_INVALID_PARAMS;
    const cdcl_pool_params p = *pp;
    const unsigned blocks = elem_blocks((long long)p.n * p.in_h * p.in_w * p.c);
    // Candidate rows per input row (the upscale factor plus the window's slack): with at least
    // 2 * kResizeLanes of them, the row lanes of resize_bilinear_bwd_wide each get two or more.
    const long long cand_rows = (long long)p.out_h / p.in_h + 4;
    const long long pixels = (long long)p.n * p.in_h * p.in_w;
    const bool wide = cand_rows >= 2 * kResizeLanes && pixels <= 2147483647LL && ceil_div((unsigned)p.c, 32) <= 65535;
    return dispatch_float_dtype(p.dtype, [&](auto tag) -> int {
        using T = decltype(tag);
        if (wide)
            return CDCL_LAUNCH(resize_bilinear_bwd_wide<T>, dim3((unsigned)pixels, ceil_div((unsigned)p.c, 32)),
                               dim3(32, kResizeLanes), 0, stream, p);
        return CDCL_LAUNCH(resize_bilinear_bwd<T>, dim3(blocks), dim3(kElemThreads), 0, stream, p);
    });
}
