// The schemas of every torch.ops.shapkern.* op defined by the extension. Kernels register per device
// (reduce_cpu.cpp, reduce_cuda_host.cpp; the Triton CUDA kernel of coalition_gram from Python); fake
// kernels and autograd live in the Python module named before each group, which torch imports when it
// needs them (set_python_module applies to the defs that follow it).
#include <torch/library.h>

TORCH_LIBRARY(shapkern, m) {
  m.set_python_module("shapkern.ops.reduce");
  m.def("segment_sum(Tensor values, Tensor cu_seqlens) -> Tensor");
  m.def("segment_expand(Tensor grad, Tensor cu_seqlens, SymInt num_tokens) -> Tensor");
  m.def("coalition_reduce(Tensor masks, Tensor values, Tensor weights, int num_players) -> (Tensor, Tensor)");
  m.def("pack_masks(Tensor mask) -> Tensor");
  m.def("unpack_masks(Tensor packed, int num_players) -> Tensor");
  m.set_python_module("shapkern.ops.gram");
  m.def("coalition_gram(Tensor masks, Tensor weights, int num_players) -> Tensor");
}
