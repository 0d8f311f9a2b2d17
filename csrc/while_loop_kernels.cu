// Device side of the WHILE-loop graph: the tiny kernels that set a conditional node's handle.
// Kept free of torch headers so nvcc only sees the CUDA runtime.
#include <cuda_runtime.h>

#include "while_loop.h"

namespace fsmooth {

#if FSMOOTH_HAS_CONDITIONAL_NODES
// One thread, before the WHILE node: reset the trip counter; enter while *pred holds and the cap allows one trip.
__global__ void start_loop(cudaGraphConditionalHandle handle, const bool* pred, long long* trips,
                           const long long* max_trips) {
  *trips = 0;
  cudaGraphSetConditional(handle, (*pred && *max_trips > 0) ? 1u : 0u);
}

// One thread, at the end of each trip: count it; go on while *pred (written by the captured iteration)
// holds and fewer than *max_trips trips ran. The cap is what bounds the loop if a predicate bug never
// clears *pred: the device cannot spin forever.
__global__ void continue_loop(cudaGraphConditionalHandle handle, const bool* pred, long long* trips,
                              const long long* max_trips) {
  const long long done = *trips + 1;
  *trips = done;
  cudaGraphSetConditional(handle, (*pred && done < *max_trips) ? 1u : 0u);
}

const void* start_loop_kernel() { return reinterpret_cast<const void*>(&start_loop); }
const void* continue_loop_kernel() { return reinterpret_cast<const void*>(&continue_loop); }
#else
const void* start_loop_kernel() { return nullptr; }
const void* continue_loop_kernel() { return nullptr; }
#endif

}  // namespace fsmooth
