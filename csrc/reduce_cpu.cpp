// CPU kernels for shapkern's reductions over coalitions and their CPU registration (schemas: schemas.cpp).
// All loops are over outputs with a fixed summation order, so results are deterministic.
#include "reduce.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace shapkern {

namespace {

constexpr int64_t kColumnBlock = 256;  // columns per task in segment_sum when sequences are few
constexpr int64_t kMaskBufferBytes = 64 << 20;  // unpacked-mask buffer of coalition_reduce: one GEMM up to this

// kByteBits[b][i] = bit i of byte b, as 0.0f or 1.0f.
struct ByteBits {
  float table[256][8];
  constexpr ByteBits() : table() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 8; ++i) table[b][i] = static_cast<float>((b >> i) & 1);
  }
};
constexpr ByteBits kByteBitsTable{};
constexpr const float (&kByteBits)[256][8] = kByteBitsTable.table;

// Hot loops, built for AVX2 (which brings POPCNT) too and picked at load time (function multiversioning): the
// extension stays portable while matching ATen's own vectorised kernels on current CPUs.
#if defined(__x86_64__) && defined(__GNUC__)
#define SHAPKERN_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SHAPKERN_VECTOR_CLONES
#endif

// acc[0:n] += rows[t * stride + 0:n] for t in [0, count).
template <typename acc_t, typename scalar_t>
inline void add_rows_impl(acc_t* __restrict__ acc, const scalar_t* __restrict__ rows, int64_t stride,
                          int64_t count, int64_t n) {
  int64_t t = 0;
  for (; t + 4 <= count; t += 4) {  // four rows per pass over acc: a quarter of the accumulator traffic
    const scalar_t* __restrict__ r0 = rows + t * stride;
    const scalar_t* __restrict__ r1 = r0 + stride;
    const scalar_t* __restrict__ r2 = r1 + stride;
    const scalar_t* __restrict__ r3 = r2 + stride;
    for (int64_t k = 0; k < n; ++k)
      acc[k] += (static_cast<acc_t>(r0[k]) + static_cast<acc_t>(r1[k])) +
                (static_cast<acc_t>(r2[k]) + static_cast<acc_t>(r3[k]));
  }
  for (; t < count; ++t)
    for (int64_t k = 0; k < n; ++k) acc[k] += static_cast<acc_t>(rows[t * stride + k]);
}
template <typename acc_t, typename scalar_t>
void add_rows(acc_t* acc, const scalar_t* rows, int64_t stride, int64_t count, int64_t n) {
  add_rows_impl(acc, rows, stride, count, n);
}
SHAPKERN_VECTOR_CLONES void add_rows(float* acc, const float* rows, int64_t stride, int64_t count, int64_t n) {
  add_rows_impl(acc, rows, stride, count, n);
}

// z[0:8 * nbytes] = w * the bits of bytes, and wsum += the same: one weighted mask row, 8 players at a time
// from a table, branch-free.
template <typename acc_t>
inline void unpack_weighted_row_impl(acc_t* __restrict__ z, acc_t* __restrict__ wsum, const uint8_t* bytes,
                                     int64_t nbytes, acc_t w) {
  for (int64_t byte = 0; byte < nbytes; ++byte) {
    const float* bits = kByteBits[bytes[byte]];
    for (int i = 0; i < 8; ++i) {
      const acc_t zn = static_cast<acc_t>(bits[i]) * w;
      z[byte * 8 + i] = zn;
      wsum[byte * 8 + i] += zn;
    }
  }
}
template <typename acc_t>
void unpack_weighted_row(acc_t* z, acc_t* wsum, const uint8_t* bytes, int64_t nbytes, acc_t w) {
  unpack_weighted_row_impl(z, wsum, bytes, nbytes, w);
}
SHAPKERN_VECTOR_CLONES void unpack_weighted_row(float* z, float* wsum, const uint8_t* bytes, int64_t nbytes,
                                                float w) {
  unpack_weighted_row_impl(z, wsum, bytes, nbytes, w);
}

// Rows [8 g, 8 g + 8) of one image's Gram matrix (row stride cols), upper triangle from column 8 g: for every
// coalition m holding player i, a[i, 8 g:] += w[m] * z_m[8 g:], 8 columns per mask byte, in vector registers.
// Eight lanes of T as a GCC vector: one AVX2 register for float, two for double.
template <typename T> struct Vec8;
template <> struct Vec8<float> { using type = float __attribute__((vector_size(32))); };
template <> struct Vec8<double> { using type = double __attribute__((vector_size(64))); };

