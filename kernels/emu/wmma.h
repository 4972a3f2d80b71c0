// `nvcuda::wmma` for the emulator: the m16n16k16 warp matrix operations with __half or
// __nv_bfloat16 inputs and the m16n16k8 ones with precision::tf32 inputs (matrix_a / matrix_b,
// row_major or col_major), float accumulators, with CUDA's signatures (<mma.h>) and strict
// semantics.
//
// Fragments. As on the GPU, every lane of the warp holds `num_elements` elements of the 16x16
// matrix in a public array `x[]`: 8 for bf16 matrix_a/matrix_b and for float accumulators, 16
// for __half matrix_a/matrix_b (mma.h declares those with 16 elements: every matrix position is
// held twice over the warp), 4 floats for tf32 matrix_a (16x8) / matrix_b (8x16). Which lane and element hold which matrix position is opaque on the
// GPU and differs between architectures. The emulator therefore uses a deliberately scrambled,
// fixed permutation of the matrix positions over (lane, element), a different one for every
// fragment type (use, element type, layout): a kernel that assumes a layout (reads x[i] as "row
// lane/4", pairs the elements of an accumulator with those of a matrix_a fragment, ...) gets
// wrong results here as it would on some GPU, instead of passing by luck. Only element-wise
// operations applied alike to every x[i] are layout-independent. The two copies of a position
// of a __half fragment must agree when mma_sync reads them; an element-wise update that treats
// elements differently by index is reported.
//
// Collectives. Every wmma call is a warp collective (the `_sync`): all 32 lanes of the warp
// must call it, with the same arguments (pointer, ldm, layout, fill value, fragment type).
// Each call meets the other lanes in `cdcl_emu::warp_collective` with the full mask, exchanging
// a hash of its arguments; the runtime faults (naming kernel, block, thread, source line) when
// a lane is missing (partial warp, divergence, exit) or when the lanes' hashes differ. Like
// CUDA, load/store wait for all lanes *before* touching memory and do not synchronise after:
// reading what other lanes stored needs __syncwarp / __syncthreads, and the shuffled fiber
// order exposes a missing one. mma_sync meets twice: after the first rendezvous each lane reads
// the other lanes' A and B fragments through exchanged pointers and computes its own elements
// of D (D_ij needs C_ij only, which sits in the same lane and element as D_ij), and the second
// rendezvous keeps every lane from changing its fragments while others still read them.
//
// Arithmetic. D = A·B + C in f32: the products of two 16-bit values are exact in f32 (at most
// 11 + 11 significand bits); each D_ij starts from C_ij and adds the 16 products in k order with
// f32 rounding. The GPU's tensor cores add in another order and rounding (products exact,
// sums truncated to f32 or wider): tests must allow a few f32 ulps of the sum of |products|.
// TF32 (m16n16k8): the operands are floats that must already be TF32 values (low 13 mantissa
// bits zero), rounded by the kernel with wmma::__float_to_tf32 as CUDA's documentation asks;
// mma_sync faults on any other finite value instead of guessing what the tensor cores do with
// the low bits. Products of two TF32 values (11 significant bits each) are exact in f32, and
// D_ij adds its 8 products in k order with f32 rounding, as above.
//
// CUDA's rules checked here: the pointer is 256-bit (32-byte) aligned, ldm is a multiple of 16
// bytes and at least 16. The GPU build includes the real <mma.h> instead of this header.
#pragma once

// Included at the end of emu.h (it uses cdcl_emu::fault, lane_id and warp_collective).
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "half.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// f32 -> TF32 as `cvt.rna.tf32.f32` (PTX ISA, "Data Movement and Conversion Instructions: cvt":
// the .rna rounding modifier, valid only for the conversion to .tf32, rounds to nearest with
// ties away from zero; the .tf32 result keeps f32's sign and 8-bit exponent and the 10 leading
// mantissa bits, the 13 low bits zero). On the magnitude bits, adding half of the kept ulp
// (bit 12) and clearing the low 13 bits is exactly that rounding: a remainder of 0x1000 or more
// (a tie included) carries into the kept bits, a carry out of the mantissa steps the exponent,
// and the largest finite values round to infinity. Infinities stay; a NaN stays a NaN.
inline float __float_to_tf32(float in) {
    uint32_t b;
    std::memcpy(&b, &in, sizeof b);
    if ((b & 0x7F800000u) == 0x7F800000u)
        b = (b & 0x007FFFFFu) ? 0x7FFFFFFFu : b;
    else
        b = (b + 0x1000u) & 0xFFFFE000u;
    float out;
    std::memcpy(&out, &b, sizeof out);
    return out;
}

}  // namespace wmma
}  // namespace nvcuda

