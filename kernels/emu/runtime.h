// The emulator runtime's internal types, shared by emu.cpp (launches, the fiber scheduler and
// its rule checks, shared memory) and racecheck.cpp (the memory-access hooks: race detector,
// preemptive schedule, alignment faults). Not seen by kernels.
#pragma once

#include "emu.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../include/cdcl.h"
#include "fiber.h"

#if defined(__SANITIZE_ADDRESS__)
#define CDCL_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define CDCL_EMU_ASAN 0
#endif

struct cdcl_emu_stream {
    uint64_t seed = 0;
    uint32_t threads = 0;
    std::mutex mu;  // a stream runs one launch at a time, as a CUDA stream does
    std::string last_error;
    std::atomic<uint64_t> launches{0};  // every launch attempted, as CUDA would count it
    unsigned flags = 0;                 // cdcl_emu::StreamFlags
};

namespace cdcl_emu {
namespace rt {

// CUDA's limits for compute capability 8.x/9.x without opt-in attributes.
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kSharedLimit = 48 * 1024;
// ASan's instrumented frames are several times larger.
constexpr size_t kStackBytes = CDCL_EMU_ASAN ? 256 * 1024 : 64 * 1024;
// Shared-memory allocations are separated by poisoned red zones under ASan, so an
// out-of-bounds shared access is reported too.
constexpr size_t kRedZone = CDCL_EMU_ASAN ? 32 : 0;
constexpr size_t kArenaBytes = kSharedLimit + 64 * kRedZone + 256;

struct Rng {
    uint64_t s;
    uint64_t next() {  // splitmix64
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    uint32_t below(uint32_t n) { return (uint32_t)(next() % n); }
};

inline uint64_t hash_str(const char* s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; ++s) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

enum class FState { Ready, Barrier, Warp, Exited };

struct Block;
struct RaceShadow;

struct Fiber {
    ThreadCtx ctx{};
    Context context;
    FiberStack stack;
    Block* block = nullptr;
    FState state = FState::Ready;
    unsigned linear = 0, lane = 0, warp = 0;
    const char* file = nullptr;  // where it waits
    int line = 0;
    Collective kind = Collective::SyncWarp;
    unsigned mask = 0;
    uint64_t value = 0;
    uint32_t aux = 0;
    uint64_t* gathered = nullptr;  // the waiting lane's result buffer (on its own stack)
    void* asan_fake = nullptr;
};

struct LaunchState {
    const char* name;
    dim3 grid, block;
    size_t dyn_smem;
    KernelThunk thunk;
    uint64_t seed;
    unsigned flags;  // StreamFlags of the stream at launch
    std::vector<uint32_t> order;
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex fault_mu;
    size_t fault_pos = SIZE_MAX;
    std::string fault;
};

// One worker's block-execution state, reused for every block the worker runs in a launch.
struct Block {
    LaunchState* launch = nullptr;
    uint3 idx{};
    unsigned total = 0;
    std::vector<Fiber> fibers;
    std::vector<uint32_t> ready;
    Context sched;
    Rng rng{0};
    unsigned exited = 0;
    int first_exited = -1;
    unsigned barrier_count = 0;
    const char* barrier_file = nullptr;
    int barrier_line = 0;
    bool faulted = false;
    std::string fault;
    std::unique_ptr<char[]> arena_mem, dyn_mem;
    char* arena = nullptr;
    char* dyn = nullptr;
    size_t arena_used = 0;  // arena bytes handed out, red zones included
    size_t smem_bytes = 0;  // static shared memory as CUDA counts it
    std::vector<std::pair<const void*, void*>> shared_map;
    // Race detector and preemptive schedule (racecheck.cpp); `checks` is the launch's flags.
    unsigned checks = 0;
    RaceShadow* shadow = nullptr;
    std::vector<uint32_t> warp_gen;       // completed full-warp syncs per warp, this block
    const char* interval_file = nullptr;  // the barrier that opened this interval (null: block start)
    int interval_line = 0;
    void* sched_fake = nullptr;
    const void* sched_bottom = nullptr;
    size_t sched_size = 0;
};

extern thread_local Block* tls_block;
extern thread_local Fiber* tls_fiber;

std::string where(const Block& b, const Fiber& f);
std::string site(const char* file, int line);
void block_fault(Block& b, const std::string& msg);
// Switches from the running fiber back to its block's scheduler.
void yield_to_scheduler(Fiber& f, bool final_exit);

// racecheck.cpp: a worker's shadow memory (taken from a pool, returned after the launch), and
// the events of the block's life that the race detector follows.
RaceShadow* race_shadow_acquire();
void race_shadow_release(RaceShadow* s);
void race_block_start(Block& b);
void race_barrier_done(Block& b, const char* file, int line);
void race_warp_synced(Block& b, unsigned warp);
// The flags a new stream starts with: CDCL_EMU_RACECHECK (default 1) and CDCL_EMU_SCHEDULE
// (`preemptive`, default off).
unsigned default_stream_flags();

}  // namespace rt
}  // namespace cdcl_emu
