// Checks the CPU kernels against naive loops on random data. Exit code 0 on success.
#include "reduce.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect_close(const at::Tensor& actual, const at::Tensor& expected, double tol, const std::string& what) {
  const bool ok = actual.sizes() == expected.sizes() && actual.scalar_type() == expected.scalar_type() &&
                  at::allclose(actual.to(at::kDouble), expected.to(at::kDouble), tol, tol);
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  failures += !ok;
}

at::Tensor cu_seqlens(const std::vector<int32_t>& lengths) {
  std::vector<int32_t> cu{0};
  for (int32_t n : lengths) cu.push_back(cu.back() + n);
  return at::tensor(cu, at::kInt);
}

void test_segments(at::ScalarType dtype, double tol) {
  const std::vector<int32_t> lengths{3, 0, 1, 700, 0, 5, 1};
  const at::Tensor cu = cu_seqlens(lengths);
  const int64_t T = cu[-1].item<int64_t>(), K = 300;
  // Inputs rounded to dtype first, so only the kernel's own rounding is compared.
  const at::Tensor values = at::randn({T, K}).to(dtype).to(at::kDouble);
  const at::Tensor grad = at::randn({static_cast<int64_t>(lengths.size()), K}).to(dtype).to(at::kDouble);
  at::Tensor sums = at::zeros({static_cast<int64_t>(lengths.size()), K}, at::kDouble);
  at::Tensor expanded = at::zeros({T, K}, at::kDouble);
  auto v = values.accessor<double, 2>();
  auto g = grad.accessor<double, 2>();
  auto s = sums.accessor<double, 2>();
  auto e = expanded.accessor<double, 2>();
  for (size_t r = 0, t0 = 0; r < lengths.size(); t0 += lengths[r++]) {
    for (int64_t t = t0; t < static_cast<int64_t>(t0) + lengths[r]; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        s[r][k] += v[t][k];
        e[t][k] = g[r][k];
      }
    }
  }
  const std::string name = std::string(c10::toString(dtype));
  expect_close(shapkern::segment_sum_cpu(values.to(dtype), cu), sums.to(dtype), tol * std::sqrt(700.0),
               "segment_sum " + name);
  expect_close(shapkern::segment_expand_cpu(grad.to(dtype), cu, T), expanded.to(dtype), tol,
               "segment_expand " + name);
}

void test_coalitions(at::ScalarType dtype, double tol) {
  const int64_t B = 3, M = 300, N = 45, K = 7;
  const at::Tensor mask = at::rand({B, M, N}) < 0.5;
  const at::Tensor values = at::randn({B, M, K}).to(dtype).to(at::kDouble);
  const at::Tensor weights = (at::rand({B, M}) + 0.5).to(dtype).to(at::kDouble);
  at::Tensor sums = at::zeros({B, N, K}, at::kDouble), weight_sums = at::zeros({B, N}, at::kDouble);
  auto z = mask.accessor<bool, 3>();
  auto v = values.accessor<double, 3>();
  auto w = weights.accessor<double, 2>();
  auto s = sums.accessor<double, 3>();
  auto ws = weight_sums.accessor<double, 2>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        if (!z[b][m][n]) continue;
        ws[b][n] += w[b][m];
        for (int64_t k = 0; k < K; ++k) s[b][n][k] += w[b][m] * v[b][m][k];
      }
    }
  }
  const at::Tensor packed = shapkern::pack_masks_cpu(mask);
  const auto [actual, actual_w] = shapkern::coalition_reduce_cpu(packed, values.to(dtype), weights.to(dtype), N);
  const std::string name = std::string(c10::toString(dtype));
  expect_close(actual, sums.to(dtype), tol * std::sqrt(M), "coalition_reduce sums " + name);
  expect_close(actual_w, weight_sums.to(dtype), tol * std::sqrt(M), "coalition_reduce weight_sums " + name);
}

// Image 0 has equal weights (the popcount path), the others random ones (the row-update path).
void test_gram(at::ScalarType dtype, double tol, int64_t B, int64_t M, int64_t N) {
  const at::Tensor mask = at::rand({B, M, N}) < 0.5;
  at::Tensor weights = (at::rand({B, M}) + 0.5).to(dtype).to(at::kDouble);
  weights[0].fill_(0.75);
  at::Tensor gram = at::zeros({B, N, N}, at::kDouble);
  auto z = mask.accessor<bool, 3>();
  auto w = weights.accessor<double, 2>();
  auto a = gram.accessor<double, 3>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j)
          if (z[b][m][i] && z[b][m][j]) a[b][i][j] += w[b][m];
  const at::Tensor actual = shapkern::coalition_gram_cpu(shapkern::pack_masks_cpu(mask), weights.to(dtype), N);
  const std::string name = std::string(c10::toString(dtype)) + " B=" + std::to_string(B) +
                           " M=" + std::to_string(M) + " N=" + std::to_string(N);
  expect_close(actual, gram.to(dtype), tol * std::sqrt(static_cast<double>(std::max<int64_t>(M, 1))),
               "coalition_gram " + name);
  const bool symmetric = at::equal(actual, actual.transpose(1, 2));
  std::printf("%s coalition_gram symmetric %s\n", symmetric ? "ok  " : "FAIL", name.c_str());
  failures += !symmetric;
}

void test_masks() {
  for (int64_t n : {1, 31, 32, 33, 196}) {
    const at::Tensor mask = at::rand({4, 5, n}) < 0.5;
    const at::Tensor packed = shapkern::pack_masks_cpu(mask);
    const bool ok = packed.size(-1) == (n + 31) / 32 && at::equal(shapkern::unpack_masks_cpu(packed, n), mask);
    std::printf("%s pack/unpack N=%ld\n", ok ? "ok  " : "FAIL", static_cast<long>(n));
    failures += !ok;
  }
  at::Tensor mask = at::zeros({33}, at::kBool);
  mask[0] = true;
  mask[31] = true;
  mask[32] = true;
  const at::Tensor packed = shapkern::pack_masks_cpu(mask);
  const bool ok = packed[0].item<int32_t>() == static_cast<int32_t>(0x80000001u) && packed[1].item<int32_t>() == 1;
  std::printf("%s bit order\n", ok ? "ok  " : "FAIL");
  failures += !ok;
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_segments(at::kFloat, 1e-5);
  test_segments(at::kDouble, 1e-12);
  test_segments(at::kBFloat16, 1e-2);
  test_coalitions(at::kFloat, 1e-5);
  test_coalitions(at::kDouble, 1e-12);
  test_coalitions(at::kHalf, 2e-3);
  test_gram(at::kFloat, 1e-5, 3, 300, 45);
  test_gram(at::kDouble, 1e-12, 3, 130, 196);
  test_gram(at::kBFloat16, 1e-2, 2, 64, 33);
  test_gram(at::kFloat, 1e-5, 2, 1, 1);
  test_masks();
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
