// CPU implementations of the engm_fast ops (schemas in csrc/ops.cpp).
//
// Semantics match engm_fast/reference.py exactly (shapes, dtypes, routes); only the way the
// work is scheduled differs:
//
//   per_example_sqnorm(a, b, mode)  ->  n_i^2 = ||b_i^T a_i||_F^2, [B]
//     row norms  T == 1 (unless mode == "direct"): n_i^2 = ||a_i||^2 ||b_i||^2.
//     ghost      n_i^2 = sum_{t,s} (a_it . a_is)(b_it . b_is), computed per example from tiles
//                of the two Gram matrices, reduced tile by tile: never a B x T x T tensor,
//                not even one T x T matrix when T > kGramTile.
//     direct     g_i = b_i^T a_i computed per example in a per-thread tile of at most
//                kDirectTileElements elements and reduced at once: memory is independent of B
//                (and bounded for huge layers).
//     auto       ghost iff 2 T^2 <= d_in d_out (reference.choose_sqnorm_route).
//   weighted_outer_sum(a, b, w)  ->  sum_i w_i b_i^T a_i = (w * b)^T a, one GEMM.
//
// Precision: inputs of 16 and 32 bits are computed in float32, float64 in float64 (16-bit
// inputs are upcast one example, or one bounded chunk, at a time). Sums of squares and the
// Gram dot products use 16 lanes of the accumulation dtype over blocks of 1024 elements and
// add the block sums in double: each float32 partial sum has at most 64 terms (worst-case
// relative error ~64 * 6e-8 = 4e-6) however long the sum is, e.g. the 4M entries of a
// 2048 x 2048 g_i.
//
// Threading: examples are independent, so the GEMM routes parallelize over examples with
// at::parallel_for (one chunk of examples per thread, buffers allocated once per chunk) and
// call single-threaded GEMMs inside (ATen/MKL do not nest threads inside a parallel region).
// With fewer examples than threads, examples run one after another and each GEMM uses all
// threads instead.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

namespace engm_fast {
namespace {

// Bound on the per-thread tile of g_i in the direct route, and on the per-chunk fp32 copies of
// 16-bit inputs in weighted_outer_sum: 2^22 elements = 16 MiB in float32 (the same bound as
// reference._DIRECT_CHUNK_ELEMENTS).
constexpr int64_t kDirectTileElements = int64_t{1} << 22;

// Side of a Gram tile in the ghost route: a 256 x 256 float32 tile is 256 KiB, so the a- and
// b-tiles (512 KiB together) are still in L2 when their dot product is taken right after the
// two GEMMs that wrote them. For T <= 256 (e.g. a transformer with T = 128) it is one tile.
constexpr int64_t kGramTile = 256;

// Direct route, small layers: examples per batched GEMM so that their g_i together fill 2^16
// elements (256 KiB in float32, L2-resident while they are reduced).
constexpr int64_t kGroupElements = int64_t{1} << 16;

// Summation: kLanes independent accumulators over blocks of kBlock elements (64 terms per
// lane), block sums added in double. The lane loop vectorizes without reassociation; it is
// written over whole groups of kLanes because Python's CFLAGS bring -fwrapv, under which GCC
// does not vectorize a `j + kLanes <= stop` loop (measured: 5x slower).
constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 1024;

// The extension is compiled for the baseline x86-64 ISA (SSE2); on Linux/x86-64 the block dot
// product is also compiled for AVX2 and AVX-512 and picked at load time (GCC/Clang function
// multiversioning): 1.8x faster for the T == 1 row norms of a 784 -> 512 layer.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define ENGM_FAST_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ENGM_FAST_MULTIVERSION
#endif

template <typename T>
inline T dot_lanes(const T* x, const T* y, int64_t n) {
  T lane[kLanes] = {};
  const int64_t groups = n / kLanes;
  for (int64_t g = 0; g < groups; ++g) {
    const T* xg = x + g * kLanes;
    const T* yg = y + g * kLanes;
    for (int64_t l = 0; l < kLanes; ++l) {
      lane[l] += xg[l] * yg[l];
    }
  }
  T sum = 0;
  for (int64_t j = groups * kLanes; j < n; ++j) {
    sum += x[j] * y[j];
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    sum += lane[l];
  }
  return sum;
}

ENGM_FAST_MULTIVERSION float dot_block(const float* x, const float* y, int64_t n) {
  return dot_lanes(x, y, n);
}

ENGM_FAST_MULTIVERSION double dot_block(const double* x, const double* y, int64_t n) {
  return dot_lanes(x, y, n);
}

// sum_j x_j * y_j in double, from float32 (float64) block sums. 16-bit inputs are converted
// to float32 one block at a time on the stack.
template <typename scalar_t>
double blocked_dot(const scalar_t* x, const scalar_t* y, int64_t n) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      total += static_cast<double>(dot_block(x + start, y + start, len));
    } else {
      float xf[kBlock];
      float yf[kBlock];
      for (int64_t j = 0; j < len; ++j) {
        xf[j] = static_cast<float>(x[start + j]);
      }
      const float* yp = xf;
      if (y != x) {  // squares (row norms) convert once
        for (int64_t j = 0; j < len; ++j) {
          yf[j] = static_cast<float>(y[start + j]);
        }
        yp = yf;
      }
      total += static_cast<double>(dot_block(xf, yp, len));
    }
  }
  return total;
}

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// float64 for float64 inputs, float32 for the other supported dtypes (reference.accumulation_dtype).
at::ScalarType accumulation_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// a and b as contiguous [B, T, d] tensors, detached (the kernels call ATen ops on slices and
// must not build autograd graphs), after the checks of reference._as_batched_rows.
struct BatchedRows {
  at::Tensor a, b;
  int64_t B, T, d_in, d_out;
};

