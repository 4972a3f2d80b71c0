// __half and __nv_bfloat16 for the emulator: storage types with the conversions CUDA's
// cuda_fp16.h / cuda_bf16.h provide, rounding float -> 16 bit to nearest, ties to even, as the
// GPU does. Arithmetic happens in float, as in our kernels.
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};

namespace cdcl_emu {
inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
}  // namespace cdcl_emu

inline float __half2float(__half h) {
    const uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
    const uint32_t exp = (h.bits >> 10) & 0x1Fu;
    uint32_t man = h.bits & 0x3FFu;
    if (exp == 0x1F) return cdcl_emu::bits_f32(sign | 0x7F800000u | (man << 13));  // inf / nan
    if (exp == 0) {
        if (man == 0) return cdcl_emu::bits_f32(sign);
        // Subnormal half: value = man * 2^-24, exact in float.
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return cdcl_emu::bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

inline __half __float2half_rn(float f) {
    const uint32_t u = cdcl_emu::f32_bits(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t abs = u & 0x7FFFFFFFu;
    if (abs >= 0x7F800000u) {  // inf or nan (keep nan quiet and non-zero)
        uint16_t m = abs > 0x7F800000u ? (uint16_t)(0x200u | ((abs >> 13) & 0x3FFu)) : 0;
        return __half{(uint16_t)(sign | 0x7C00u | m)};
    }
    if (abs >= 0x477FF000u) return __half{(uint16_t)(sign | 0x7C00u)};  // rounds to >= 65520: inf
    if (abs < 0x38800000u) {
        // Result is subnormal (or zero) in half: value / 2^-24 rounded to nearest even.
        // abs < 2^-14; shift the 24-bit significand into place with RNE.
        if (abs < 0x33000000u) return __half{sign};  // < 2^-25: rounds to zero (ties to even at 2^-25)
        const uint32_t e = abs >> 23;
        const uint32_t m = (abs & 0x7FFFFFu) | 0x800000u;
        const uint32_t shift = 126u - e;  // 14..24 + ...
        const uint32_t q = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1u);
        const uint32_t half = 1u << (shift - 1u);
        uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
        return __half{(uint16_t)(sign | r)};
    }
    // Normal: rebias exponent, round the 13 dropped bits to nearest even (carry may bump exp).
    uint32_t r = abs - 0x38000000u;  // exponent rebias 127 -> 15 (112 << 23)
    const uint32_t rem = r & 0x1FFFu;
    r >>= 13;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r += 1u;
    return __half{(uint16_t)(sign | r)};
}
inline __half __float2half(float f) { return __float2half_rn(f); }

inline float __bfloat162float(__nv_bfloat16 b) { return cdcl_emu::bits_f32((uint32_t)b.bits << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const uint32_t u = cdcl_emu::f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40u)};  // quiet nan
    const uint32_t lsb = (u >> 16) & 1u;
    return __nv_bfloat16{(uint16_t)((u + 0x7FFFu + lsb) >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

// Pairs of 16-bit values (cuda_fp16.h / cuda_bf16.h): 4-byte aligned, one 32-bit access on the GPU.
struct alignas(4) __half2 {
    __half x, y;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float2half2_rn(float a) { return __half2{__float2half_rn(a), __float2half_rn(a)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
