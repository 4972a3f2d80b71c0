// The emulator's memory-access checks, behind two compiler instrumentations of the kernel
// sources whose runtimes we provide here instead of linking the sanitizers' own:
//
// - -fsanitize=thread makes every load and store of kernel code call __tsan_readN(addr) /
//   __tsan_writeN(addr) first. Those hooks run the race detector and the preemptive schedule.
// - -fsanitize=alignment checks every typed access against its type's alignment and calls
//   __ubsan_handle_type_mismatch_v1 on a misaligned one: a fault, as on the GPU.
//
// Race detector. A race is two accesses to the same address by different threads of one block
// in the same barrier interval (between two __syncthreads), at least one of them a plain
// (non-atomic) write; lanes of one warp are also ordered by a __syncwarp (or a wmma operation)
// of the whole warp between the two accesses. This is the rule of compute-sanitizer's racecheck,
// applied here to shared memory and to global memory alike. Shadow memory records, for every
// 2-byte granule, the last writer and the readers since (atomics count as readers: they never
// race with each other, only with plain writes) with the interval they belong to; intervals are
// numbered so that nothing needs clearing between barriers or blocks. Shared memory has a shadow
// cell per granule; global memory a direct-mapped table keyed by address, where a collision
// forgets the older address (a race may then go unseen; a false report is impossible). To keep
// the cost small, a global read only enters the table once some thread of the block wrote the
// same granule in the interval (a bitmap says so): write-write and read-after-write races on
// global memory are found, a read followed by another thread's write only when the granule was
// written before the read. The detector runs on a sample of each launch's blocks (emu.h,
// kRaceSampledBlocks; CDCL_EMU_RACECHECK=all checks every block). Accesses to
// a thread's own stack and to the emulator's own per-thread state are not tracked. One-byte
// accesses are tracked at 2-byte granularity, so two threads writing the two bytes of one aligned
// 16-bit unit would be reported (no kernel of this crate has byte-sized shared arrays).
//
// Preemptive schedule. Fibers otherwise switch only at barriers and warp collectives, so a
// non-atomic read-modify-write of shared memory never loses an update; in this mode every
// shared-memory access first yields to the block's scheduler with probability 1/2 (from the
// seeded generator, so a seed still reproduces its interleaving).
#include "runtime.h"

namespace cdcl_emu {
namespace rt {

namespace {

constexpr uintptr_t kGranuleShift = 1;
constexpr size_t kSharedCells = (kArenaBytes + kSharedLimit) / 2 + 1;
constexpr size_t kGlobalCells = size_t(1) << 15;
constexpr size_t kWrittenWords = 256;  // 16384 bits
constexpr uint16_t kSeveral = 0xFFFF;  // Cell::reader: more than one thread; Cell::rwarp: more than one warp

struct Cell {
    uint32_t epoch = 0;  // the barrier interval the rest describes; any other value: empty
    uint32_t wgen = 0;   // the writer's warp sync generation at the write
    uint32_t rgen = 0;   // the newest reader generation (when all readers are in one warp)
    uint16_t writer = 0;  // linear thread index + 1 of the last plain writer; 0: none
    uint16_t reader = 0;  // linear thread index + 1 of the reader(s) at rgen; kSeveral; 0: none
    uint16_t rwarp = 0;   // the readers' warp, or kSeveral
};

struct GlobalCell {
    uintptr_t granule = 0;
    Cell cell;
};

enum Kind : int { kRead = 0, kWrite = 1, kAtomic = 2 };

const char* kind_name(int k) { return k == kWrite ? "write" : (k == kAtomic ? "atomic" : "read"); }

std::mutex g_shadow_mu;
std::vector<RaceShadow*> g_shadows;

}  // namespace

struct RaceShadow {
    std::vector<Cell> shared = std::vector<Cell>(kSharedCells);
    std::vector<GlobalCell> global = std::vector<GlobalCell>(kGlobalCells);
    // Global granules written in this interval, hashed into bits: a read of global memory that
    // no thread of the block wrote in the interval (inputs, mostly) skips the table.
    uint64_t written[kWrittenWords] = {};
    bool any_written = false;
    uint32_t epoch = 0;

