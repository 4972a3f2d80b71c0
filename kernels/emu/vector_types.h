// CUDA's built-in vector types (vector_types.h) for the emulator, with the GPU's alignments: a
// vector is one memory instruction on the GPU, which faults ("misaligned address") unless the
// address is a multiple of the vector's size. The kernel sources are compiled with
// -fsanitize=alignment, so every access through one of these types checks that alignment here
// too and a misaligned one fails the launch (emu.cpp reports it with kernel, block, thread,
// address and source line).
#pragma once

#define CDCL_EMU_VEC2(T, name, align) \
    struct alignas(align) name {      \
        T x, y;                       \
    };
#define CDCL_EMU_VEC3(T, name) \
    struct name {              \
        T x, y, z;             \
    };
#define CDCL_EMU_VEC4(T, name, align) \
    struct alignas(align) name {      \
        T x, y, z, w;                 \
    };

CDCL_EMU_VEC2(signed char, char2, 2)
CDCL_EMU_VEC2(unsigned char, uchar2, 2)
CDCL_EMU_VEC4(signed char, char4, 4)
CDCL_EMU_VEC4(unsigned char, uchar4, 4)
CDCL_EMU_VEC2(short, short2, 4)
CDCL_EMU_VEC2(unsigned short, ushort2, 4)
CDCL_EMU_VEC4(short, short4, 8)
CDCL_EMU_VEC4(unsigned short, ushort4, 8)
CDCL_EMU_VEC2(int, int2, 8)
CDCL_EMU_VEC2(unsigned int, uint2, 8)
CDCL_EMU_VEC2(float, float2, 8)
CDCL_EMU_VEC3(int, int3)
CDCL_EMU_VEC3(float, float3)
CDCL_EMU_VEC4(int, int4, 16)
CDCL_EMU_VEC4(unsigned int, uint4, 16)
CDCL_EMU_VEC4(float, float4, 16)
CDCL_EMU_VEC2(long long, longlong2, 16)
CDCL_EMU_VEC2(unsigned long long, ulonglong2, 16)
CDCL_EMU_VEC2(double, double2, 16)

#undef CDCL_EMU_VEC2
#undef CDCL_EMU_VEC3
#undef CDCL_EMU_VEC4

inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline double2 make_double2(double x, double y) { return double2{x, y}; }
