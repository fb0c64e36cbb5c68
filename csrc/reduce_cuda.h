// CUDA kernels of shapkern's reductions, on raw pointers (no torch headers here or in the .cu).
// Inputs are contiguous; every launch goes on `stream`. No float atomics: each output is written by
// one thread that loops over the reduced dimension in a fixed order, so results are deterministic.
// (coalition_reduce in float32/float16/bfloat16 and coalition_gram run as Triton GEMMs on CUDA:
// shapkern/kernels/coalition_reduce.py; coalition_reduce here serves float64 exactly.)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace shapkern::cuda {

enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// values (T, K), cu_seqlens (R+1,) -> out (R, K).
void segment_sum(DType dtype, const void* values, const int32_t* cu_seqlens, void* out, int64_t T, int64_t R,
                 int64_t K, cudaStream_t stream);
// grad (R, K), cu_seqlens (R+1,) -> out (T, K), rows of row_bytes bytes (a copy: any dtype).
void segment_expand(const void* grad, const int32_t* cu_seqlens, void* out, int64_t T, int64_t R,
                    int64_t row_bytes, cudaStream_t stream);
// masks (B, M, W), values (B, M, K), weights (B, M) -> sums (B, N, K), weight_sums (B, N).
void coalition_reduce(DType dtype, const int32_t* masks, const void* values, const void* weights, void* sums,
                      void* weight_sums, int64_t B, int64_t M, int64_t W, int64_t N, int64_t K,
                      cudaStream_t stream);
// mask (rows, N) -> packed (rows, W).
void pack_masks(const bool* mask, int32_t* packed, int64_t rows, int64_t N, int64_t W, cudaStream_t stream);
// packed (rows, W) -> mask (rows, N).
void unpack_masks(const int32_t* packed, bool* mask, int64_t rows, int64_t W, int64_t N, cudaStream_t stream);

}  // namespace shapkern::cuda