BatchedRows as_batched_rows(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(
      (a.dim() == 2 || a.dim() == 3) && b.dim() == a.dim(),
      op, ": a and b must both be [B, T, d] or both [B, d]; got a ", a.sizes(), " and b ",
      b.sizes());
  TORCH_CHECK(
      a.size(0) == b.size(0) && (a.dim() == 2 || a.size(1) == b.size(1)),
      op, ": a and b must agree in B (and T); got a ", a.sizes(), " and b ", b.sizes());
  TORCH_CHECK(
      a.scalar_type() == b.scalar_type() && is_supported_dtype(a.scalar_type()),
      op, ": a and b must share one dtype among float16, bfloat16, float32, float64; got ",
      a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(
      a.device() == b.device(),
      op, ": a and b are on different devices (", a.device(), ", ", b.device(), ")");
  BatchedRows r;
  r.a = (a.dim() == 2 ? a.unsqueeze(1) : a).detach().contiguous();
  r.b = (b.dim() == 2 ? b.unsqueeze(1) : b).detach().contiguous();
  r.B = r.a.size(0);
  r.T = r.a.size(1);
  r.d_in = r.a.size(2);
  r.d_out = r.b.size(2);
  return r;
}

// Runs body(begin, end) over examples [0, B): in parallel chunks when there are at least as
// many examples as threads, otherwise serially so that each GEMM inside gets all threads.
// Worker threads inherit the caller's thread-local state (grad mode, inference mode, dispatch
// key exclusions), so ATen calls inside behave as they would on the calling thread.
template <typename Body>
void for_each_example_chunk(int64_t B, const Body& body) {
  if (B >= at::get_num_threads() && at::get_num_threads() > 1) {
    const at::ThreadLocalState caller_state;
    at::parallel_for(0, B, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
      at::ThreadLocalStateGuard guard(caller_state);
      body(begin, end);
    });
  } else {
    body(0, B);
  }
}

// Examples [i, i + n) of x3 ([B, T, d]) in the accumulation dtype: a view for float32/float64
// inputs, an upcast copy into `buffer` ([group >= n, T, d], allocated once per thread chunk) for
// 16-bit inputs.
at::Tensor example_group(const at::Tensor& x3, int64_t i, int64_t n, at::Tensor& buffer) {
  at::Tensor xg = x3.narrow(0, i, n);
  if (!buffer.defined()) {
    return xg;
  }
  return buffer.narrow(0, 0, n).copy_(xg);
}