template <typename acc_t>
inline void add_gram_rows_impl(acc_t* __restrict__ a, int64_t cols, const uint32_t* __restrict__ masks, int64_t M,
                               int64_t W, const acc_t* __restrict__ w, int64_t g, int64_t N) {
  using bits_t = typename Vec8<float>::type;
  using vec_t = typename Vec8<acc_t>::type;
  const int64_t Q = (N + 7) / 8;
  for (int64_t m = 0; m < M; ++m) {
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(masks + m * W);  // little-endian words
    for (unsigned players = bytes[g]; players != 0; players &= players - 1) {
      const int64_t i = g * 8 + __builtin_ctz(players);
      if (i >= N) break;
      acc_t* row = a + i * cols;
      for (int64_t q = g; q < Q; ++q) {
        bits_t bits;
        vec_t x;
        std::memcpy(&bits, kByteBits[bytes[q]], sizeof bits);
        std::memcpy(&x, row + q * 8, sizeof x);
        x += __builtin_convertvector(bits, vec_t) * w[m];
        std::memcpy(row + q * 8, &x, sizeof x);
      }
    }
  }
}
SHAPKERN_VECTOR_CLONES void add_gram_rows(float* a, int64_t cols, const uint32_t* masks, int64_t M, int64_t W,
                                          const float* w, int64_t g, int64_t N) {
  add_gram_rows_impl(a, cols, masks, M, W, w, g, N);
}
SHAPKERN_VECTOR_CLONES void add_gram_rows(double* a, int64_t cols, const uint32_t* masks, int64_t M, int64_t W,
                                          const double* w, int64_t g, int64_t N) {
  add_gram_rows_impl(a, cols, masks, M, W, w, g, N);
}

// out[0:n] = bits 0..n-1 of words, little-endian within each word.
SHAPKERN_VECTOR_CLONES void unpack_bits_row(bool* __restrict__ out, const uint32_t* __restrict__ words, int64_t n) {
  const int64_t full = n / 32;
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t word = words[w];
    for (int i = 0; i < 32; ++i) out[w * 32 + i] = (word >> i) & 1u;
  }
  for (int64_t i = full * 32; i < n; ++i) out[i] = (words[full] >> (i - full * 32)) & 1u;
}

// In place: bit j of x[i] <-> bit i of x[j], a 32 x 32 bit matrix transposed by five rounds of block swaps.
inline void transpose32(uint32_t* x) {
  uint32_t m = 0x0000FFFFu;
  for (int s = 16; s != 0; s >>= 1, m ^= m << s) {
    for (int k = 0; k < 32; k = (k + s + 1) & ~s) {
      const uint32_t t = ((x[k] >> s) ^ x[k + s]) & m;
      x[k] ^= t << s;
      x[k + s] ^= t;
    }
  }
}

// One mask word of up to 64 coalitions (rows of `words`, row_stride apart) transposed into the coalition sets
// of its 32 players: bit j of sets[i * stride] = bit i of words[j * row_stride] for j < rows, else 0.
void transpose_word(const uint32_t* words, int64_t row_stride, int64_t rows, uint64_t* sets, int64_t stride) {
  uint32_t lo[32] = {}, hi[32] = {};
  for (int64_t j = 0; j < std::min<int64_t>(rows, 32); ++j) lo[j] = words[j * row_stride];
  for (int64_t j = 32; j < rows; ++j) hi[j - 32] = words[j * row_stride];
  transpose32(lo);
  transpose32(hi);
  for (int i = 0; i < 32; ++i) sets[i * stride] = lo[i] | static_cast<uint64_t>(hi[i]) << 32;
}

// counts[j] = |S_i ∩ S_j| for j in [i, n), each set `words` 64-bit words long.
SHAPKERN_VECTOR_CLONES void intersection_counts(const uint64_t* __restrict__ sets, int64_t words, int64_t i,
                                                int64_t n, int64_t* __restrict__ counts) {
  const uint64_t* a = sets + i * words;
  for (int64_t j = i; j < n; ++j) {
    const uint64_t* b = sets + j * words;
    int64_t c0 = 0, c1 = 0, k = 0;  // two chains keep both popcount units busy
    for (; k + 2 <= words; k += 2) {
      c0 += __builtin_popcountll(a[k] & b[k]);
      c1 += __builtin_popcountll(a[k + 1] & b[k + 1]);
    }
    if (k < words) c0 += __builtin_popcountll(a[k] & b[k]);
    counts[j] = c0 + c1;
  }
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Segment [begin, end) of sequence r, clamped to [0, T] so bad offsets never read out of bounds.
std::pair<int64_t, int64_t> segment(const int32_t* cu, int64_t r, int64_t T) {
  const int64_t begin = std::clamp<int64_t>(cu[r], 0, T);
  return {begin, std::clamp<int64_t>(cu[r + 1], begin, T)};
}

}  // namespace

