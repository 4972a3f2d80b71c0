// The emulator runtime: launches, the per-block fiber scheduler and its rule checks, shared
// memory, and the C entry points of cdcl.h's "Emulator runtime" section.
#include "runtime.h"

#if CDCL_EMU_ASAN
// The Rust test binaries link libasan as an ordinary library, not first in the load order, and
// Rust's runtime keeps some allocations until exit: only out-of-bounds and use-after-free
// reports are wanted here.
extern "C" const char* __asan_default_options() { return "verify_asan_link_order=0:detect_leaks=0"; }
#endif

namespace cdcl_emu {

thread_local ThreadCtx* tls_ctx = nullptr;

namespace rt {

thread_local Block* tls_block = nullptr;
thread_local Fiber* tls_fiber = nullptr;

// ---- stack pool: stacks outlive the short-lived worker threads -------------------------------
std::mutex g_stack_mu;
std::vector<FiberStack> g_stacks;

FiberStack acquire_stack() {
    {
        std::lock_guard<std::mutex> lk(g_stack_mu);
        if (!g_stacks.empty()) {
            FiberStack s = g_stacks.back();
            g_stacks.pop_back();
            return s;
        }
    }
    return stack_alloc(kStackBytes);
}
void release_stack(FiberStack s) {
    std::lock_guard<std::mutex> lk(g_stack_mu);
    g_stacks.push_back(s);
}

// ---- ASan fiber annotations -------------------------------------------------------------------
inline void asan_start(void** fake, const void* bottom, size_t size) {
#if CDCL_EMU_ASAN
    __sanitizer_start_switch_fiber(fake, bottom, size);
#else
    (void)fake, (void)bottom, (void)size;
#endif
}
inline void asan_finish(void* fake, const void** bottom_old, size_t* size_old) {
#if CDCL_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, bottom_old, size_old);
#else
    (void)fake, (void)bottom_old, (void)size_old;
#endif
}

std::string where(const Block& b, const Fiber& f) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "kernel `%s`, block (%u,%u,%u), thread (%u,%u,%u)", b.launch->name, b.idx.x, b.idx.y,
                  b.idx.z, f.ctx.thread_idx.x, f.ctx.thread_idx.y, f.ctx.thread_idx.z);
    return buf;
}

std::string site(const char* file, int line) {
    const char* base = file ? std::strrchr(file, '/') : nullptr;
    return std::string(base ? base + 1 : (file ? file : "?")) + ":" + std::to_string(line);
}

const char* collective_name(Collective k) {
    switch (k) {
        case Collective::SyncWarp: return "__syncwarp";
        case Collective::Shfl: return "__shfl*_sync";
        case Collective::Ballot: return "__ballot/__any/__all_sync";
        case Collective::WmmaFill: return "wmma::fill_fragment";
        case Collective::WmmaLoad: return "wmma::load_matrix_sync";
        case Collective::WmmaStore: return "wmma::store_matrix_sync";
        case Collective::WmmaMma: return "wmma::mma_sync";
    }
    return "?";
}

// A shuffle's kind and width (Fiber::aux), for messages.
std::string shuffle_desc(uint32_t aux) {
    static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
    return std::string(names[aux & 3u]) + " (width " + std::to_string((aux >> 8) & 0xFFu) + ", " +
           std::to_string(aux >> 16) + "-byte operand)";
}

void block_fault(Block& b, const std::string& msg) {
    if (!b.faulted) {
        b.faulted = true;
        b.fault = msg;
    }
}

// Switches from the running fiber back to its block's scheduler.
void yield_to_scheduler(Fiber& f, bool final_exit) {
    Block& b = *f.block;
    asan_start(final_exit ? nullptr : &f.asan_fake, b.sched_bottom, b.sched_size);
    context_switch(f.context, b.sched);
    asan_finish(f.asan_fake, &b.sched_bottom, &b.sched_size);
}

void fiber_entry(void* arg) {
    Fiber& f = *static_cast<Fiber*>(arg);
    Block& b = *f.block;
    asan_finish(nullptr, &b.sched_bottom, &b.sched_size);
    b.launch->thunk.call(b.launch->thunk.closure);
    f.state = FState::Exited;
    yield_to_scheduler(f, true);
    std::abort();  // an exited fiber is never resumed
}