// Per-thread upcast buffer for `group` examples: undefined (no copy needed) when x is already
// in acc.
at::Tensor upcast_buffer(const at::Tensor& x3, at::ScalarType acc, int64_t group) {
  if (x3.scalar_type() == acc) {
    return at::Tensor();
  }
  return at::empty({group, x3.size(1), x3.size(2)}, x3.options().dtype(acc));
}

enum class Route { RowNorms, Ghost, Direct };

Route choose_route(const std::string& mode, int64_t T, int64_t d_in, int64_t d_out) {
  if (mode == "direct") {
    return Route::Direct;
  }
  if (T == 1) {
    return Route::RowNorms;  // Gram matrices are 1 x 1; "ghost" and "auto" agree.
  }
  if (mode == "ghost") {
    return Route::Ghost;
  }
  // auto: ghost costs O(T^2 (d_in + d_out)) per example, direct O(T d_in d_out).
  return 2 * T * T <= d_in * d_out ? Route::Ghost : Route::Direct;
}

// n_i^2 = ||a_i||^2 ||b_i||^2 for T == 1, straight from the input rows (any supported dtype).
void sqnorm_row_norms(const BatchedRows& r, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, r.a.scalar_type(), "per_example_sqnorm_rows", [&] {
        using acc_t = at::opmath_type<scalar_t>;  // float for 16/32-bit, double for double
        const scalar_t* a_ptr = r.a.const_data_ptr<scalar_t>();
        const scalar_t* b_ptr = r.b.const_data_ptr<scalar_t>();
        acc_t* out_ptr = out.mutable_data_ptr<acc_t>();
        const int64_t d_in = r.d_in, d_out = r.d_out;
        // ~32K elements per task (at::internal::GRAIN_SIZE) amortizes the thread start-up.
        const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (d_in + d_out));
        at::parallel_for(0, r.B, grain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const scalar_t* ai = a_ptr + i * d_in;
            const scalar_t* bi = b_ptr + i * d_out;
            const double na = blocked_dot<scalar_t>(ai, ai, d_in);
            const double nb = blocked_dot<scalar_t>(bi, bi, d_out);
            out_ptr[i] = static_cast<acc_t>(na * nb);
          }
        });
      });
}

// Ghost route. The Gram matrices are symmetric, so only the tiles (t0 <= s0) of the upper
// triangle are computed; off-diagonal tiles count twice. Each pair of tiles (a and b) is
// reduced to one number as soon as it is written.
void sqnorm_ghost(const BatchedRows& r, at::ScalarType acc, at::Tensor& out) {
  const int64_t T = r.T;
  const int64_t tile = std::min(T, kGramTile);
  AT_DISPATCH_FLOATING_TYPES(acc, "per_example_sqnorm_ghost", [&] {
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    for_each_example_chunk(r.B, [&](int64_t begin, int64_t end) {
      at::Tensor a_buf = upcast_buffer(r.a, acc, 1);
      at::Tensor b_buf = upcast_buffer(r.b, acc, 1);
      at::Tensor gram_a = at::empty({tile * tile}, r.a.options().dtype(acc));
      at::Tensor gram_b = at::empty({tile * tile}, r.a.options().dtype(acc));
      for (int64_t i = begin; i < end; ++i) {
        const at::Tensor ai = example_group(r.a, i, 1, a_buf).select(0, 0);
        const at::Tensor bi = example_group(r.b, i, 1, b_buf).select(0, 0);
        double total = 0.0;
        for (int64_t t0 = 0; t0 < T; t0 += tile) {
          const int64_t nt = std::min(tile, T - t0);
          const at::Tensor a_t = ai.narrow(0, t0, nt);
          const at::Tensor b_t = bi.narrow(0, t0, nt);
          for (int64_t s0 = t0; s0 < T; s0 += tile) {
            const int64_t ns = std::min(tile, T - s0);
            at::Tensor ga = gram_a.narrow(0, 0, nt * ns).view({nt, ns});
            at::Tensor gb = gram_b.narrow(0, 0, nt * ns).view({nt, ns});
            at::mm_out(ga, a_t, ai.narrow(0, s0, ns).t());
            at::mm_out(gb, b_t, bi.narrow(0, s0, ns).t());
            const double d = blocked_dot<scalar_t>(
                ga.const_data_ptr<scalar_t>(), gb.const_data_ptr<scalar_t>(), nt * ns);
            total += (s0 == t0) ? d : 2.0 * d;
          }
        }
        out_ptr[i] = static_cast<scalar_t>(total);
      }
    });
  });
}