    void next_interval() {
        if (any_written) {
            std::memset(written, 0, sizeof written);
            any_written = false;
        }
        if (++epoch == 0) {  // after 2^32 intervals: forget everything once
            std::fill(shared.begin(), shared.end(), Cell{});
            std::fill(global.begin(), global.end(), GlobalCell{});
            epoch = 1;
        }
    }
};

RaceShadow* race_shadow_acquire() {
    {
        std::lock_guard<std::mutex> lk(g_shadow_mu);
        if (!g_shadows.empty()) {
            RaceShadow* s = g_shadows.back();
            g_shadows.pop_back();
            return s;
        }
    }
    return new RaceShadow();
}

void race_shadow_release(RaceShadow* s) {
    std::lock_guard<std::mutex> lk(g_shadow_mu);
    g_shadows.push_back(s);
}

void race_block_start(Block& b) {
    std::fill(b.warp_gen.begin(), b.warp_gen.end(), 0u);
    b.interval_file = nullptr;
    b.interval_line = 0;
    if (b.shadow) b.shadow->next_interval();
}

void race_barrier_done(Block& b, const char* file, int line) {
    b.interval_file = file;
    b.interval_line = line;
    if (b.shadow) b.shadow->next_interval();
}

void race_warp_synced(Block& b, unsigned warp) { ++b.warp_gen[warp]; }

unsigned default_stream_flags() {
    unsigned flags = kRacecheck;
    if (const char* v = std::getenv("CDCL_EMU_RACECHECK")) {
        if (std::strcmp(v, "0") == 0) flags &= ~kRacecheck;
        if (std::strcmp(v, "all") == 0) flags |= kRacecheckAll;
    }
    if (const char* v = std::getenv("CDCL_EMU_SCHEDULE"))
        if (std::strcmp(v, "preemptive") == 0) flags |= kPreemptive;
    return flags;
}

namespace {

[[noreturn]] void access_fault(Fiber& f, const std::string& what) {
    Block& b = *f.block;
    block_fault(b, where(b, f) + ": " + what);
    f.state = FState::Exited;
    yield_to_scheduler(f, true);
    std::abort();  // an exited fiber is never resumed
}

// `other`: the other thread's linear index + 1, or kSeveral when it is one of several readers.
[[noreturn]] void report_race(Fiber& f, const void* addr, bool shared, size_t shared_offset, int kind, unsigned other,
                              int other_kind) {
    Block& b = *f.block;
    char who[96] = "another thread (one of several readers)";
    bool same_warp = false;
    if (other != kSeveral) {
        const uint3 t = b.fibers[other - 1].ctx.thread_idx;
        std::snprintf(who, sizeof who, "thread (%u,%u,%u)", t.x, t.y, t.z);
        same_warp = (other - 1) / 32 == f.linear / 32;
    }
    char buf[640];
    char off[64] = "";
    if (shared) std::snprintf(off, sizeof off, " (byte %zu of the block's shared memory)", shared_offset);
    const std::string since =
        b.interval_file ? "the __syncthreads at " + site(b.interval_file, b.interval_line) : std::string("the block's start");
    std::snprintf(buf, sizeof buf,
                  "data race on %s memory at address %p%s: this thread's %s conflicts with a %s of the same address by "
                  "%s in the same barrier interval (since %s), with no __syncthreads%s between them",
                  shared ? "shared" : "global", addr, off, kind_name(kind), kind_name(other_kind), who, since.c_str(),
                  same_warp ? " or __syncwarp" : "");
    access_fault(f, buf);
}

// Checks one granule's cell against an access and records the access. Returns the conflicting
// thread's linear index + 1 and its kind through `other_kind`, or 0.
inline unsigned check_cell(Cell& c, uint32_t epoch, const Block& b, unsigned tid, int kind, int* other_kind) {
    const unsigned warp = tid / 32;
    const uint32_t gen = b.warp_gen[warp];
    const uint16_t me = (uint16_t)(tid + 1);
    if (c.epoch != epoch) {
        c = Cell{};
        c.epoch = epoch;
    }
    // Ordered with an earlier access of thread `o` (linear) made at its warp generation `g`?
    auto ordered = [&](unsigned o, uint32_t g) { return o / 32 == warp && g != b.warp_gen[warp]; };
    if (c.writer && c.writer != me && !ordered(c.writer - 1u, c.wgen)) {
        *other_kind = kWrite;
        return c.writer;
    }
    if (kind == kWrite && c.reader) {
        // Readers in another warp are never ordered before this write within the interval;
        // readers of this warp are, by a warp sync after their read (c.rgen < gen).
        const bool conflict = c.rwarp == kSeveral || c.rwarp != warp || (c.rgen == gen && c.reader != me);
        if (conflict) {
            *other_kind = kRead;
            return c.reader == me ? kSeveral : c.reader;
        }
    }
    if (kind == kWrite) {
        c.writer = me;
        c.wgen = gen;
        c.reader = 0;
        c.rwarp = 0;
        c.rgen = 0;
        return 0;
    }
    // A read or an atomic: one more reader.
    if (!c.reader) {
        c.reader = me;
        c.rwarp = (uint16_t)warp;
        c.rgen = gen;
    } else if (c.rwarp != kSeveral) {
        if (c.rwarp != warp) {
            c.rwarp = kSeveral;
            c.reader = kSeveral;
        } else if (gen != c.rgen) {
            c.rgen = gen;
            c.reader = me;
        } else if (c.reader != me) {
            c.reader = kSeveral;
        }
    }
    return 0;
}

}  // namespace

// The access hook behind every instrumented load and store (and every atomic).
inline void on_access(const void* p, size_t n, int kind) {
    Fiber* f = tls_fiber;
    if (!f) return;  // host code of a .cu file
    Block& b = *f->block;
    if (!b.checks || n == 0) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uintptr_t arena = reinterpret_cast<uintptr_t>(b.arena), dyn = reinterpret_cast<uintptr_t>(b.dyn);
    bool shared = true;
    size_t offset = 0, base = 0;
    if (a - arena < kArenaBytes) {
        offset = a - arena;
    } else if (a - dyn < b.launch->dyn_smem) {
        offset = a - dyn;
        base = kArenaBytes;
    } else {
        shared = false;
    }
    if (shared && (b.checks & kPreemptive) && kind != kAtomic && (b.rng.next() & 1u)) {
        f->state = FState::Ready;
        yield_to_scheduler(*f, false);
    }
    if (!(b.checks & kRacecheck) || !b.shadow) return;
    RaceShadow& s = *b.shadow;
    int other_kind = kRead;
    if (shared) {
        const size_t first = (base + offset) >> kGranuleShift, last = (base + offset + n - 1) >> kGranuleShift;
        for (size_t i = first; i <= last && i < kSharedCells; ++i) {
            if (unsigned o = check_cell(s.shared[i], s.epoch, b, f->linear, kind, &other_kind))
                report_race(*f, p, true, offset, kind, o, other_kind);
        }
        return;
    }
    // Not tracked: this thread's own stack and the emulator's per-thread state (threadIdx & co.).
    if (a - reinterpret_cast<uintptr_t>(f->stack.base) < f->stack.size) return;
    if (a - reinterpret_cast<uintptr_t>(b.fibers.data()) < b.fibers.size() * sizeof(Fiber)) return;
    for (uintptr_t g = a >> kGranuleShift, e = (a + n - 1) >> kGranuleShift; g <= e; ++g) {
        const uint64_t h = g * 0x9E3779B97F4A7C15ull;
        const uint64_t bit = h >> (64 - 14);
        uint64_t& word = s.written[bit / 64];
        if (kind == kWrite) {
            word |= uint64_t(1) << (bit % 64);
            s.any_written = true;
        } else if (!(word & (uint64_t(1) << (bit % 64)))) {
            continue;  // no write to this granule yet in the interval: nothing to conflict with
        }
        GlobalCell& gc = s.global[h >> (64 - 15)];
        if (gc.granule != g) {
            gc.granule = g;
            gc.cell = Cell{};
        }
        if (unsigned o = check_cell(gc.cell, s.epoch, b, f->linear, kind, &other_kind))
            report_race(*f, p, false, 0, kind, o, other_kind);
    }
}

}  // namespace rt

void race_atomic(const void* p, size_t bytes) { rt::on_access(p, bytes, rt::kAtomic); }
void race_access(const void* p, size_t bytes, bool write) { rt::on_access(p, bytes, write ? rt::kWrite : rt::kRead); }

}  // namespace cdcl_emu