// Fresh shared memory: the 16-bit pattern 0x7FF5 repeated (see CDCL_SHARED in emu.h). The arenas
// are 128-byte aligned and allocations keep their alignment, so every element sees whole
// 16-bit units of the pattern.
void poison(void* p, size_t bytes) {
    unsigned char* c = static_cast<unsigned char*>(p);
    size_t i = 0;
    for (; i < bytes && (reinterpret_cast<uintptr_t>(c + i) & 7) != 0; ++i)
        c[i] = (reinterpret_cast<uintptr_t>(c + i) & 1) ? 0x7F : 0xF5;
    const uint64_t pattern = 0x7FF57FF57FF57FF5ull;  // little-endian bytes F5 7F ...
    for (; i + 8 <= bytes; i += 8) std::memcpy(c + i, &pattern, 8);
    for (; i < bytes; ++i) c[i] = (reinterpret_cast<uintptr_t>(c + i) & 1) ? 0x7F : 0xF5;
}

void resume(Block& b, Fiber& f) {
    tls_fiber = &f;
    tls_ctx = &f.ctx;
    asan_start(&b.sched_fake, f.stack.base, f.stack.size);
    context_switch(b.sched, f.context);
    asan_finish(b.sched_fake, nullptr, nullptr);
    tls_fiber = nullptr;
    tls_ctx = nullptr;
}

// A lane of `f`'s warp that waits in a collective whose mask names `f`, if any.
Fiber* collective_waiting_on(Block& b, const Fiber& f) {
    const unsigned base = f.warp * 32;
    for (unsigned l = 0; l < 32 && base + l < b.total; ++l) {
        Fiber& o = b.fibers[base + l];
        if (&o != &f && o.state == FState::Warp && (o.mask & (1u << f.lane))) return &o;
    }
    return nullptr;
}

void on_exit(Block& b, Fiber& f) {
    if (b.barrier_count > 0) {
        block_fault(b, where(b, f) + ": exited while " + std::to_string(b.barrier_count) +
                           " thread(s) of the block wait at __syncthreads (" + site(b.barrier_file, b.barrier_line) +
                           "): every thread of the block must reach every barrier");
        return;
    }
    if (Fiber* o = collective_waiting_on(b, f)) {
        block_fault(b, where(b, f) + ": exited while lane " + std::to_string(o->lane) + " waits in " +
                           collective_name(o->kind) + " (" + site(o->file, o->line) +
                           ") with a mask that names it (partial-mask collective)");
        return;
    }
    if (b.first_exited < 0) b.first_exited = (int)f.linear;
    ++b.exited;
}

void on_barrier(Block& b, Fiber& f) {
    if (b.exited > 0) {
        const Fiber& e = b.fibers[(size_t)b.first_exited];
        block_fault(b, where(b, f) + ": reached __syncthreads (" + site(f.file, f.line) + ") after thread (" +
                           std::to_string(e.ctx.thread_idx.x) + "," + std::to_string(e.ctx.thread_idx.y) + "," +
                           std::to_string(e.ctx.thread_idx.z) +
                           ") exited: an early return before a barrier leaves the barrier short of threads");
        return;
    }
    if (Fiber* o = collective_waiting_on(b, f)) {
        block_fault(b, where(b, f) + ": waits at __syncthreads (" + site(f.file, f.line) + ") while lane " +
                           std::to_string(o->lane) + " waits for it in " + collective_name(o->kind) + " (" +
                           site(o->file, o->line) + "): partial-mask collective");
        return;
    }
    if (b.barrier_count > 0 && (b.barrier_line != f.line || std::strcmp(b.barrier_file, f.file) != 0)) {
        block_fault(b, where(b, f) + ": waits at __syncthreads (" + site(f.file, f.line) +
                           ") while other threads wait at a different __syncthreads (" +
                           site(b.barrier_file, b.barrier_line) + "): divergent barrier");
        return;
    }
    b.barrier_file = f.file;
    b.barrier_line = f.line;
    if (++b.barrier_count == b.total) {
        race_barrier_done(b, f.file, f.line);
        for (unsigned i = 0; i < b.total; ++i) {
            b.fibers[i].state = FState::Ready;
            b.ready.push_back(i);
        }
        b.barrier_count = 0;
    }
}

