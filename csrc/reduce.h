// CPU kernels of shapkern's reductions over coalitions (see reduce_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace shapkern {

// values (T, K), cu_seqlens (R+1,) int32 -> (R, K): sum of each sequence's rows.
at::Tensor segment_sum_cpu(const at::Tensor& values, const at::Tensor& cu_seqlens);
// grad (R, K), cu_seqlens (R+1,) int32 -> (T, K): row r copied to every token of sequence r.
at::Tensor segment_expand_cpu(const at::Tensor& grad, const at::Tensor& cu_seqlens, int64_t num_tokens);
// masks (B, M, W) int32, values (B, M, K), weights (B, M) -> sums (B, N, K), weight_sums (B, N).
std::tuple<at::Tensor, at::Tensor> coalition_reduce_cpu(const at::Tensor& masks, const at::Tensor& values,
                                                        const at::Tensor& weights, int64_t num_players);
// masks (B, M, W) int32, weights (B, M) -> (B, N, N): sum_m w[b, m] z_m z_m^T, exactly symmetric.
at::Tensor coalition_gram_cpu(const at::Tensor& masks, const at::Tensor& weights, int64_t num_players);
// bool (..., N) -> int32 (..., ceil(N/32)), bit n%32 of word n/32.
at::Tensor pack_masks_cpu(const at::Tensor& mask);
// int32 (..., W) -> bool (..., N).
at::Tensor unpack_masks_cpu(const at::Tensor& packed, int64_t num_players);

// Argument checks shared by the CPU and CUDA implementations.
void check_segment_args(const at::Tensor& values, const at::Tensor& cu_seqlens, const char* values_name);
void check_coalition_args(const at::Tensor& masks, const at::Tensor& values, const at::Tensor& weights,
                          int64_t num_players);
void check_gram_args(const at::Tensor& masks, const at::Tensor& weights, int64_t num_players);
void check_pack_args(const at::Tensor& mask);
void check_unpack_args(const at::Tensor& packed, int64_t num_players);

}  // namespace shapkern