// Direct route: g_i = b_i^T a_i, reduced to its sum of squares right after its GEMM.
//   Small layers (d_in d_out <= kGroupElements / 2): `group` examples per batched GEMM into one
//     L2-sized buffer, which saves the per-example call overhead (~3 us: measured 7% of the time
//     of a conv layer 27 -> 64 with T = 1024, where g_i has 1728 entries).
//   Huge layers (d_in d_out > kDirectTileElements): one example at a time, in row tiles of
//     d_out of at most kDirectTileElements entries.
//   Otherwise: one example, one GEMM.
void sqnorm_direct(const BatchedRows& r, at::ScalarType acc, at::Tensor& out) {
  const int64_t d_in = r.d_in, d_out = r.d_out;
  const int64_t rows = std::min(d_out, std::max<int64_t>(1, kDirectTileElements / d_in));
  const int64_t group = rows == d_out ? std::max<int64_t>(1, kGroupElements / (d_in * d_out)) : 1;
  AT_DISPATCH_FLOATING_TYPES(acc, "per_example_sqnorm_direct", [&] {
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    for_each_example_chunk(r.B, [&](int64_t begin, int64_t end) {
      const int64_t chunk_group = std::min(group, end - begin);
      at::Tensor a_buf = upcast_buffer(r.a, acc, chunk_group);
      at::Tensor b_buf = upcast_buffer(r.b, acc, chunk_group);
      // chunk_group whole g_i, or (chunk_group == 1) one tile of rows x d_in
      at::Tensor g_buf = at::empty({chunk_group * rows * d_in}, r.a.options().dtype(acc));
      for (int64_t i = begin; i < end; i += chunk_group) {
        const int64_t n = std::min(chunk_group, end - i);
        const at::Tensor a_g = example_group(r.a, i, n, a_buf);  // [n, T, d_in]
        const at::Tensor b_g = example_group(r.b, i, n, b_buf);  // [n, T, d_out]
        if (rows == d_out) {  // whole g_i of n examples at once
          at::Tensor g = g_buf.narrow(0, 0, n * d_out * d_in).view({n, d_out, d_in});
          at::bmm_out(g, b_g.transpose(1, 2), a_g);
          const scalar_t* gp = g.const_data_ptr<scalar_t>();
          for (int64_t k = 0; k < n; ++k) {
            const scalar_t* gk = gp + k * d_out * d_in;
            out_ptr[i + k] = static_cast<scalar_t>(blocked_dot<scalar_t>(gk, gk, d_out * d_in));
          }
          continue;
        }
        const at::Tensor ai = a_g.select(0, 0);  // n == 1 here
        const at::Tensor bi = b_g.select(0, 0);
        double total = 0.0;
        for (int64_t o0 = 0; o0 < d_out; o0 += rows) {
          const int64_t no = std::min(rows, d_out - o0);
          at::Tensor g = g_buf.narrow(0, 0, no * d_in).view({no, d_in});
          at::mm_out(g, bi.narrow(1, o0, no).t(), ai);
          const scalar_t* gp = g.const_data_ptr<scalar_t>();
          total += blocked_dot<scalar_t>(gp, gp, no * d_in);
        }
        out_ptr[i] = static_cast<scalar_t>(total);
      }
    });
  });
}

