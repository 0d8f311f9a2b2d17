// Device side of the WHILE-loop graph: the tiny kernel that sets a conditional node's handle.
// Kept free of torch headers so nvcc only sees the CUDA runtime.
#include <cuda_runtime.h>

#include "while_loop.h"

namespace fsmooth {

#if FSMOOTH_HAS_CONDITIONAL_NODES
// One thread: the loop continues while *pred (written by the captured iteration) is true.
__global__ void set_condition_from_pred(cudaGraphConditionalHandle handle, const bool* pred) {
  cudaGraphSetConditional(handle, *pred ? 1u : 0u);
}

const void* set_condition_kernel() { return reinterpret_cast<const void*>(&set_condition_from_pred); }
#else
const void* set_condition_kernel() { return nullptr; }
#endif

}  // namespace fsmooth
