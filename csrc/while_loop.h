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

// The two one-thread __global__ kernels that set the WHILE node's condition, or nullptr when the
// toolkit has no conditional nodes. Both take (cudaGraphConditionalHandle handle, const bool* pred,
// long long* trips, const long long* max_trips):
//   start_loop:    *trips = 0;            condition = *pred && 0 < *max_trips
//   continue_loop: *trips += 1 (-> n);    condition = *pred && n < *max_trips
// So one launch runs the body at most *max_trips times, whatever the body writes to *pred.
const void* start_loop_kernel();
const void* continue_loop_kernel();

}  // namespace fsmooth
