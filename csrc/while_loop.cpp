// fsmooth::WhileLoopGraph: one launch runs a captured CUDA graph while a device predicate holds, at most
// a given number of times.
//
// Built for torch versions without CUDAGraph.begin_capture_to_while_node: Python captures one
// iteration with torch.cuda.CUDAGraph(keep_graph=True) and passes raw_cuda_graph() here. The parent
//
//   [start: trips = 0, cond = *pred && 0 < *max_trips]
//     -> WHILE(cond) { child graph(iteration) -> [continue: ++trips, cond = *pred && trips < *max_trips] }
//
// is instantiated once and launched on the current stream. The trip cap lives in the condition kernels,
// not in the captured body, so no input and no bug in the body's predicate can keep the device looping:
// a launch ends after *max_trips iterations (a device scalar the caller may change between launches).
// The child-graph node holds a clone of the body's nodes, but their kernels address memory of torch's
// graph pool: Python keeps the captured CUDAGraph (and so its pool) alive as long as this object.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "while_loop.h"

namespace fsmooth {
namespace {

#define FSMOOTH_CUDA_CHECK(expr)                                                              \
  do {                                                                                        \
    cudaError_t fsmooth_err_ = (expr);                                                        \
    TORCH_CHECK(fsmooth_err_ == cudaSuccess, #expr " failed: ", cudaGetErrorString(fsmooth_err_)); \
  } while (0)

// 0: supported; 1: built without conditional nodes; 2: driver too old.
int64_t while_loop_supported() {
#if FSMOOTH_HAS_CONDITIONAL_NODES
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess || driver < 12040) {
    return 2;
  }
  return 0;
#else
  return 1;
#endif
}

#if FSMOOTH_HAS_CONDITIONAL_NODES
// cudaGraphAddNode gained per-edge data in CUDA 13 (it was cudaGraphAddNode_v2 in 12.3+).
cudaError_t add_node(cudaGraphNode_t* node, cudaGraph_t graph, const cudaGraphNode_t* deps, size_t num_deps,
                     cudaGraphNodeParams* params) {
#if CUDART_VERSION >= 13000
  return cudaGraphAddNode(node, graph, deps, nullptr, num_deps, params);
#else
  return cudaGraphAddNode(node, graph, deps, num_deps, params);
#endif
}
#endif

}  // namespace

class WhileLoopGraph : public torch::CustomClassHolder {
 public:
  // pred: one-element bool CUDA tensor the body writes; max_trips: one-element int64 tensor on the same
  // device, read at every trip (at most that many iterations per launch).
  WhileLoopGraph(int64_t body_graph, at::Tensor pred, at::Tensor max_trips)
      : pred_(std::move(pred)), max_trips_(std::move(max_trips)) {
    TORCH_CHECK(body_graph != 0, "WhileLoopGraph: body_graph is a null cudaGraph_t");
    TORCH_CHECK(pred_.scalar_type() == at::kBool && pred_.numel() == 1,
                "WhileLoopGraph: pred must be a one-element bool CUDA tensor");
    TORCH_CHECK(max_trips_.scalar_type() == at::kLong && max_trips_.numel() == 1,
                "WhileLoopGraph: max_trips must be a one-element int64 CUDA tensor");
    TORCH_CHECK(pred_.is_cuda(), "WhileLoopGraph: pred must be a one-element bool CUDA tensor");
    TORCH_CHECK(max_trips_.device() == pred_.device(), "WhileLoopGraph: max_trips must be on pred's device (",
                pred_.device(), "), got ", max_trips_.device());
#if FSMOOTH_HAS_CONDITIONAL_NODES
    TORCH_CHECK(while_loop_supported() == 0, "WhileLoopGraph: the CUDA driver has no conditional graph nodes");
    device_ = pred_.device().index();
    c10::cuda::CUDAGuard guard(pred_.device());
    trips_ = at::zeros({}, max_trips_.options());
    auto body = reinterpret_cast<cudaGraph_t>(body_graph);
    try {
      FSMOOTH_CUDA_CHECK(cudaGraphCreate(&parent_, 0));
      cudaGraphConditionalHandle handle;
      // Reset to 0 at every launch; the start kernel node then sets it from *pred and the cap.
      FSMOOTH_CUDA_CHECK(cudaGraphConditionalHandleCreate(&handle, parent_, 0, cudaGraphCondAssignDefault));

      const bool* pred_ptr = pred_.data_ptr<bool>();
      long long* trips_ptr = reinterpret_cast<long long*>(trips_.data_ptr<int64_t>());
      const long long* max_ptr = reinterpret_cast<const long long*>(max_trips_.data_ptr<int64_t>());
      void* kernel_args[4] = {&handle, &pred_ptr, &trips_ptr, &max_ptr};  // copied into each node at creation
      cudaGraphNodeParams set_params = {};
      set_params.type = cudaGraphNodeTypeKernel;
      set_params.kernel.func = const_cast<void*>(start_loop_kernel());
      set_params.kernel.gridDim = dim3(1, 1, 1);
      set_params.kernel.blockDim = dim3(1, 1, 1);
      set_params.kernel.sharedMemBytes = 0;
      set_params.kernel.kernelParams = kernel_args;
      cudaGraphNode_t set_node;
      FSMOOTH_CUDA_CHECK(add_node(&set_node, parent_, nullptr, 0, &set_params));

      cudaGraphNodeParams while_params = {};
      while_params.type = cudaGraphNodeTypeConditional;
      while_params.conditional.handle = handle;
      while_params.conditional.type = cudaGraphCondTypeWhile;
      while_params.conditional.size = 1;
      cudaGraphNode_t while_node;
      FSMOOTH_CUDA_CHECK(add_node(&while_node, parent_, &set_node, 1, &while_params));
      cudaGraph_t loop_body = while_params.conditional.phGraph_out[0];

      cudaGraphNode_t iteration;
      FSMOOTH_CUDA_CHECK(cudaGraphAddChildGraphNode(&iteration, loop_body, nullptr, 0, body));
      cudaGraphNodeParams rearm_params = set_params;
      rearm_params.kernel.func = const_cast<void*>(continue_loop_kernel());
      cudaGraphNode_t rearm;
      FSMOOTH_CUDA_CHECK(add_node(&rearm, loop_body, &iteration, 1, &rearm_params));

      FSMOOTH_CUDA_CHECK(cudaGraphInstantiate(&exec_, parent_, 0));
    } catch (...) {
      release();
      throw;
    }
#else
    TORCH_CHECK(false, "WhileLoopGraph: fsmooth._C was built with CUDA < 12.4 (no conditional graph nodes)");
#endif
  }