void on_warp(Block& b, Fiber& f) {
    const unsigned base = f.warp * 32;
    if (!(f.mask & (1u << f.lane))) {
        block_fault(b, where(b, f) + ": calls " + std::string(collective_name(f.kind)) + " (" + site(f.file, f.line) +
                           ") with a mask that does not name its own lane " + std::to_string(f.lane));
        return;
    }
    bool complete = true;
    for (unsigned l = 0; l < 32; ++l) {
        if (!(f.mask & (1u << l))) continue;
        if (base + l >= b.total) {
            block_fault(b, where(b, f) + ": " + collective_name(f.kind) + " (" + site(f.file, f.line) +
                               ") names lane " + std::to_string(l) + ", which does not exist in a block of " +
                               std::to_string(b.total) + " threads");
            return;
        }
        Fiber& o = b.fibers[base + l];
        switch (o.state) {
            case FState::Exited:
                block_fault(b, where(b, f) + ": " + collective_name(f.kind) + " (" + site(f.file, f.line) +
                                   ") names lane " + std::to_string(l) + ", which has exited (partial-mask collective)");
                return;
            case FState::Barrier:
                block_fault(b, where(b, f) + ": " + collective_name(f.kind) + " (" + site(f.file, f.line) +
                                   ") names lane " + std::to_string(l) + ", which waits at __syncthreads (" +
                                   site(o.file, o.line) + ") (partial-mask collective)");
                return;
            case FState::Warp:
                if (o.kind == f.kind && o.mask == f.mask && o.aux != f.aux && f.kind == Collective::Shfl) {
                    block_fault(b, where(b, f) + ": " + shuffle_desc(f.aux) + " (" + site(f.file, f.line) +
                                       ") meets lane " + std::to_string(l) + " in " + shuffle_desc(o.aux) + " (" +
                                       site(o.file, o.line) +
                                       "): the lanes of one shuffle must use the same kind, width and operand "
                                       "size (mismatched shuffle)");
                    return;
                }
                if (o.kind != f.kind || o.mask != f.mask) {
                    block_fault(b, where(b, f) + ": " + collective_name(f.kind) + " (" + site(f.file, f.line) +
                                       ") meets lane " + std::to_string(l) + " in " + collective_name(o.kind) + " (" +
                                       site(o.file, o.line) + ") with another kind or mask");
                    return;
                }
                break;
            case FState::Ready: complete = false; break;
        }
    }
    if (!complete) return;
    uint64_t values[32] = {0};
    for (unsigned l = 0; l < 32; ++l)
        if (f.mask & (1u << l)) values[l] = b.fibers[base + l].value;
    if (f.kind == Collective::WmmaFill || f.kind == Collective::WmmaLoad || f.kind == Collective::WmmaStore) {
        // The warp's lanes run one matrix operation together: they must describe the same one.
        const unsigned first = (unsigned)__builtin_ctz(f.mask);
        for (unsigned l = first + 1; l < 32; ++l) {
            if ((f.mask & (1u << l)) && values[l] != values[first]) {
                const Fiber& o = b.fibers[base + l];
                block_fault(b, where(b, o) + ": " + collective_name(f.kind) + " (" + site(o.file, o.line) +
                                   "): lanes " + std::to_string(first) + " and " + std::to_string(l) +
                                   " pass different arguments (pointer, ldm, layout, fill value or fragment type); "
                                   "every lane of the warp must pass the same");
                return;
            }
        }
    }
    // __syncwarp and the wmma operations order the memory accesses of the lanes they name; the
    // race detector only follows a sync of the whole warp (every existing lane).
    if (f.kind == Collective::SyncWarp || f.kind == Collective::WmmaFill || f.kind == Collective::WmmaLoad ||
        f.kind == Collective::WmmaStore || f.kind == Collective::WmmaMma) {
        const unsigned n = std::min(32u, b.total - base);
        const unsigned all = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
        if ((f.mask & all) == all) race_warp_synced(b, f.warp);
    }
    for (unsigned l = 0; l < 32; ++l) {
        if (!(f.mask & (1u << l))) continue;
        Fiber& o = b.fibers[base + l];
        std::memcpy(o.gathered, values, sizeof values);
        o.state = FState::Ready;
        b.ready.push_back(base + l);
    }
}