namespace cdcl_emu {
namespace wmma_detail {

using namespace ::nvcuda::wmma;

// Per fragment type: valid (a shape and type CUDA provides), elements per lane, the salt of its
// placement, the columns of the matrix it describes (positions are row * cols + column).
template <typename Use, int K, typename T, typename Layout>
struct traits {
    static constexpr bool valid = false;
};
template <typename Layout>
struct is_layout {
    static constexpr bool value = std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value;
};
template <typename Layout>
struct traits<matrix_a, 16, __half, Layout> {
    static constexpr bool valid = is_layout<Layout>::value;
    static constexpr int num_elements = 16;
    static constexpr uint32_t salt = std::is_same<Layout, row_major>::value ? 1 : 2;
    static constexpr unsigned cols = 16;
};
template <typename Layout>
struct traits<matrix_b, 16, __half, Layout> {
    static constexpr bool valid = is_layout<Layout>::value;
    static constexpr int num_elements = 16;
    static constexpr uint32_t salt = std::is_same<Layout, row_major>::value ? 3 : 4;
    static constexpr unsigned cols = 16;
};
template <typename Layout>
struct traits<matrix_a, 16, __nv_bfloat16, Layout> {
    static constexpr bool valid = is_layout<Layout>::value;
    static constexpr int num_elements = 8;
    static constexpr uint32_t salt = std::is_same<Layout, row_major>::value ? 5 : 6;
    static constexpr unsigned cols = 16;
};
template <typename Layout>
struct traits<matrix_b, 16, __nv_bfloat16, Layout> {
    static constexpr bool valid = is_layout<Layout>::value;
    static constexpr int num_elements = 8;
    static constexpr uint32_t salt = std::is_same<Layout, row_major>::value ? 7 : 8;
    static constexpr unsigned cols = 16;
};
template <>
struct traits<accumulator, 16, float, void> {
    static constexpr bool valid = true;
    static constexpr int num_elements = 8;
    static constexpr uint32_t salt = 9;
    static constexpr unsigned cols = 16;
};
template <typename Layout>
struct traits<matrix_a, 8, precision::tf32, Layout> {  // 16 x 8
    static constexpr bool valid = is_layout<Layout>::value;
    static constexpr int num_elements = 4;
    static constexpr uint32_t salt = std::is_same<Layout, row_major>::value ? 10 : 11;
    static constexpr unsigned cols = 8;
};
template <typename Layout>
struct traits<matrix_b, 8, precision::tf32, Layout> {  // 8 x 16
    static constexpr bool valid = is_layout<Layout>::value;
    static constexpr int num_elements = 4;
    static constexpr uint32_t salt = std::is_same<Layout, row_major>::value ? 12 : 13;
    static constexpr unsigned cols = 16;
};
template <>
struct traits<accumulator, 8, float, void> {  // a placement of its own: the GPU's may differ
    static constexpr bool valid = true;
    static constexpr int num_elements = 8;
    static constexpr uint32_t salt = 14;
    static constexpr unsigned cols = 16;
};

// What x[] holds: T, or float for precision::tf32 (as mma.h's storage_element_type).
template <typename T>
struct storage {
    using type = T;
};
template <>
struct storage<precision::tf32> {
    using type = float;
};

// The scrambled placement of one fragment type: slot s = lane * num_elements + element holds
// matrix position pos[s] (row * cols + column of the matrix the fragment describes: A is M x K,
// B is K x N, the accumulator M x N). slot_of[copy][pos] is the inverse.
struct Placement {
    uint8_t pos[512];
    uint16_t slot_of[2][256];
};
const Placement& placement(uint32_t salt, int num_elements);

// What a lane contributes to a load/store/fill rendezvous: all lanes must agree on it.
inline uint64_t args_hash(uint32_t op, uint32_t salt, const void* ptr, unsigned ldm, int layout, uint64_t fill) {
    uint64_t h = 0x9E3779B97F4A7C15ull * (op + 1);
    for (uint64_t v : {(uint64_t)salt, (uint64_t)(uintptr_t)ptr, (uint64_t)ldm, (uint64_t)(int64_t)layout, fill}) {
        h ^= v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
        h = (h ^ (h >> 31)) * 0xBF58476D1CE4E5B9ull;
    }
    return h;
}

// The rendezvous of a load/store/fill (hash compared by the runtime) and of mma_sync.
void uniform_rendezvous(int op, uint64_t hash, const char* file, int line);
void mma_rendezvous(const void* mine, const void* gathered[32], const char* file, int line);

template <typename T>
struct identity {
    using type = T;
};

inline float elem_f32(float v) { return v; }
inline float elem_f32(__half v) { return __half2float(v); }
inline float elem_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
inline uint16_t elem_bits(__half v) { return v.bits; }
inline uint16_t elem_bits(__nv_bfloat16 v) { return v.bits; }
inline uint32_t elem_bits(float v) {
    uint32_t b;
    std::memcpy(&b, &v, sizeof b);
    return b;
}
template <typename T>
inline uint64_t fill_bits(const T& v) {
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}

void check_matrix_args(const char* what, const void* ptr, unsigned ldm, size_t elem_bytes, const char* file, int line);

enum Op : int { OpFill = 0, OpLoad = 1, OpStore = 2 };

}  // namespace wmma_detail
}  // namespace cdcl_emu

