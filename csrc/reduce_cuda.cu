// CUDA kernels of shapkern's reductions; see reduce_cuda.h.
#include "reduce_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace shapkern::cuda {

namespace {

// Half types accumulate in float, double in double. Explicit conversions: torch builds with
// __CUDA_NO_HALF_CONVERSIONS__.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

constexpr int kThreads = 256;
constexpr int kPlayers = 16;  // players per coalition_reduce block: a tile never straddles a mask word
constexpr int kTokensPerThread = 8;  // segment_expand: stores per thread for a sequence of average length

// Threads across columns: enough warps to cover K, at most kThreads.
int column_threads(int64_t K) { return static_cast<int>(std::min<int64_t>(kThreads, (K + 31) / 32 * 32)); }

__device__ __forceinline__ void segment_bounds(const int32_t* cu, int64_t r, int64_t T, int64_t& begin,
                                               int64_t& end) {
  begin = min(max(static_cast<int64_t>(cu[r]), int64_t(0)), T);
  end = min(max(static_cast<int64_t>(cu[r + 1]), begin), T);
}

// grid (R, ceil(K / threads)): one thread per output (r, k), looping over the tokens of r.
template <typename T>
__global__ void segment_sum_kernel(const T* values, const int32_t* cu, T* out, int64_t num_tokens, int64_t K) {
  const int64_t r = blockIdx.x, k = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  int64_t begin, end;
  segment_bounds(cu, r, num_tokens, begin, end);
  typename Acc<T>::type acc = 0;
  for (int64_t t = begin; t < end; ++t) acc += to_acc(values[t * K + k]);
  out[r * K + k] = from_acc<T>(acc);
}

// grid (R, splits, ceil(units / blockDim.x)), block (x: units of the row, y: tokens): sequence r's row, in
// units U of 2 to 16 bytes, is loaded once per thread and stored to tokens begin + split * blockDim.y + y,
// then every gridDim.y * blockDim.y tokens; consecutive threads store consecutive units (coalesced), and
// long sequences are spread over the splits.
template <typename U>
__global__ void segment_expand_kernel(const U* __restrict__ grad, const int32_t* __restrict__ cu,
                                      U* __restrict__ out, int64_t num_tokens, int64_t units) {
  const int64_t r = blockIdx.x, col = static_cast<int64_t>(blockIdx.z) * blockDim.x + threadIdx.x;
  if (col >= units) return;
  int64_t begin, end;
  segment_bounds(cu, r, num_tokens, begin, end);
  int64_t t = begin + static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  if (t >= end) return;
  const U row = grad[r * units + col];
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (; t < end; t += stride) out[t * units + col] = row;
}

// grid (B, ceil(N / kPlayers), ceil(K / threads)): each thread owns kPlayers outputs (b, n0.., k) and
// reads each value v[b, m, k] once for all of them.
template <typename T>
__global__ void coalition_reduce_kernel(const int32_t* masks, const T* values, const T* weights, T* sums,
                                        int64_t M, int64_t W, int64_t N, int64_t K) {
  using acc_t = typename Acc<T>::type;
  const int64_t b = blockIdx.x, n0 = static_cast<int64_t>(blockIdx.y) * kPlayers;
  const int64_t k = static_cast<int64_t>(blockIdx.z) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const int64_t word = n0 >> 5;
  const int shift = n0 & 31;
  acc_t acc[kPlayers] = {};
  for (int64_t m = 0; m < M; ++m) {
    const int64_t bm = b * M + m;
    const uint32_t bits = static_cast<uint32_t>(masks[bm * W + word]) >> shift;
    if ((bits & ((1u << kPlayers) - 1)) == 0) continue;  // uniform across the block
    const acc_t wv = to_acc(weights[bm]) * to_acc(values[bm * K + k]);
#pragma unroll
    for (int j = 0; j < kPlayers; ++j) acc[j] += (bits >> j) & 1u ? wv : acc_t(0);
  }
#pragma unroll
  for (int j = 0; j < kPlayers; ++j) {
    if (n0 + j < N) sums[(b * N + n0 + j) * K + k] = from_acc<T>(acc[j]);
  }
}

// One thread per (b, n).
template <typename T>
__global__ void weight_sums_kernel(const int32_t* masks, const T* weights, T* out, int64_t B, int64_t M,
                                   int64_t W, int64_t N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * N) return;
  const int64_t b = i / N, n = i % N;
  typename Acc<T>::type acc = 0;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t bm = b * M + m;
    if ((static_cast<uint32_t>(masks[bm * W + (n >> 5)]) >> (n & 31)) & 1u) acc += to_acc(weights[bm]);
  }
  out[i] = from_acc<T>(acc);
}