at::Tensor per_example_sqnorm_cpu(const at::Tensor& a, const at::Tensor& b, c10::string_view mode_view) {
  const std::string mode(mode_view.data(), mode_view.size());
  TORCH_CHECK(
      mode == "auto" || mode == "ghost" || mode == "direct",
      "per_example_sqnorm: mode must be one of ('auto', 'ghost', 'direct'), got '", mode, "'");
  const BatchedRows r = as_batched_rows(a, b, "per_example_sqnorm");
  const at::ScalarType acc = accumulation_dtype(r.a.scalar_type());
  if (r.T == 0 || r.d_in == 0 || r.d_out == 0) {
    return at::zeros({r.B}, r.a.options().dtype(acc));  // empty sums (also covers B == 0)
  }
  at::Tensor out = at::empty({r.B}, r.a.options().dtype(acc));
  if (r.B == 0) {
    return out;
  }
  switch (choose_route(mode, r.T, r.d_in, r.d_out)) {
    case Route::RowNorms:
      sqnorm_row_norms(r, out);
      break;
    case Route::Ghost:
      sqnorm_ghost(r, acc, out);
      break;
    case Route::Direct:
      sqnorm_direct(r, acc, out);
      break;
  }
  return out;
}

// sum_i w_i b_i^T a_i as (w * b)^T a over the B*T rows: one GEMM. The weight is folded into the
// narrower of the two operands (b when d_out <= d_in, else a; the result is the same), which
// makes the extra elementwise pass as small as possible; BLAS cannot scale rows on load.
// 16-bit inputs: the GEMM runs in float32 on upcast chunks of at most kDirectTileElements
// elements per operand (the weight folded into the upcast copy in place, no extra pass), and
// the float32 sum is rounded once to the output dtype.
at::Tensor weighted_outer_sum_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& w) {
  const BatchedRows r = as_batched_rows(a, b, "weighted_outer_sum");
  TORCH_CHECK(
      w.dim() == 1 && w.size(0) == r.B,
      "weighted_outer_sum: w must be [B] = [", r.B, "], got ", w.sizes(), " (a ", a.sizes(),
      ", b ", b.sizes(), ")");
  TORCH_CHECK(
      w.device() == r.a.device(),
      "weighted_outer_sum: w is on ", w.device(), ", a and b on ", r.a.device());
  TORCH_CHECK(
      !w.is_complex(), "weighted_outer_sum: w must be real, got ", w.scalar_type());
  const int64_t B = r.B, T = r.T, d_in = r.d_in, d_out = r.d_out;
  const at::ScalarType dtype = r.a.scalar_type();
  const at::ScalarType acc = accumulation_dtype(dtype);
  const bool weight_b = d_out <= d_in;
  const at::Tensor w_acc = w.detach().to(acc);

  // Weighted [n*T, d] rows of examples [s, s + n) of a and b, in acc.
  auto rows_of = [&](int64_t s, int64_t n) {
    at::Tensor a_c = r.a.narrow(0, s, n).to(acc);  // no copy when already acc
    at::Tensor b_c = r.b.narrow(0, s, n).to(acc);
    const at::Tensor w_c = w_acc.narrow(0, s, n).view({n, 1, 1});
    const bool upcast = dtype != acc;  // the copies are ours: scale them in place
    if (weight_b) {
      b_c = upcast ? b_c.mul_(w_c) : b_c * w_c;
    } else {
      a_c = upcast ? a_c.mul_(w_c) : a_c * w_c;
    }
    return std::make_pair(a_c.reshape({n * T, d_in}), b_c.reshape({n * T, d_out}));
  };

  if (dtype == acc) {
    if (B * T == 0) {
      return at::zeros({d_out, d_in}, r.a.options());
    }
    const auto [a_rows, b_rows] = rows_of(0, B);
    return at::mm(b_rows.t(), a_rows);
  }
  at::Tensor sum = at::zeros({d_out, d_in}, r.a.options().dtype(acc));
  const int64_t per_example = std::max<int64_t>(1, T * std::max(d_in, d_out));
  const int64_t chunk = std::max<int64_t>(1, kDirectTileElements / per_example);
  for (int64_t s = 0; s < B && T > 0; s += chunk) {
    const int64_t n = std::min(chunk, B - s);
    const auto [a_rows, b_rows] = rows_of(s, n);
    sum.addmm_(b_rows.t(), a_rows);
  }
  return sum.to(dtype);
}

}  // namespace
}  // namespace engm_fast

TORCH_LIBRARY_IMPL(engm_fast, CPU, m) {
  m.impl("per_example_sqnorm", &engm_fast::per_example_sqnorm_cpu);
  m.impl("weighted_outer_sum", &engm_fast::weighted_outer_sum_cpu);
}