void diagnose_deadlock(Block& b) {
    for (Fiber& f : b.fibers) {
        if (f.state == FState::Warp || f.state == FState::Barrier) {
            block_fault(b, where(b, f) + ": deadlock: waits at " +
                               (f.state == FState::Barrier ? std::string("__syncthreads") : collective_name(f.kind)) +
                               " (" + site(f.file, f.line) + ") and no thread of the block can run");
            return;
        }
    }
    block_fault(b, "kernel `" + std::string(b.launch->name) + "`: scheduler found no runnable thread");
}

void run_block(Block& b, uint32_t linear_block, size_t pos) {
    LaunchState& L = *b.launch;
    const bool sampled = (L.flags & kRacecheckAll) || pos < kRaceSampledBlocks || linear_block == 0 ||
                         linear_block + 1 == L.order.size();
    b.checks = sampled ? L.flags : (L.flags & ~kRacecheck);
    const dim3 g = L.grid, bd = L.block;
    b.idx = uint3{linear_block % g.x, (linear_block / g.x) % g.y, linear_block / (g.x * g.y)};
    b.rng = Rng{L.seed ^ (0xD1B54A32D192ED03ull * (linear_block + 1))};
    b.exited = 0;
    b.first_exited = -1;
    b.barrier_count = 0;
    b.barrier_file = nullptr;
    b.faulted = false;
    b.fault.clear();
    b.arena_used = 0;
    b.smem_bytes = 0;
    b.shared_map.clear();
    poison(b.dyn, L.dyn_smem);
#if CDCL_EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(b.arena, kArenaBytes);
    ASAN_POISON_MEMORY_REGION(b.arena, kArenaBytes);
    ASAN_UNPOISON_MEMORY_REGION(b.dyn, L.dyn_smem);
#endif
    b.ready.clear();
    for (unsigned i = 0; i < b.total; ++i) {
        Fiber& f = b.fibers[i];
        f.block = &b;
        f.linear = i;
        f.lane = i % 32;
        f.warp = i / 32;
        f.state = FState::Ready;
        f.ctx.thread_idx = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
        f.ctx.block_idx = b.idx;
        f.ctx.block_dim = bd;
        f.ctx.grid_dim = g;
        f.asan_fake = nullptr;
#if CDCL_EMU_ASAN
        // A stack reused after an aborted block may still carry the old frames' red zones.
        ASAN_UNPOISON_MEMORY_REGION(f.stack.base, f.stack.size);
#endif
        context_init(f.context, f.stack, &fiber_entry, &f);
        b.ready.push_back(i);
    }
    race_block_start(b);
    tls_block = &b;
    while (!b.faulted) {
        if (b.ready.empty()) {
            if (b.exited != b.total) diagnose_deadlock(b);
            break;
        }
        const uint32_t k = b.rng.below((uint32_t)b.ready.size());
        const uint32_t i = b.ready[k];
        b.ready[k] = b.ready.back();
        b.ready.pop_back();
        Fiber& f = b.fibers[i];
        resume(b, f);
        if (b.faulted) break;
        switch (f.state) {
            case FState::Exited: on_exit(b, f); break;
            case FState::Barrier: on_barrier(b, f); break;
            case FState::Warp: on_warp(b, f); break;
            case FState::Ready: b.ready.push_back(i); break;
        }
    }
    tls_block = nullptr;
}

void worker(LaunchState& L) {
    Block b;
    b.launch = &L;
    b.total = L.block.x * L.block.y * L.block.z;
    b.warp_gen.assign((b.total + 31) / 32, 0);
    if (L.flags & kRacecheck) b.shadow = race_shadow_acquire();
    b.fibers.resize(b.total);
    for (Fiber& f : b.fibers) f.stack = acquire_stack();
    bool stacks_ok = std::all_of(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.stack.base != nullptr; });
    b.arena_mem.reset(new char[kArenaBytes + 128]);
    b.arena = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(b.arena_mem.get()) + 127) & ~uintptr_t(127));
    b.dyn_mem.reset(new char[L.dyn_smem + 128]);
    b.dyn = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(b.dyn_mem.get()) + 127) & ~uintptr_t(127));
    if (!stacks_ok) {
        std::lock_guard<std::mutex> lk(L.fault_mu);
        L.fault = std::string("kernel `") + L.name + "`: could not map fiber stacks";
        L.fault_pos = 0;
        L.failed = true;
    }
    while (stacks_ok && !L.failed.load()) {
        const size_t pos = L.next.fetch_add(1);
        if (pos >= L.order.size()) break;
        run_block(b, L.order[pos], pos);
        if (b.faulted) {
            std::lock_guard<std::mutex> lk(L.fault_mu);
            if (pos < L.fault_pos) {
                L.fault_pos = pos;
                L.fault = b.fault;
            }
            L.failed = true;
        }
    }