__global__ void pack_masks_kernel(const bool* mask, int32_t* packed, int64_t rows, int64_t N, int64_t W) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * W) return;
  const int64_t r = i / W, n0 = (i % W) * 32;
  const int bits = static_cast<int>(N - n0 < 32 ? N - n0 : 32);
  uint32_t word = 0;
  for (int j = 0; j < bits; ++j) word |= static_cast<uint32_t>(mask[r * N + n0 + j]) << j;
  packed[i] = static_cast<int32_t>(word);
}

__global__ void unpack_masks_kernel(const int32_t* packed, bool* mask, int64_t rows, int64_t W, int64_t N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * N) return;
  const int64_t r = i / N, n = i % N;
  mask[i] = (static_cast<uint32_t>(packed[r * W + (n >> 5)]) >> (n & 31)) & 1u;
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

template <typename F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
}

}  // namespace

void segment_sum(DType dtype, const void* values, const int32_t* cu_seqlens, void* out, int64_t T, int64_t R,
                 int64_t K, cudaStream_t stream) {
  if (R == 0 || K == 0) return;
  const int threads = column_threads(K);
  const dim3 grid(static_cast<unsigned>(R), static_cast<unsigned>((K + threads - 1) / threads));
  dispatch(dtype, [&](auto tag) {
    using T_ = decltype(tag);
    segment_sum_kernel<T_><<<grid, threads, 0, stream>>>(static_cast<const T_*>(values), cu_seqlens,
                                                         static_cast<T_*>(out), T, K);
  });
}

void segment_expand(const void* grad, const int32_t* cu_seqlens, void* out, int64_t T, int64_t R,
                    int64_t row_bytes, cudaStream_t stream) {
  if (T == 0 || R == 0 || row_bytes == 0) return;
  // The widest unit dividing the row and the addresses of both tensors.
  const auto address_bits = reinterpret_cast<uintptr_t>(grad) | reinterpret_cast<uintptr_t>(out);
  int unit = 16;
  while (unit > 1 && ((row_bytes | static_cast<int64_t>(address_bits)) & (unit - 1)) != 0) unit /= 2;
  const int64_t units = row_bytes / unit;
  int tx = 1;
  while (tx < units && tx < kThreads) tx *= 2;
  const dim3 block(tx, kThreads / tx);
  // About kTokensPerThread tokens per thread for a sequence of average length.
  const int64_t per_split = static_cast<int64_t>(block.y) * kTokensPerThread;
  const int64_t splits = std::min<int64_t>(std::max<int64_t>((T / R + per_split - 1) / per_split, 1), 65535);
  const dim3 grid(static_cast<unsigned>(R), static_cast<unsigned>(splits),
                  static_cast<unsigned>((units + tx - 1) / tx));
  auto launch = [&](auto tag) {
    using U = decltype(tag);
    segment_expand_kernel<U><<<grid, block, 0, stream>>>(static_cast<const U*>(grad), cu_seqlens,
                                                         static_cast<U*>(out), T, units);
  };
  switch (unit) {
    case 16: return launch(uint4{});
    case 8: return launch(uint2{});
    case 4: return launch(uint32_t{});
    case 2: return launch(uint16_t{});
    default: return launch(uint8_t{});
  }
}

void coalition_reduce(DType dtype, const int32_t* masks, const void* values, const void* weights, void* sums,
                      void* weight_sums, int64_t B, int64_t M, int64_t W, int64_t N, int64_t K,
                      cudaStream_t stream) {
  if (B == 0 || N == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T_ = decltype(tag);
    const T_* w = static_cast<const T_*>(weights);
    if (K > 0) {
      const int threads = column_threads(K);
      const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>((N + kPlayers - 1) / kPlayers),
                      static_cast<unsigned>((K + threads - 1) / threads));
      coalition_reduce_kernel<T_><<<grid, threads, 0, stream>>>(masks, static_cast<const T_*>(values), w,
                                                                static_cast<T_*>(sums), M, W, N, K);
    }
    weight_sums_kernel<T_><<<blocks_for(B * N), kThreads, 0, stream>>>(masks, w, static_cast<T_*>(weight_sums),
                                                                        B, M, W, N);
  });
}

void pack_masks(const bool* mask, int32_t* packed, int64_t rows, int64_t N, int64_t W, cudaStream_t stream) {
  if (rows * W == 0) return;
  pack_masks_kernel<<<blocks_for(rows * W), kThreads, 0, stream>>>(mask, packed, rows, N, W);
}

void unpack_masks(const int32_t* packed, bool* mask, int64_t rows, int64_t W, int64_t N, cudaStream_t stream) {
  if (rows * N == 0) return;
  unpack_masks_kernel<<<blocks_for(rows * N), kThreads, 0, stream>>>(packed, mask, rows, W, N);
}

}  // namespace shapkern::cuda