void check_segment_args(const at::Tensor& values, const at::Tensor& cu_seqlens, const char* values_name) {
  TORCH_CHECK(values.dim() == 2, values_name, " must be 2-D (T, K), got shape ", values.sizes());
  TORCH_CHECK(is_supported_float(values.scalar_type()), values_name,
              " must be float32, float64, float16 or bfloat16, got ", values.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1,
              "cu_seqlens must be 1-D (R+1,) with R >= 0, got shape ", cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, "cu_seqlens must be int32, got ", cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.device() == values.device(), "cu_seqlens is on ", cu_seqlens.device(), " but ",
              values_name, " is on ", values.device());
}

void check_coalition_args(const at::Tensor& masks, const at::Tensor& values, const at::Tensor& weights,
                          int64_t num_players) {
  TORCH_CHECK(masks.dim() == 3, "masks must be 3-D (B, M, W), got shape ", masks.sizes());
  TORCH_CHECK(masks.scalar_type() == at::kInt, "masks must be int32 (bit-packed), got ", masks.scalar_type());
  TORCH_CHECK(values.dim() == 3, "values must be 3-D (B, M, K), got shape ", values.sizes());
  TORCH_CHECK(is_supported_float(values.scalar_type()),
              "values must be float32, float64, float16 or bfloat16, got ", values.scalar_type());
  TORCH_CHECK(weights.dim() == 2, "weights must be 2-D (B, M), got shape ", weights.sizes());
  TORCH_CHECK(weights.scalar_type() == values.scalar_type(), "weights must have the dtype of values (",
              values.scalar_type(), "), got ", weights.scalar_type());
  TORCH_CHECK(masks.size(0) == values.size(0) && masks.size(1) == values.size(1), "masks shape ",
              masks.sizes(), " does not match values shape ", values.sizes(), " in (B, M)");
  TORCH_CHECK(weights.size(0) == values.size(0) && weights.size(1) == values.size(1), "weights shape ",
              weights.sizes(), " does not match values shape ", values.sizes(), " in (B, M)");
  TORCH_CHECK(num_players >= 0, "num_players must be >= 0, got ", num_players);
  TORCH_CHECK(masks.size(2) * 32 >= num_players, "masks has W=", masks.size(2),
              " words per coalition, too few for num_players=", num_players);
  TORCH_CHECK(masks.device() == values.device() && weights.device() == values.device(),
              "masks, values and weights must be on one device, got ", masks.device(), ", ", values.device(),
              ", ", weights.device());
}

void check_gram_args(const at::Tensor& masks, const at::Tensor& weights, int64_t num_players) {
  TORCH_CHECK(masks.dim() == 3, "masks must be 3-D (B, M, W), got shape ", masks.sizes());
  TORCH_CHECK(masks.scalar_type() == at::kInt, "masks must be int32 (bit-packed), got ", masks.scalar_type());
  TORCH_CHECK(weights.dim() == 2, "weights must be 2-D (B, M), got shape ", weights.sizes());
  TORCH_CHECK(is_supported_float(weights.scalar_type()),
              "weights must be float32, float64, float16 or bfloat16, got ", weights.scalar_type());
  TORCH_CHECK(masks.size(0) == weights.size(0) && masks.size(1) == weights.size(1), "masks shape ",
              masks.sizes(), " does not match weights shape ", weights.sizes(), " in (B, M)");
  TORCH_CHECK(num_players >= 0, "num_players must be >= 0, got ", num_players);
  TORCH_CHECK(masks.size(2) * 32 >= num_players, "masks has W=", masks.size(2),
              " words per coalition, too few for num_players=", num_players);
  TORCH_CHECK(masks.device() == weights.device(), "masks is on ", masks.device(), " but weights is on ",
              weights.device());
}

void check_pack_args(const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() >= 1, "mask must have a last dimension of players (..., N)");
}