#if CDCL_EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(b.arena, kArenaBytes);
#endif
    for (Fiber& f : b.fibers)
        if (f.stack.base) release_stack(f.stack);
    if (b.shadow) race_shadow_release(b.shadow);
}

struct LaunchBound {
    const char* kernel;
    unsigned max_threads;
};
extern const LaunchBound kLaunchBounds[];  // generated by build.rs (emu_launch_bounds.cpp)

// The `__launch_bounds__` of the kernel CDCL_LAUNCH names as `name` (its text: possibly in
// parentheses, with template arguments), or 0 when it declares none.
unsigned launch_bound(const char* name) {
    while (*name == '(' || *name == ' ') ++name;
    size_t len = std::strcspn(name, "<( )");
    const char* base = name;
    for (const char* p = name; p < name + len; ++p)
        if (p[0] == ':' && p[1] == ':') base = p + 2;
    len -= (size_t)(base - name);
    for (const LaunchBound* b = kLaunchBounds; b->kernel; ++b)
        if (std::strlen(b->kernel) == len && std::strncmp(b->kernel, base, len) == 0) return b->max_threads;
    return 0;
}

std::string config_error(const char* name, dim3 grid, dim3 block, size_t smem) {
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    char buf[320];
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0 ||
        threads > kMaxThreadsPerBlock || block.x > 1024 || block.y > 1024 || block.z > 64 || grid.y > 65535 ||
        grid.z > 65535 || grid.x > 2147483647u) {
        std::snprintf(buf, sizeof buf,
                      "kernel `%s`: invalid configuration argument (grid (%u,%u,%u), block (%u,%u,%u): blocks hold "
                      "1..1024 threads, no dimension may be zero)",
                      name, grid.x, grid.y, grid.z, block.x, block.y, block.z);
        return buf;
    }
    if (const unsigned bound = launch_bound(name); bound != 0 && threads > bound) {
        std::snprintf(buf, sizeof buf,
                      "kernel `%s`: launch of %llu threads per block (block (%u,%u,%u)) exceeds the kernel's "
                      "__launch_bounds__(%u) (the GPU refuses it: too many resources requested for launch)",
                      name, threads, block.x, block.y, block.z, bound);
        return buf;
    }
    if (smem > kSharedLimit) {
        std::snprintf(buf, sizeof buf, "kernel `%s`: %zu bytes of dynamic shared memory exceed the %zu-byte limit", name,
                      smem, kSharedLimit);
        return buf;
    }
    return std::string();
}

}  // namespace rt

using namespace rt;

unsigned set_stream_flags(void* stream, unsigned flags) {
    cdcl_emu_stream* s = static_cast<cdcl_emu_stream*>(stream);
    if (!s) return 0;
    std::lock_guard<std::mutex> lk(s->mu);
    const unsigned old = s->flags;
    s->flags = flags;
    return old;
}

[[noreturn]] void fault(const char* file, int line, const char* what) {
    Fiber* f = tls_fiber;
    if (!f) {
        std::fprintf(stderr, "cdcl emulator: %s (%s) outside a kernel\n", what, site(file, line).c_str());
        std::abort();
    }
    Block& b = *f->block;
    block_fault(b, where(b, *f) + ": " + what + " (" + site(file, line) + ")");
    f->state = FState::Exited;
    yield_to_scheduler(*f, true);
    std::abort();
}

void syncthreads(const char* file, int line) {
    Fiber& f = *tls_fiber;
    f.state = FState::Barrier;
    f.file = file;
    f.line = line;
    yield_to_scheduler(f, false);
}

void warp_collective(Collective kind, unsigned mask, uint64_t value, const char* file, int line, uint64_t gathered[32],
                     uint32_t aux) {
    Fiber& f = *tls_fiber;
    f.state = FState::Warp;
    f.aux = aux;
    f.kind = kind;
    f.mask = mask;
    f.value = value;
    f.file = file;
    f.line = line;
    f.gathered = gathered;
    yield_to_scheduler(f, false);
}