namespace nvcuda {
namespace wmma {

template <typename Use, int m, int n, int k, typename T, typename Layout = void>
class fragment {
    using traits = ::cdcl_emu::wmma_detail::traits<Use, k, T, Layout>;
    static_assert(m == 16 && n == 16 && (k == 16 || k == 8), "the emulator provides the m16n16k16 and m16n16k8 shapes only");
    static_assert(traits::valid,
                  "the emulator provides m16n16k16 matrix_a/matrix_b of __half or __nv_bfloat16, m16n16k8 ones of "
                  "precision::tf32 (row_major or col_major), and float accumulators (no layout) only");

   public:
    using element_type = T;
    using storage_element_type = typename ::cdcl_emu::wmma_detail::storage<T>::type;
    enum { num_elements = traits::num_elements };
    // Poisoned like fresh shared memory (all-ones bytes: NaN in every float format), so that an
    // accumulator used before fill_fragment / load_matrix_sync shows up in the results.
    storage_element_type x[num_elements];
    fragment() { std::memset(static_cast<void*>(x), 0xFF, sizeof x); }
};

template <typename Use, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, 16, 16, K, T, Layout>& f,
                          const typename ::cdcl_emu::wmma_detail::storage<T>::type& v,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    namespace d = ::cdcl_emu::wmma_detail;
    using tr = d::traits<Use, K, T, Layout>;
    d::uniform_rendezvous(d::OpFill, d::args_hash(d::OpFill, tr::salt, nullptr, 0, 0, d::fill_bits(v)), file, line);
    for (int i = 0; i < tr::num_elements; ++i) f.x[i] = v;
}

namespace detail_ {
template <typename Frag, typename T>
CDCL_EMU_UNCHECKED inline void load_elems(Frag& f, const T* p, unsigned ldm, bool row_major_mem, uint32_t salt,
                                          unsigned cols) {
    namespace d = ::cdcl_emu::wmma_detail;
    constexpr int ne = Frag::num_elements;
    const d::Placement& pl = d::placement(salt, ne);
    const unsigned lane = ::cdcl_emu::lane_id();
    for (int e = 0; e < ne; ++e) {
        const unsigned pos = pl.pos[lane * ne + e], r = pos / cols, c = pos % cols;
        const T* src = &p[row_major_mem ? r * ldm + c : c * ldm + r];
        ::cdcl_emu::race_access(src, sizeof(T), false);
        f.x[e] = *src;
    }
}
}  // namespace detail_

template <typename Use, int K, typename T, typename Layout,
          typename = typename std::enable_if<!std::is_same<Use, accumulator>::value>::type>
inline void load_matrix_sync(fragment<Use, 16, 16, K, T, Layout>& f,
                             const typename ::cdcl_emu::wmma_detail::storage<T>::type* p, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    namespace d = ::cdcl_emu::wmma_detail;
    using tr = d::traits<Use, K, T, Layout>;
    using S = typename d::storage<T>::type;
    d::check_matrix_args("wmma::load_matrix_sync", p, ldm, sizeof(S), file, line);
    d::uniform_rendezvous(d::OpLoad, d::args_hash(d::OpLoad, tr::salt, p, ldm, 0, 0), file, line);
    detail_::load_elems(f, p, ldm, std::is_same<Layout, row_major>::value, tr::salt, tr::cols);
}

template <int K>
inline void load_matrix_sync(fragment<accumulator, 16, 16, K, float>& f, const float* p, unsigned ldm, layout_t layout,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    namespace d = ::cdcl_emu::wmma_detail;
    using tr = d::traits<accumulator, K, float, void>;
    d::check_matrix_args("wmma::load_matrix_sync", p, ldm, sizeof(float), file, line);
    d::uniform_rendezvous(d::OpLoad, d::args_hash(d::OpLoad, tr::salt, p, ldm, (int)layout, 0), file, line);
    detail_::load_elems(f, p, ldm, layout == mem_row_major, tr::salt, tr::cols);
}

template <int K>
CDCL_EMU_UNCHECKED inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, K, float>& f, unsigned ldm,
                                                 layout_t layout, const char* file = __builtin_FILE(),
                                                 int line = __builtin_LINE()) {
    namespace d = ::cdcl_emu::wmma_detail;
    using tr = d::traits<accumulator, K, float, void>;
    d::check_matrix_args("wmma::store_matrix_sync", p, ldm, sizeof(float), file, line);
    d::uniform_rendezvous(d::OpStore, d::args_hash(d::OpStore, tr::salt, p, ldm, (int)layout, 0), file, line);
    const d::Placement& pl = d::placement(tr::salt, tr::num_elements);
    const unsigned lane = ::cdcl_emu::lane_id();
    for (int e = 0; e < tr::num_elements; ++e) {
        const unsigned pos = pl.pos[lane * tr::num_elements + e], r = pos / 16, c = pos % 16;
        float* dst = &p[layout == mem_row_major ? r * ldm + c : c * ldm + r];
        ::cdcl_emu::race_access(dst, sizeof(float), true);
        *dst = f.x[e];
    }
}

