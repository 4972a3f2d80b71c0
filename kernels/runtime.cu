// Process-wide state of the GPU build that is not a kernel: the launch counter behind step
// accounting. The emulator keeps the same count per stream (kernels/emu/emu.cpp), so this file
// is empty in the emulated build.
#include "cdcl_device.cuh"

#ifndef CDCL_EMULATE
CDCL_API uint64_t cdcl_cuda_kernel_launch_count(void*) {
    return cdcl_cuda_launches.load(std::memory_order_relaxed);
}
#endif