unsigned lane_id() { return tls_fiber->lane; }

namespace wmma_detail {

const Placement& placement(uint32_t salt, int num_elements) {
    // One fixed, scrambled placement per fragment type (salt 1..14), built once from a seeded
    // shuffle: slot order shuffled, then the first `positions` slots take positions 0.. (copy 0)
    // and, for 16-element __half fragments (512 slots, 256 positions), the next 256 take them
    // again (copy 1). TF32 matrix_a / matrix_b (salts 10..13) have 128 slots and positions.
    struct Table {
        Placement p[15];
        Table() {
            for (uint32_t s = 1; s < 15; ++s) {
                const unsigned slots = (s <= 4) ? 512 : (s >= 10 && s <= 13) ? 128 : 256;
                const unsigned positions = slots < 256 ? slots : 256;
                uint16_t order[512];
                for (unsigned i = 0; i < slots; ++i) order[i] = (uint16_t)i;
                Rng rng{0xC0FFEE00ull + 0x1000193ull * s};
                for (unsigned i = slots; i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);
                Placement& pl = p[s];
                std::memset(&pl, 0, sizeof pl);
                for (unsigned t = 0; t < slots; ++t) {
                    pl.pos[order[t]] = (uint8_t)(t % positions);
                    pl.slot_of[t / positions][t % positions] = order[t];
                }
            }
        }
    };
    static const Table table;
    const int expect = (salt <= 4) ? 16 : (salt >= 10 && salt <= 13) ? 4 : 8;
    if (salt < 1 || salt > 14 || num_elements != expect) std::abort();
    return table.p[salt];
}

void check_matrix_args(const char* what, const void* ptr, unsigned ldm, size_t elem_bytes, const char* file, int line) {
    char msg[200];
    if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) {
        std::snprintf(msg, sizeof msg, "%s: pointer %p is not 256-bit (32-byte) aligned", what, ptr);
        fault(file, line, msg);
    }
    if (ldm < 16 || (ldm * elem_bytes) % 16 != 0) {
        std::snprintf(msg, sizeof msg, "%s: ldm %u must be at least 16 and a multiple of 16 bytes (%zu elements)",
                      what, ldm, 16 / elem_bytes);
        fault(file, line, msg);
    }
}

void uniform_rendezvous(int op, uint64_t hash, const char* file, int line) {
    uint64_t gathered[32];
    const Collective kind =
        op == OpFill ? Collective::WmmaFill : (op == OpLoad ? Collective::WmmaLoad : Collective::WmmaStore);
    warp_collective(kind, 0xffffffffu, hash, file, line, gathered);
}

void mma_rendezvous(const void* mine, const void* lanes[32], const char* file, int line) {
    uint64_t gathered[32];
    warp_collective(Collective::WmmaMma, 0xffffffffu, (uint64_t)reinterpret_cast<uintptr_t>(mine), file, line, gathered);
    for (unsigned l = 0; l < 32; ++l) lanes[l] = reinterpret_cast<const void*>((uintptr_t)gathered[l]);
}

}  // namespace wmma_detail

void* shared_static(const void* key, size_t bytes, size_t align, const char* file, int line) {
    Block& b = *tls_block;
    for (auto& e : b.shared_map)
        if (e.first == key) return e.second;
    const size_t cuda_bytes = (b.smem_bytes + align - 1) / align * align + bytes;
    const size_t off = (b.arena_used + kRedZone + align - 1) / align * align;
    if (cuda_bytes + b.launch->dyn_smem > kSharedLimit || off + bytes > kArenaBytes) {
        char msg[200];
        std::snprintf(msg, sizeof msg,
                      "too much shared memory: %zu bytes static (with this declaration's %zu) + %zu dynamic exceed the "
                      "%zu-byte limit",
                      cuda_bytes, bytes, b.launch->dyn_smem, kSharedLimit);
        fault(file, line, msg);
    }
    b.smem_bytes = cuda_bytes;
    void* p = b.arena + off;
#if CDCL_EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(p, bytes);
#endif
    poison(p, bytes);
    b.arena_used = off + bytes;
    b.shared_map.emplace_back(key, p);
    return p;
}

void* shared_dynamic() { return tls_block->dyn; }