void check_unpack_args(const at::Tensor& packed, int64_t num_players) {
  TORCH_CHECK(packed.scalar_type() == at::kInt, "packed must be int32, got ", packed.scalar_type());
  TORCH_CHECK(packed.dim() >= 1, "packed must have a last dimension of words (..., W)");
  TORCH_CHECK(num_players >= 0, "num_players must be >= 0, got ", num_players);
  TORCH_CHECK(packed.size(-1) * 32 >= num_players, "packed has W=", packed.size(-1),
              " words, too few for num_players=", num_players);
}

at::Tensor segment_sum_cpu(const at::Tensor& values_in, const at::Tensor& cu_seqlens_in) {
  check_segment_args(values_in, cu_seqlens_in, "values");
  const at::Tensor values = values_in.contiguous();
  const at::Tensor cu_seqlens = cu_seqlens_in.contiguous();
  const int64_t T = values.size(0), K = values.size(1), R = cu_seqlens.size(0) - 1;
  at::Tensor out = at::empty({R, K}, values.options());
  // Whole rows stream best; split columns too only when there are fewer sequences than threads.
  const int64_t width = R >= at::get_num_threads() ? std::max<int64_t>(K, 1) : kColumnBlock;
  const int64_t blocks = (K + width - 1) / width;
  const int64_t grain = T * K < (1 << 16) ? R * blocks : 1;  // small inputs: no threads
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "segment_sum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const int32_t* cu = cu_seqlens.const_data_ptr<int32_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, R * blocks, grain, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> acc(width);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = i / blocks, k0 = (i % blocks) * width, n = std::min(width, K - k0);
        const auto [begin, end] = segment(cu, r, T);
        acc_t* __restrict__ a = acc.data();
        std::fill_n(a, n, acc_t(0));
        add_rows(a, v + begin * K + k0, K, end - begin, n);
        std::copy_n(a, n, o + r * K + k0);
      }
    });
  });
  return out;
}

at::Tensor segment_expand_cpu(const at::Tensor& grad_in, const at::Tensor& cu_seqlens_in, int64_t num_tokens) {
  check_segment_args(grad_in, cu_seqlens_in, "grad");
  TORCH_CHECK(grad_in.size(0) == cu_seqlens_in.size(0) - 1, "grad has ", grad_in.size(0),
              " rows but cu_seqlens holds ", cu_seqlens_in.size(0) - 1, " sequences");
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor cu_seqlens = cu_seqlens_in.contiguous();
  const int64_t R = grad.size(0), K = grad.size(1);
  at::Tensor out = at::empty({num_tokens, K}, grad.options());
  const int64_t row_bytes = K * static_cast<int64_t>(grad.element_size());
  const int32_t* cu = cu_seqlens.const_data_ptr<int32_t>();
  const char* g = static_cast<const char*>(grad.const_data_ptr());
  char* o = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, R, num_tokens * K < (1 << 16) ? R : 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const auto [begin, end] = segment(cu, r, num_tokens);
      for (int64_t t = begin; t < end; ++t) std::memcpy(o + t * row_bytes, g + r * row_bytes, row_bytes);
    }
  });
  return out;
}

