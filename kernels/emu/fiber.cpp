#include "fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cdcl_emu {

FiberStack stack_alloc(size_t usable) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    usable = (usable + page - 1) / page * page;
    // One PROT_NONE guard page below the stack: an overflow faults instead of silently
    // overwriting the neighbouring fiber's stack.
    void* m = mmap(nullptr, usable + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return FiberStack{};
    mprotect(m, page, PROT_NONE);
    return FiberStack{static_cast<char*>(m) + page, usable};
}

void stack_free(FiberStack& s) {
    if (!s.base) return;
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    munmap(s.base - page, s.size + page);
    s = FiberStack{};
}

#if defined(__x86_64__)

extern "C" void cdcl_emu_switch_ctx(void** save_sp, void* load_sp);
extern "C" void cdcl_emu_fiber_trampoline();

// cdcl_emu_switch_ctx(save_sp = rdi, load_sp = rsi). The saved frame, from the stack pointer
// upwards: [mxcsr | x87 cw] r15 r14 r13 r12 rbx rbp return-address.
// cdcl_emu_fiber_trampoline starts a fresh fiber: context_init put the entry function in rbx and
// its argument in r12; the stack pointer is 16-byte aligned here, as before a call.
asm(R"(
    .pushsection .text
    .p2align 4
    .globl cdcl_emu_switch_ctx
    .hidden cdcl_emu_switch_ctx
    .type cdcl_emu_switch_ctx,@function
cdcl_emu_switch_ctx:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cdcl_emu_switch_ctx,.-cdcl_emu_switch_ctx

    .p2align 4
    .globl cdcl_emu_fiber_trampoline
    .hidden cdcl_emu_fiber_trampoline
    .type cdcl_emu_fiber_trampoline,@function
cdcl_emu_fiber_trampoline:
    movq %r12, %rdi
    callq *%rbx
    ud2
    .size cdcl_emu_fiber_trampoline,.-cdcl_emu_fiber_trampoline
    .popsection
)");

void context_init(Context& ctx, FiberStack& stack, void (*entry)(void*), void* arg) {
    uintptr_t top = reinterpret_cast<uintptr_t>(stack.base + stack.size) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top);
    // After `ret` pops the trampoline address the stack pointer must be 16-byte aligned, so the
    // return slot sits at top - 24 (top - 8 and top - 16 are padding).
    *--sp = 0;
    *--sp = 0;
    *--sp = reinterpret_cast<uint64_t>(&cdcl_emu_fiber_trampoline);
    *--sp = 0;                                  // rbp
    *--sp = reinterpret_cast<uint64_t>(entry);  // rbx
    *--sp = reinterpret_cast<uint64_t>(arg);    // r12
    *--sp = 0;                                  // r13
    *--sp = 0;                                  // r14
    *--sp = 0;                                  // r15
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    *--sp = (uint64_t)mxcsr | ((uint64_t)fpucw << 32);
    ctx.sp = sp;
}

void context_switch(Context& from, Context& to) { cdcl_emu_switch_ctx(&from.sp, to.sp); }

#else  // portable fallback: correct but slower (a signal-mask syscall per switch)

void context_init(Context& ctx, FiberStack& stack, void (*entry)(void*), void* arg) {
    ucontext_t* uc = static_cast<ucontext_t*>(ctx.uctx);
    if (!uc) {
        uc = static_cast<ucontext_t*>(std::calloc(1, sizeof(ucontext_t)));
        ctx.uctx = uc;
    }
    getcontext(uc);
    uc->uc_stack.ss_sp = stack.base;
    uc->uc_stack.ss_size = stack.size;
    uc->uc_link = nullptr;
    // makecontext passes int arguments: split the pointer in two halves.
    uintptr_t a = reinterpret_cast<uintptr_t>(arg), e = reinterpret_cast<uintptr_t>(entry);
    makecontext(uc, reinterpret_cast<void (*)()>(+[](unsigned el, unsigned eh, unsigned al, unsigned ah) {
                    auto fn = reinterpret_cast<void (*)(void*)>((uintptr_t)el | ((uintptr_t)eh << 32));
                    fn(reinterpret_cast<void*>((uintptr_t)al | ((uintptr_t)ah << 32)));
                }),
                4, (unsigned)e, (unsigned)(e >> 32), (unsigned)a, (unsigned)(a >> 32));
}

void context_switch(Context& from, Context& to) {
    if (!from.uctx) from.uctx = std::calloc(1, sizeof(ucontext_t));
    swapcontext(static_cast<ucontext_t*>(from.uctx), static_cast<ucontext_t*>(to.uctx));
}

#endif

}  // namespace cdcl_emu
