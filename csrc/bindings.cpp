// Python module shapkern._C. Importing it runs the TORCH_LIBRARY registrations of torch.ops.shapkern.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "shapkern C++/CUDA kernels, registered as torch.ops.shapkern.*";
  m.def("cuda_compiled", [] {
#ifdef WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this build.");
}