// sums = Zw^T V batched over b, with Zw[b, m, n] = w[b, m] z[b, m, n]: the masks are unpacked (weight sums on
// the way) into a buffer of at most kMaskBufferBytes, and the contraction is left to BLAS (bmm, with its own
// threads). The first chunk writes the output, so it is never zero-filled.
std::tuple<at::Tensor, at::Tensor> coalition_reduce_cpu(const at::Tensor& masks_in, const at::Tensor& values_in,
                                                        const at::Tensor& weights_in, int64_t num_players) {
  check_coalition_args(masks_in, values_in, weights_in, num_players);
  const at::Tensor masks = masks_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const int64_t B = values.size(0), M = values.size(1), K = values.size(2), W = masks.size(2);
  const int64_t N = num_players;
  const at::ScalarType acc_type = at::toOpMathType(values.scalar_type());
  const auto acc_opts = values.options().dtype(acc_type);
  at::Tensor sums = at::empty({B, N, K}, acc_opts);
  // Rows of the buffer are padded to whole words so that the unpacking loop has a fixed trip count.
  const int64_t padded = W * 32;
  const int64_t row_bytes = std::max<int64_t>(B * padded, 1) * at::elementSize(acc_type);
  const int64_t max_chunk = std::max<int64_t>(1, kMaskBufferBytes / row_bytes);
  at::Tensor zw = at::empty({B, std::max<int64_t>(std::min(max_chunk, M), 1), padded}, acc_opts);
  at::Tensor padded_sums = at::zeros({B, padded}, acc_opts);
  if (M == 0) sums.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "coalition_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const uint32_t* mk = reinterpret_cast<const uint32_t*>(masks.const_data_ptr<int32_t>());
    const scalar_t* w = weights.const_data_ptr<scalar_t>();
    acc_t* ws = padded_sums.mutable_data_ptr<acc_t>();
    acc_t* z = zw.mutable_data_ptr<acc_t>();
    const int64_t z_stride = zw.size(1) * padded;
    for (int64_t m0 = 0; m0 < M; m0 += max_chunk) {
      const int64_t chunk = std::min(max_chunk, M - m0);
      // One thread: unpacking is cheap next to the GEMM, and OpenMP workers left spinning after a parallel
      // region would compete with BLAS's own threads for the cores.
      for (int64_t b = 0; b < B; ++b) {
        acc_t* __restrict__ wsum = ws + b * padded;
        for (int64_t j = 0; j < chunk; ++j) {
          const int64_t bm = b * M + m0 + j;
          const acc_t wm = static_cast<acc_t>(w[bm]);
          acc_t* __restrict__ zrow = z + b * z_stride + j * padded;
          const uint8_t* bytes = reinterpret_cast<const uint8_t*>(mk + bm * W);  // little-endian words
          unpack_weighted_row(zrow, wsum, bytes, W * 4, wm);
        }
      }
      const at::Tensor zt = zw.narrow(1, 0, chunk).narrow(2, 0, N).transpose(1, 2);
      const at::Tensor v = values.narrow(1, m0, chunk).to(acc_type);
      if (m0 == 0) {
        at::bmm_out(sums, zt, v);
      } else {
        sums.baddbmm_(zt, v);
      }
    }
  });
  const at::Tensor weight_sums = padded_sums.narrow(1, 0, N).contiguous();  // contiguous, as its fake
  return {sums.to(values.scalar_type()), weight_sums.to(values.scalar_type())};
}

namespace {

// out[image] = w * (|S_i ∩ S_j|)_ij for each listed image (equal weights w = scale[u]): the masks are transposed
// into one 64-bit coalition set per player, and each pair of players is an AND + popcount over M / 64 words.
template <typename scalar_t, typename acc_t>
void gram_by_counts(scalar_t* out, const uint32_t* masks, int64_t M, int64_t W, int64_t N,
                    const std::vector<int64_t>& images, const std::vector<acc_t>& scale) {
  const int64_t U = static_cast<int64_t>(images.size()), L = (M + 63) / 64, P = (N + 31) / 32 * 32;
  std::vector<uint64_t> sets(U * P * L);
  at::parallel_for(0, U * L, U * L * P < (1 << 14) ? U * L : 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t u = i / L, c = i % L, m0 = c * 64;
      const uint32_t* rows = masks + (images[u] * M + m0) * W;
      for (int64_t word = 0; word < P / 32; ++word)
        transpose_word(rows + word, W, std::min<int64_t>(64, M - m0), sets.data() + (u * P + word * 32) * L + c, L);
    }
  });
  at::parallel_for(0, U * N, U * N * N * L < (1 << 16) ? U * N : 1, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> counts(N);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t u = r / N, i = r % N;
      intersection_counts(sets.data() + u * P * L, L, i, N, counts.data());
      scalar_t* a = out + images[u] * N * N;
      for (int64_t j = i; j < N; ++j)
        a[i * N + j] = a[j * N + i] = static_cast<scalar_t>(scale[u] * static_cast<acc_t>(counts[j]));
    }
  });
}

// out[image] = sum_m w[m] z_m z_m^T for each listed image: every coalition adds its weighted mask row to the
// rows of its players, upper triangle only, accumulated in acc_t in coalition order.
template <typename scalar_t, typename acc_t>
void gram_by_rows(scalar_t* out, const uint32_t* masks, const acc_t* weights, int64_t M, int64_t W, int64_t N,
                  const std::vector<int64_t>& images) {
  const int64_t V = static_cast<int64_t>(images.size()), Q = (N + 7) / 8, cols = Q * 8;
  std::vector<acc_t> gram(V * N * cols, acc_t(0));
  // The work of an 8-row group shrinks down the triangle: groups go round-robin to the threads.
  const int64_t threads = V * M * N * N < (1 << 18) ? 1 : at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t item = t; item < V * Q; item += threads) {
        const int64_t v = item / Q, b = images[v];
        add_gram_rows(gram.data() + v * N * cols, cols, masks + b * M * W, M, W, weights + b * M, item % Q, N);
      }
    }
  });
  at::parallel_for(0, V * N, 1 << 12, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t v = r / N, i = r % N;
      const acc_t* row = gram.data() + (v * N + i) * cols;
      scalar_t* a = out + images[v] * N * N;
      for (int64_t j = i; j < N; ++j) a[i * N + j] = a[j * N + i] = static_cast<scalar_t>(row[j]);
    }
  });
}

}  // namespace