// ---- the instrumentation's entry points -------------------------------------------------------

using cdcl_emu::rt::on_access;

#define CDCL_TSAN_RW(n)                                                                             \
    extern "C" void __tsan_read##n(void* p) { on_access(p, n, 0); }                                 \
    extern "C" void __tsan_write##n(void* p) { on_access(p, n, 1); }                                \
    extern "C" void __tsan_unaligned_read##n(void* p) { on_access(p, n, 0); }                       \
    extern "C" void __tsan_unaligned_write##n(void* p) { on_access(p, n, 1); }                      \
    extern "C" void __tsan_volatile_read##n(void* p) { on_access(p, n, 0); }                        \
    extern "C" void __tsan_volatile_write##n(void* p) { on_access(p, n, 1); }                       \
    extern "C" void __tsan_unaligned_volatile_read##n(void* p) { on_access(p, n, 0); }              \
    extern "C" void __tsan_unaligned_volatile_write##n(void* p) { on_access(p, n, 1); }
CDCL_TSAN_RW(1)
CDCL_TSAN_RW(2)
CDCL_TSAN_RW(4)
CDCL_TSAN_RW(8)
CDCL_TSAN_RW(16)
#undef CDCL_TSAN_RW

extern "C" void __tsan_read_range(void* p, size_t n) { on_access(p, n, 0); }
extern "C" void __tsan_write_range(void* p, size_t n) { on_access(p, n, 1); }
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}
// clang routes memcpy/memset/memmove of instrumented code here.
extern "C" void* __tsan_memcpy(void* d, const void* s, size_t n) {
    on_access(s, n, 0);
    on_access(d, n, 1);
    return std::memcpy(d, s, n);
}
extern "C" void* __tsan_memmove(void* d, const void* s, size_t n) {
    on_access(s, n, 0);
    on_access(d, n, 1);
    return std::memmove(d, s, n);
}
extern "C" void* __tsan_memset(void* d, int c, size_t n) {
    on_access(d, n, 1);
    return std::memset(d, c, n);
}