int launch(const char* kernel_name, dim3 grid, dim3 block, size_t dynamic_smem, void* stream, KernelThunk thunk) {
    cdcl_emu_stream* s = static_cast<cdcl_emu_stream*>(stream);
    if (!s) return CDCL_ERR_INVALID_PARAMS;
    std::lock_guard<std::mutex> lk(s->mu);
    s->launches.fetch_add(1, std::memory_order_relaxed);
    s->last_error.clear();
    std::string err = config_error(kernel_name, grid, block, dynamic_smem);
    if (!err.empty()) {
        s->last_error = err;
        return CDCL_ERR_LAUNCH;
    }
    LaunchState L;
    L.name = kernel_name;
    L.grid = grid;
    L.block = block;
    L.dyn_smem = dynamic_smem;
    L.thunk = thunk;
    L.seed = s->seed ^ hash_str(kernel_name);
    L.flags = s->flags;
    const size_t nblocks = (size_t)grid.x * grid.y * grid.z;
    L.order.resize(nblocks);
    for (size_t i = 0; i < nblocks; ++i) L.order[i] = (uint32_t)i;
    Rng rng{L.seed};
    for (size_t i = nblocks; i > 1; --i) std::swap(L.order[i - 1], L.order[rng.next() % i]);

    size_t workers = s->threads ? s->threads : std::max(1u, std::thread::hardware_concurrency());
    workers = std::min(workers, nblocks);
    std::vector<std::thread> pool;
    for (size_t i = 1; i < workers; ++i) pool.emplace_back([&L] { worker(L); });
    worker(L);
    for (auto& t : pool) t.join();
    if (L.failed) {
        s->last_error = L.fault;
        return CDCL_ERR_LAUNCH;
    }
    return CDCL_OK;
}

}  // namespace cdcl_emu

// ---- C entry points -------------------------------------------------------------------------

extern "C" cdcl_emu_stream* cdcl_emu_stream_create(uint64_t seed, uint32_t threads) {
    cdcl_emu_stream* s = new (std::nothrow) cdcl_emu_stream();
    if (s) {
        s->seed = seed;
        s->threads = threads;
        s->flags = cdcl_emu::rt::default_stream_flags();
    }
    return s;
}

extern "C" void cdcl_emu_stream_destroy(cdcl_emu_stream* s) { delete s; }

extern "C" size_t cdcl_emu_stream_last_error(const cdcl_emu_stream* s, char* buf, size_t len) {
    if (!s) return 0;
    const std::string& e = s->last_error;
    if (buf && len) {
        size_t n = std::min(len - 1, e.size());
        std::memcpy(buf, e.data(), n);
        buf[n] = 0;
    }
    return e.size();
}

extern "C" uint64_t cdcl_emu_kernel_launch_count(void* stream) {
    const cdcl_emu_stream* s = static_cast<const cdcl_emu_stream*>(stream);
    return s ? s->launches.load(std::memory_order_relaxed) : 0;
}

extern "C" void* cdcl_emu_malloc(size_t bytes) {
    void* p = nullptr;
    // Exactly `bytes` (not rounded up), so AddressSanitizer sees the true end of the buffer.
    if (posix_memalign(&p, 256, bytes ? bytes : 1) != 0) return nullptr;
    return p;
}

extern "C" void cdcl_emu_free(void* p) { std::free(p); }

namespace {
struct PingPong {
    cdcl_emu::Context main, fiber;
    uint64_t iters;
};
void ping_pong_entry(void* arg) {
    PingPong& pp = *static_cast<PingPong*>(arg);
    for (;;) cdcl_emu::context_switch(pp.fiber, pp.main);
}
}  // namespace

extern "C" double cdcl_emu_fiber_switch_ns(uint64_t iters) {
    PingPong pp;
    pp.iters = iters;
    cdcl_emu::FiberStack st = cdcl_emu::stack_alloc(64 * 1024);
    if (!st.base || iters == 0) return -1.0;
    cdcl_emu::context_init(pp.fiber, st, &ping_pong_entry, &pp);
    const auto t0 = std::chrono::steady_clock::now();
    for (uint64_t i = 0; i < iters; ++i) cdcl_emu::context_switch(pp.main, pp.fiber);
    const auto t1 = std::chrono::steady_clock::now();
    cdcl_emu::stack_free(st);
    return std::chrono::duration<double, std::nano>(t1 - t0).count() / (2.0 * (double)iters);
}