  ~WhileLoopGraph() override { release(); }

  // One launch on the current stream runs the body until *pred is false or *max_trips trips ran.
  void launch() {
    TORCH_CHECK(exec_ != nullptr, "WhileLoopGraph: not instantiated");
    c10::cuda::CUDAGuard guard(device_);
    FSMOOTH_CUDA_CHECK(cudaGraphLaunch(exec_, at::cuda::getCurrentCUDAStream(device_).stream()));
  }

  // The device counter of iterations the last launch ran (0-dim int64; read it after the stream syncs).
  at::Tensor trips() const { return trips_; }

 private:
  void release() {
    if (exec_ != nullptr) {
      cudaGraphExecDestroy(exec_);
      exec_ = nullptr;
    }
    if (parent_ != nullptr) {
      cudaGraphDestroy(parent_);  // also destroys the cloned child graph and the conditional body
      parent_ = nullptr;
    }
  }

  at::Tensor pred_;       // the kernels read these three by address: keep them alive
  at::Tensor max_trips_;
  at::Tensor trips_;
  cudaGraph_t parent_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  c10::DeviceIndex device_ = 0;
};

}  // namespace fsmooth

TORCH_LIBRARY_FRAGMENT(fsmooth, m) {
  m.def("while_loop_supported() -> int", &fsmooth::while_loop_supported);
  m.class_<fsmooth::WhileLoopGraph>("WhileLoopGraph")
      .def(torch::init<int64_t, at::Tensor, at::Tensor>())
      .def("launch", &fsmooth::WhileLoopGraph::launch)
      .def("trips", &fsmooth::WhileLoopGraph::trips);
}