// Images whose weights are all equal (KernelSHAP's A = E[z z^T]) take exact popcounts, a fraction of a GEMM's
// work; the others a row update that skips the players outside each coalition and the lower triangle. Both
// mirror the upper triangle, so A is exactly symmetric.
at::Tensor coalition_gram_cpu(const at::Tensor& masks_in, const at::Tensor& weights_in, int64_t num_players) {
  check_gram_args(masks_in, weights_in, num_players);
  const at::Tensor masks = masks_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const int64_t B = masks.size(0), M = masks.size(1), W = masks.size(2), N = num_players;
  at::Tensor out = at::empty({B, N, N}, weights.options());
  if (N == 0) return out;
  const at::Tensor acc_weights = weights.to(at::toOpMathType(weights.scalar_type()));
  const uint32_t* mk = reinterpret_cast<const uint32_t*>(masks.const_data_ptr<int32_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(), "coalition_gram_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* w = acc_weights.const_data_ptr<acc_t>();
    std::vector<int64_t> equal, varying;
    std::vector<acc_t> scale;
    for (int64_t b = 0; b < B; ++b) {
      const acc_t* wb = w + b * M;
      const acc_t w0 = M == 0 ? acc_t(0) : wb[0];
      if (std::isfinite(w0) && std::all_of(wb, wb + M, [&](acc_t x) { return x == w0; })) {
        equal.push_back(b);
        scale.push_back(w0);
      } else {
        varying.push_back(b);
      }
    }
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (!equal.empty()) gram_by_counts(o, mk, M, W, N, equal, scale);
    if (!varying.empty()) gram_by_rows(o, mk, w, M, W, N, varying);
  });
  return out;
}

at::Tensor pack_masks_cpu(const at::Tensor& mask_in) {
  check_pack_args(mask_in);
  const at::Tensor mask = mask_in.contiguous();
  const int64_t N = mask.size(-1), W = (N + 31) / 32;
  const int64_t rows = N == 0 ? 0 : mask.numel() / N;
  std::vector<int64_t> shape = mask.sizes().vec();
  shape.back() = W;
  at::Tensor out = at::empty(shape, mask.options().dtype(at::kInt));
  const bool* p = mask.const_data_ptr<bool>();
  int32_t* o = out.mutable_data_ptr<int32_t>();
  at::parallel_for(0, rows, 4096, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t wi = 0; wi < W; ++wi) {
        uint32_t word = 0;
        const int64_t n0 = wi * 32, bits = std::min<int64_t>(32, N - n0);
        for (int64_t i = 0; i < bits; ++i) word |= static_cast<uint32_t>(p[r * N + n0 + i]) << i;
        o[r * W + wi] = static_cast<int32_t>(word);
      }
    }
  });
  return out;
}

at::Tensor unpack_masks_cpu(const at::Tensor& packed_in, int64_t num_players) {
  check_unpack_args(packed_in, num_players);
  const at::Tensor packed = packed_in.contiguous();
  const int64_t W = packed.size(-1), N = num_players;
  const int64_t rows = W == 0 ? 0 : packed.numel() / W;
  std::vector<int64_t> shape = packed.sizes().vec();
  shape.back() = N;
  at::Tensor out = at::empty(shape, packed.options().dtype(at::kBool));
  const uint32_t* p = reinterpret_cast<const uint32_t*>(packed.const_data_ptr<int32_t>());
  bool* o = out.mutable_data_ptr<bool>();
  at::parallel_for(0, rows, 4096, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      unpack_bits_row(o + r * N, p + r * W, N);
    }
  });
  return out;
}

}  // namespace shapkern

TORCH_LIBRARY_IMPL(shapkern, CPU, m) {
  m.impl("segment_sum", &shapkern::segment_sum_cpu);
  m.impl("segment_expand", &shapkern::segment_expand_cpu);
  m.impl("coalition_reduce", &shapkern::coalition_reduce_cpu);
  m.impl("coalition_gram", &shapkern::coalition_gram_cpu);
  m.impl("pack_masks", &shapkern::pack_masks_cpu);
  m.impl("unpack_masks", &shapkern::unpack_masks_cpu);
}