template <int K, typename T, typename LA, typename LB>
CDCL_EMU_UNCHECKED inline void mma_sync(fragment<accumulator, 16, 16, K, float>& dfrag,
                                        const fragment<matrix_a, 16, 16, K, T, LA>& a,
                                        const fragment<matrix_b, 16, 16, K, T, LB>& b,
                                        const fragment<accumulator, 16, 16, K, float>& c,
                                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    namespace d = ::cdcl_emu::wmma_detail;
    using FA = fragment<matrix_a, 16, 16, K, T, LA>;
    using FB = fragment<matrix_b, 16, 16, K, T, LB>;
    using ta = d::traits<matrix_a, K, T, LA>;
    using tb = d::traits<matrix_b, K, T, LB>;
    using tc = d::traits<accumulator, K, float, void>;
    constexpr bool tf32 = std::is_same<T, precision::tf32>::value;
    constexpr int na = ta::num_elements, nb = tb::num_elements, nc = tc::num_elements;
    const d::Placement& pa = d::placement(ta::salt, na);
    const d::Placement& pb = d::placement(tb::salt, nb);
    const d::Placement& pc = d::placement(tc::salt, nc);
    struct Mine {
        const FA* a;
        const FB* b;
    } mine{&a, &b};
    const void* lanes[32];
    d::mma_rendezvous(&mine, lanes, file, line);
    // Element (r, c) of A or B: the value of its first copy; a second copy (__half) must agree;
    // a TF32 operand must be a TF32 value.
    auto elem = [&](const auto& pl, int ne, auto getter, unsigned pos) CDCL_EMU_UNCHECKED -> float {
        const unsigned s0 = pl.slot_of[0][pos];
        const auto v0 = getter(static_cast<const Mine*>(lanes[s0 / ne]), s0 % ne);
        if (ne == 16) {
            const unsigned s1 = pl.slot_of[1][pos];
            const auto v1 = getter(static_cast<const Mine*>(lanes[s1 / ne]), s1 % ne);
            if (d::elem_bits(v0) != d::elem_bits(v1))
                ::cdcl_emu::fault(file, line,
                                  "wmma::mma_sync: the two copies of a __half matrix element disagree (an element-wise "
                                  "update of x[] that depends on the element index relies on the opaque layout)");
        }
        if (tf32) {
            const uint32_t bits = d::elem_bits(v0);
            const bool nan = (bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0;
            if (!nan && (bits & 0x1FFFu) != 0)
                ::cdcl_emu::fault(file, line,
                                  "wmma::mma_sync: a precision::tf32 operand is not a TF32 value (round it with "
                                  "wmma::__float_to_tf32 first)");
        }
        return d::elem_f32(v0);
    };
    auto get_a = [](const Mine* m, unsigned e) CDCL_EMU_UNCHECKED { return m->a->x[e]; };
    auto get_b = [](const Mine* m, unsigned e) CDCL_EMU_UNCHECKED { return m->b->x[e]; };
    const unsigned lane = ::cdcl_emu::lane_id();
    float out[nc];
    for (int e = 0; e < nc; ++e) {
        const unsigned pos = pc.pos[lane * nc + e], i = pos / 16, j = pos % 16;
        float acc = c.x[e];
        for (unsigned k = 0; k < (unsigned)K; ++k) {
            const float av = elem(pa, na, get_a, i * ta::cols + k);
            const float bv = elem(pb, nb, get_b, k * tb::cols + j);
            acc += av * bv;  // the product is exact in f32; the sum rounds
        }
        out[e] = acc;
    }
    for (int e = 0; e < nc; ++e) dfrag.x[e] = out[e];
    d::mma_rendezvous(nullptr, lanes, file, line);
}

}  // namespace wmma
}  // namespace nvcuda
