// Process-wide state of the GPU build that is not a kernel (the launch counter behind step
// accounting; the emulator keeps the same count per stream in kernels/emu/emu.cpp), the names of
// CUDA errors, and the one kernel of a training step's error records: any error recorded by the
// step's ops (or an overflow flag) becomes the flag that the SGD kernel's skip_if reads.
#include "cdcl_device.cuh"

namespace CDCL_NAMESPACE {

// One thread: a step holds a few hundred records at most, and this runs once per step.
__global__ void __launch_bounds__(1) step_flag_kernel(const cdcl_step_flag_params p) {
    bool any = p.in_flag != nullptr && *p.in_flag != 0.0f;
    for (int i = 0; i < p.num_records && !any; ++i)
        for (int s = 0; s < CDCL_ERRSLOT_COUNT; ++s)
            if (p.records[i].first[s] != CDCL_NO_ERROR) any = true;
    *p.out_flag = any ? 1.0f : 0.0f;
}

}  // namespace CDCL_NAMESPACE

using namespace CDCL_NAMESPACE;

CDCL_API int32_t CDCL_PREFIX(step_flag)(const cdcl_step_flag_params* p, void* stream) {
    if (!p || !p->out_flag || p->num_records < 0 || (p->num_records > 0 && !p->records)) return CDCL_ERR_INVALID_PARAMS;
    return CDCL_LAUNCH(step_flag_kernel, dim3(1), dim3(1), 0, stream, *p);
}

#ifndef CDCL_EMULATE
CDCL_API uint64_t cdcl_cuda_kernel_launch_count(void*) {
    return cdcl_cuda_launches.load(std::memory_order_relaxed);
}

CDCL_API int32_t cdcl_cuda_last_launch_error(void*) { return cdcl_cuda_last_error; }

CDCL_API const char* cdcl_cuda_error_name(int32_t code) { return cudaGetErrorName((cudaError_t)code); }

CDCL_API const char* cdcl_cuda_error_string(int32_t code) { return cudaGetErrorString((cudaError_t)code); }
#else
// The emulator reports its faults by message (cdcl_emu_stream_last_error), not by code.
CDCL_API int32_t cdcl_emu_last_launch_error(void*) { return 0; }

CDCL_API const char* cdcl_emu_error_name(int32_t) { return "cdclEmulatorFault"; }

CDCL_API const char* cdcl_emu_error_string(int32_t) { return "see the emulator's message"; }
#endif
