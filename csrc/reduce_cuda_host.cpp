// CUDA registration: unwraps tensors into pointers for the kernels in reduce_cuda.cu.
// The kernels trust cu_seqlens (validated in Python, as a check here would sync with the host) but clamp
// every segment to the token range, so bad offsets give wrong sums, never out-of-bounds accesses.
#include "reduce.h"
#include "reduce_cuda.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace shapkern {

namespace {

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor segment_sum_cuda(const at::Tensor& values_in, const at::Tensor& cu_seqlens_in) {
  check_segment_args(values_in, cu_seqlens_in, "values");
  const c10::cuda::CUDAGuard guard(values_in.device());
  const at::Tensor values = values_in.contiguous(), cu_seqlens = cu_seqlens_in.contiguous();
  const int64_t R = cu_seqlens.size(0) - 1, K = values.size(1);
  at::Tensor out = at::empty({R, K}, values.options());
  cuda::segment_sum(dtype_of(values), values.const_data_ptr(), cu_seqlens.const_data_ptr<int32_t>(),
                    out.mutable_data_ptr(), values.size(0), R, K, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor segment_expand_cuda(const at::Tensor& grad_in, const at::Tensor& cu_seqlens_in, int64_t num_tokens) {
  check_segment_args(grad_in, cu_seqlens_in, "grad");
  TORCH_CHECK(grad_in.size(0) == cu_seqlens_in.size(0) - 1, "grad has ", grad_in.size(0),
              " rows but cu_seqlens holds ", cu_seqlens_in.size(0) - 1, " sequences");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous(), cu_seqlens = cu_seqlens_in.contiguous();
  at::Tensor out = at::empty({num_tokens, grad.size(1)}, grad.options());
  cuda::segment_expand(grad.const_data_ptr(), cu_seqlens.const_data_ptr<int32_t>(), out.mutable_data_ptr(),
                       num_tokens, grad.size(0), grad.size(1) * grad.element_size(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> coalition_reduce_cuda(const at::Tensor& masks_in, const at::Tensor& values_in,
                                                         const at::Tensor& weights_in, int64_t num_players) {
  check_coalition_args(masks_in, values_in, weights_in, num_players);
  const c10::cuda::CUDAGuard guard(values_in.device());
  const at::Tensor masks = masks_in.contiguous(), values = values_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const int64_t B = values.size(0), M = values.size(1), K = values.size(2);
  at::Tensor sums = at::empty({B, num_players, K}, values.options());
  at::Tensor weight_sums = at::empty({B, num_players}, values.options());
  cuda::coalition_reduce(dtype_of(values), masks.const_data_ptr<int32_t>(), values.const_data_ptr(),
                         weights.const_data_ptr(), sums.mutable_data_ptr(), weight_sums.mutable_data_ptr(), B, M,
                         masks.size(2), num_players, K, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sums, weight_sums};
}

at::Tensor pack_masks_cuda(const at::Tensor& mask_in) {
  check_pack_args(mask_in);
  const c10::cuda::CUDAGuard guard(mask_in.device());
  const at::Tensor mask = mask_in.contiguous();
  const int64_t N = mask.size(-1), W = (N + 31) / 32;
  std::vector<int64_t> shape = mask.sizes().vec();
  shape.back() = W;
  at::Tensor out = at::empty(shape, mask.options().dtype(at::kInt));
  cuda::pack_masks(mask.const_data_ptr<bool>(), out.mutable_data_ptr<int32_t>(), N == 0 ? 0 : mask.numel() / N,
                   N, W, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unpack_masks_cuda(const at::Tensor& packed_in, int64_t num_players) {
  check_unpack_args(packed_in, num_players);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  const int64_t W = packed.size(-1);
  std::vector<int64_t> shape = packed.sizes().vec();
  shape.back() = num_players;
  at::Tensor out = at::empty(shape, packed.options().dtype(at::kBool));
  cuda::unpack_masks(packed.const_data_ptr<int32_t>(), out.mutable_data_ptr<bool>(),
                     W == 0 ? 0 : packed.numel() / W, W, num_players, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

}  // namespace shapkern

TORCH_LIBRARY_IMPL(shapkern, CUDA, m) {
  m.impl("segment_sum", &shapkern::segment_sum_cuda);
  m.impl("segment_expand", &shapkern::segment_expand_cuda);
  m.impl("coalition_reduce", &shapkern::coalition_reduce_cuda);
  m.impl("pack_masks", &shapkern::pack_masks_cuda);
  m.impl("unpack_masks", &shapkern::unpack_masks_cuda);
}
