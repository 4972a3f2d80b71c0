// The device-side face of the CPU emulator: what a .cu file sees when it is compiled by the
// host C++ compiler with CDCL_EMULATE. It provides the CUDA built-ins the kernels use, with
// strict semantics; the runtime behind it is emu.cpp.
//
// Model: the blocks of a grid are spread over worker OS threads; the threads of one block are
// fibers (stackful coroutines) on one OS thread, so a block's shared memory is one arena and a
// fiber only yields at a barrier, a warp collective or its exit (or, in the preemptive schedule,
// before any shared-memory access). Every rule break (divergent barrier, partial-mask or
// mismatched collective, exit while others wait, too much shared memory, a misaligned access, a
// data race) becomes a fault that names kernel, block, thread and source line or address and
// fails the launch.
//
// Memory checks. The kernel sources are compiled with two compiler instrumentations whose
// runtimes the emulator provides itself (emu.cpp; nothing of the sanitizers' own runtimes is
// linked): -fsanitize=alignment checks every typed access against its type's alignment (the
// GPU faults with "misaligned address" on any misaligned access, vectors included), and
// -fsanitize=thread turns every load and store into a call to a __tsan_readN/__tsan_writeN hook,
// which feeds the race detector and the preemptive schedule. Atomics are excluded from that
// instrumentation (no_sanitize) and report themselves to the race detector instead.
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "half.h"
#include "vector_types.h"

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace cdcl_emu {

// The identity of the running fiber. The runtime points tls_ctx at the running fiber's copy
// before every resume, so the built-in index variables below are plain loads.
struct ThreadCtx {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};
extern thread_local ThreadCtx* tls_ctx;

[[noreturn]] void fault(const char* file, int line, const char* what);
void syncthreads(const char* file, int line);

enum class Collective : int { SyncWarp = 0, Shfl = 1, Ballot = 2, WmmaFill = 3, WmmaLoad = 4, WmmaStore = 5, WmmaMma = 6 };
// Rendezvous of the lanes named in `mask` (all of them must arrive at a collective of the same
// kind and mask). Afterwards `gathered[l]` holds the value lane l contributed. For WmmaFill,
// WmmaLoad and WmmaStore the values are hashes of the call's arguments and must all be equal.
// `aux` must also agree between the lanes: the shuffle kind, width and operand size.
void warp_collective(Collective kind, unsigned mask, uint64_t value, const char* file, int line,
                     uint64_t gathered[32], uint32_t aux = 0);

// An atomic read-modify-write of `bytes` at `p`, for the race detector: atomics never race with
// each other, but an atomic and a plain write of the same address in one barrier interval do.
void race_atomic(const void* p, size_t bytes);
// A plain access made by code left out of the instrumentation (CDCL_EMU_UNCHECKED: the
// emulator's own wmma internals), reported explicitly where it touches kernel memory.
void race_access(const void* p, size_t bytes, bool write);

// Per-stream checks and schedule (cdcl_emu_stream): the race detector (on unless
// CDCL_EMU_RACECHECK=0) and the preemptive schedule (CDCL_EMU_SCHEDULE=preemptive), which may
// switch threads before any shared-memory access so that lost updates show in the results.
// The race detector checks a sample of each launch's blocks (the first kRaceSampledBlocks in the
// seeded block order, plus the first and the last block of the grid) unless kRacecheckAll is set
// (CDCL_EMU_RACECHECK=all): a race is a property of the code that every block runs, and a
// different seed samples different blocks; the last block holds the partial tiles.
enum StreamFlags : unsigned { kRacecheck = 1u, kPreemptive = 2u, kRacecheckAll = 4u };
constexpr unsigned kRaceSampledBlocks = 4;
// Sets the stream's flags and returns the previous ones (used by the self-tests).
unsigned set_stream_flags(void* stream, unsigned flags);

unsigned lane_id();
void* shared_static(const void* key, size_t bytes, size_t align, const char* file, int line);
void* shared_dynamic();

template <typename T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

enum class ShflMode { Idx, Up, Down, Xor };
template <typename T>
inline T shfl(ShflMode mode, unsigned mask, T var, int arg, int width, const char* file, int line) {
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fault(file, line, "shuffle width must be a power of two in [1, 32]");
    uint64_t gathered[32];
    // Lanes of one shuffle must agree on kind, width and operand size (__shfl_up_sync meeting
    // __shfl_down_sync, or widths 16 and 32, is undefined on the GPU).
    const uint32_t aux = (uint32_t)mode | ((uint32_t)width << 8) | ((uint32_t)sizeof(T) << 16);
    warp_collective(Collective::Shfl, mask, to_bits(var), file, line, gathered, aux);
    const int lane = (int)lane_id();
    const int seg = lane & ~(width - 1);
    int src = lane;
    switch (mode) {
        case ShflMode::Idx: src = seg + (arg & (width - 1)); break;
        case ShflMode::Up: src = ((lane - seg) >= arg) ? lane - arg : lane; break;
        case ShflMode::Down: src = ((lane - seg) + arg < width) ? lane + arg : lane; break;
        case ShflMode::Xor: {
            int s = lane ^ arg;
            src = ((s & ~(width - 1)) == seg) ? s : lane;
            break;
        }
    }
    if (src < 0 || src > 31 || !(mask & (1u << src))) fault(file, line, "shuffle reads a lane that is not in the mask (undefined in CUDA)");
    return from_bits<T>(gathered[src]);
}

inline unsigned ballot(unsigned mask, int pred, const char* file, int line) {
    uint64_t gathered[32];
    warp_collective(Collective::Ballot, mask, pred ? 1u : 0u, file, line, gathered);
    unsigned r = 0;
    for (int l = 0; l < 32; ++l)
        if ((mask & (1u << l)) && gathered[l]) r |= 1u << l;
    return r;
}

// Atomics: blocks run on several OS threads, so these are real atomic read-modify-writes. They
// are left out of the thread instrumentation (whose runtime we do not link) and tell the race
// detector about themselves.
#define CDCL_EMU_ATOMIC __attribute__((no_sanitize("thread")))
// Emulator internals whose memory traffic is bookkeeping (wmma fragment exchange, placement
// tables), not kernel memory: not instrumented, which also keeps them fast.
#define CDCL_EMU_UNCHECKED __attribute__((no_sanitize("thread")))
template <typename T>
CDCL_EMU_ATOMIC inline T atomic_add(T* p, T v) {
    race_atomic(p, sizeof(T));
    if constexpr (std::is_floating_point<T>::value) {
        static_assert(sizeof(T) == 4 || sizeof(T) == 8, "float atomics on f32/f64 only");
        using U = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;
        U* up = reinterpret_cast<U*>(p);
        U old = __atomic_load_n(up, __ATOMIC_RELAXED);
        for (;;) {
            T f;
            std::memcpy(&f, &old, sizeof(T));
            T nf = f + v;
            U nu;
            std::memcpy(&nu, &nf, sizeof(T));
            if (__atomic_compare_exchange_n(up, &old, nu, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return f;
        }
    } else {
        return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
    }
}
template <typename T, bool IsMax>
CDCL_EMU_ATOMIC inline T atomic_minmax(T* p, T v) {
    race_atomic(p, sizeof(T));
    if constexpr (std::is_floating_point<T>::value) {
        using U = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;
        U* up = reinterpret_cast<U*>(p);
        U old = __atomic_load_n(up, __ATOMIC_RELAXED);
        for (;;) {
            T f;
            std::memcpy(&f, &old, sizeof(T));
            T nf = IsMax ? (v > f ? v : f) : (v < f ? v : f);
            U nu;
            std::memcpy(&nu, &nf, sizeof(T));
            if (__atomic_compare_exchange_n(up, &old, nu, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return f;
        }
    } else {
        T old = __atomic_load_n(p, __ATOMIC_RELAXED);
        for (;;) {
            T n = IsMax ? (v > old ? v : old) : (v < old ? v : old);
            if (__atomic_compare_exchange_n(p, &old, n, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return old;
        }
    }
}

// The launch entry point used by CDCL_LAUNCH. Returns a cdcl_status.
struct KernelThunk {
    void (*call)(const void* closure);
    const void* closure;
};
int launch(const char* kernel_name, dim3 grid, dim3 block, size_t dynamic_smem, void* stream, KernelThunk thunk);

template <typename F>
inline int launch_lambda(const char* name, dim3 grid, dim3 block, size_t smem, void* stream, const F& f) {
    KernelThunk t{[](const void* c) { (*static_cast<const F*>(c))(); }, &f};
    return launch(name, grid, block, smem, stream, t);
}

}  // namespace cdcl_emu

// ---- CUDA keywords and built-ins -------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// A plain `__shared__` variable cannot be poisoned per block on the CPU; kernels declare shared
// memory with CDCL_SHARED / CDCL_DYNAMIC_SHARED instead, and this makes a stray use fail to compile.
#define __shared__ cdcl_kernels_must_declare_shared_memory_with_CDCL_SHARED

#define threadIdx (::cdcl_emu::tls_ctx->thread_idx)
#define blockIdx (::cdcl_emu::tls_ctx->block_idx)
#define blockDim (::cdcl_emu::tls_ctx->block_dim)
#define gridDim (::cdcl_emu::tls_ctx->grid_dim)
constexpr int warpSize = 32;

#define CDCL_SHARED_KEY_(line) cdcl_shared_key_##line
#define CDCL_SHARED_KEY(line) CDCL_SHARED_KEY_(line)
// One arena per block, poisoned when first handed out with the 16-bit pattern 0x7FF5 repeated:
// NaN in f16, bf16, f32 and f64 alike, and 2146795509 as an i32 / 32757 as an i16 (no index,
// count or label a kernel would produce; a read of it used as an index lands far out of bounds).
#define CDCL_SHARED(T, name, dims)                                                                 \
    static const char CDCL_SHARED_KEY(__LINE__) = 0;                                               \
    using cdcl_shared_type_##name = T dims;                                                        \
    cdcl_shared_type_##name& name = *reinterpret_cast<cdcl_shared_type_##name*>(                   \
        ::cdcl_emu::shared_static(&CDCL_SHARED_KEY(__LINE__), sizeof(cdcl_shared_type_##name), alignof(T), __FILE__, __LINE__))
#define CDCL_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::cdcl_emu::shared_dynamic())

#define __syncthreads() ::cdcl_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::cdcl_emu::syncwarp_impl(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(mask, var, lane, ...) \
    ::cdcl_emu::shfl(::cdcl_emu::ShflMode::Idx, (mask), (var), (lane), ::cdcl_emu::width_arg(__VA_ARGS__ + 0), __FILE__, __LINE__)
#define __shfl_up_sync(mask, var, delta, ...) \
    ::cdcl_emu::shfl(::cdcl_emu::ShflMode::Up, (mask), (var), (delta), ::cdcl_emu::width_arg(__VA_ARGS__ + 0), __FILE__, __LINE__)
#define __shfl_down_sync(mask, var, delta, ...) \
    ::cdcl_emu::shfl(::cdcl_emu::ShflMode::Down, (mask), (var), (delta), ::cdcl_emu::width_arg(__VA_ARGS__ + 0), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, var, lanemask, ...) \
    ::cdcl_emu::shfl(::cdcl_emu::ShflMode::Xor, (mask), (var), (lanemask), ::cdcl_emu::width_arg(__VA_ARGS__ + 0), __FILE__, __LINE__)
#define __ballot_sync(mask, pred) ::cdcl_emu::ballot((mask), (pred), __FILE__, __LINE__)
#define __any_sync(mask, pred) (::cdcl_emu::ballot((mask), (pred), __FILE__, __LINE__) != 0u)
#define __all_sync(mask, pred) (::cdcl_emu::ballot((mask), (pred), __FILE__, __LINE__) == (mask))
#define __trap() ::cdcl_emu::fault(__FILE__, __LINE__, "__trap()")

namespace cdcl_emu {
// `__shfl_sync(m, v, l)` leaves the width empty, which `__VA_ARGS__ + 0` turns into 0: the default.
constexpr int width_arg(int w) { return w == 0 ? 32 : w; }
inline void syncwarp_impl(const char* file, int line, unsigned mask = 0xffffffffu) {
    uint64_t gathered[32];
    warp_collective(Collective::SyncWarp, mask, 0, file, line, gathered);
}
}  // namespace cdcl_emu

template <typename T>
inline T __ldg(const T* p) { return *p; }

template <typename T>
inline T atomicAdd(T* p, T v) { return ::cdcl_emu::atomic_add(p, v); }
template <typename T>
inline T atomicMax(T* p, T v) { return ::cdcl_emu::atomic_minmax<T, true>(p, v); }
template <typename T>
inline T atomicMin(T* p, T v) { return ::cdcl_emu::atomic_minmax<T, false>(p, v); }
template <typename T>
CDCL_EMU_ATOMIC inline T atomicExch(T* p, T v) {
    ::cdcl_emu::race_atomic(p, sizeof(T));
    return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}
template <typename T>
CDCL_EMU_ATOMIC inline T atomicCAS(T* p, T compare, T v) {
    ::cdcl_emu::race_atomic(p, sizeof(T));
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;
}
CDCL_EMU_ATOMIC inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// Math built-ins: the host libm, correctly rounded or close to it; the tests compare against
// an f64 reference with tolerances wide enough for the GPU's ulp-level differences.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
using std::isfinite;
using std::isinf;
using std::isnan;

template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

// Launch syntax: kernel<<<grid, block, smem, stream>>>(args...) is not C++.
#define CDCL_LAUNCH(kernel, grid, block, smem, stream, ...) \
    ::cdcl_emu::launch_lambda(#kernel, (grid), (block), (smem), (stream), [&]() { kernel(__VA_ARGS__); })

// Tensor-core fragments: nvcuda::wmma.
#include "wmma.h"