// -fsanitize=alignment: the data the compiler passes (the layout of the UBSan runtime's
// TypeMismatchDataV1, shared by gcc and clang).
namespace {
struct UbsanLocation {
    const char* file;
    uint32_t line;
    uint32_t column;
};
struct UbsanType {
    uint16_t kind;
    uint16_t info;
    char name[1];
};
struct UbsanTypeMismatch {
    UbsanLocation loc;
    const UbsanType* type;
    unsigned char log_alignment;
    unsigned char check_kind;
};
const char* check_kind_name(unsigned k) {
    static const char* names[] = {"load",         "store",         "reference binding", "member access",
                                  "member call",  "constructor call", "downcast",      "downcast",
                                  "upcast",       "virtual-base cast", "nonnull binding", "dynamic operation"};
    return k < sizeof names / sizeof names[0] ? names[k] : "access";
}
}  // namespace

extern "C" void __ubsan_handle_type_mismatch_v1(UbsanTypeMismatch* d, uintptr_t ptr) {
    const size_t align = size_t(1) << d->log_alignment;
    char msg[320];
    std::snprintf(msg, sizeof msg,
                  "misaligned %s of %s at address %p: the type needs %zu-byte alignment (a GPU faults with "
                  "'misaligned address')",
                  check_kind_name(d->check_kind), d->type ? d->type->name : "?", reinterpret_cast<void*>(ptr), align);
    if (!cdcl_emu::rt::tls_fiber) {
        // Host code of a .cu file (a launcher): not a kernel fault, but never silent.
        std::fprintf(stderr, "cdcl emulator: %s (%s:%u)\n", msg, d->loc.file, d->loc.line);
        return;
    }
    cdcl_emu::fault(d->loc.file, (int)d->loc.line, msg);
}

extern "C" void __ubsan_handle_type_mismatch_v1_abort(UbsanTypeMismatch* d, uintptr_t ptr) {
    __ubsan_handle_type_mismatch_v1(d, ptr);
    std::abort();
}
