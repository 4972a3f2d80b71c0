// Fibers for the emulator: a minimal context switch, because glibc's swapcontext makes a
// sigprocmask syscall on every switch (~600 ns per round trip) and a block of 256 threads
// switches at every barrier.
//
// On x86-64 the switch saves the System V callee-saved registers (rbx, rbp, r12-r15) and the
// SSE/x87 control words on the old stack, stores the stack pointer, loads the new one and
// restores the same set: ~15 instructions, no syscall. Elsewhere it falls back to ucontext.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cdcl_emu {

struct FiberStack {
    char* base = nullptr;  // lowest usable address (a guard page sits below it)
    size_t size = 0;       // usable bytes
};

FiberStack stack_alloc(size_t usable_bytes);
void stack_free(FiberStack& s);

// An execution context: where a suspended fiber resumes.
struct Context {
    void* sp = nullptr;
#if !defined(__x86_64__)
    void* uctx = nullptr;  // ucontext_t*, fallback only
#endif
};

// Prepares `ctx` so that the first switch to it runs entry(arg) on `stack`. entry must never
// return: it switches away for the last time instead.
void context_init(Context& ctx, FiberStack& stack, void (*entry)(void*), void* arg);
// Saves the running context into `from` and resumes `to`.
void context_switch(Context& from, Context& to);

}  // namespace cdcl_emu
