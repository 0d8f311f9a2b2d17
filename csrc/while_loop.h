// Shared declarations of the WHILE-loop graph builder (host: while_loop.cpp, device: while_loop_kernels.cu).
#pragma once

#include <cuda_runtime.h>

// Conditional graph nodes (and cudaGraphSetConditional) exist from CUDA 12.4 on.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12040
#define FSMOOTH_HAS_CONDITIONAL_NODES 1
#else
#define FSMOOTH_HAS_CONDITIONAL_NODES 0
#endif

namespace fsmooth {

// The __global__ set_condition_from_pred(cudaGraphConditionalHandle, const bool*) kernel, or nullptr
// when the toolkit has no conditional nodes.
const void* set_condition_kernel();

}  // namespace fsmooth
