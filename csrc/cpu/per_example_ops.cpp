// CPU implementations of the engm_fast ops (schemas in csrc/ops.cpp).
//
// What they compute, and the deviation allowed, is the contract of engm_fast/reference.py; the
// op wrappers of engm_fast/ops decide the route and the accumulation dtype and pass them in.
// Only the way the work is scheduled is this file's:
//
//   per_example_sqnorm(a, b, mode, acc_dtype)  ->  n_i^2 = ||b_i^T a_i||_F^2, [B] in acc_dtype
//     ghost, T == 1  n_i^2 = ||a_i||^2 ||b_i||^2 straight from the input rows.
//     ghost          n_i^2 = sum_{t,s} (a_it . a_is)(b_it . b_is), computed per example from tiles
//                    of the two Gram matrices, reduced tile by tile: never a B x T x T tensor,
//                    not even one T x T matrix when T > kGramTile.
//     direct         g_i = b_i^T a_i computed per example in a per-thread tile of at most
//                    kDirectTileElements elements and reduced at once: memory is independent of
//                    B (and bounded for huge layers).
//   weighted_outer_sum(a, b, w)  ->  sum_i w_i b_i^T a_i = (w * b)^T a, one GEMM in w's dtype
//     (the accumulation dtype), the products w_r b_r rounded to the inputs' dtype.
//
// Precision: inputs are converted to the accumulation dtype (16-bit inputs one example, or one
// bounded chunk, at a time). Sums of squares and the Gram dot products use 16 lanes of the
// accumulation dtype over blocks of 1024 elements and add the block sums in double: each float32
// partial sum has at most 64 terms (worst-case relative error ~64 * 6e-8 = 4e-6) however long
// the sum is, e.g. the 4M entries of a 2048 x 2048 g_i.
//
// Threading: examples are independent, so the GEMM routes parallelize over examples with
// at::parallel_for (one chunk of examples per thread, buffers allocated once per chunk) and
// call single-threaded GEMMs inside (ATen/MKL do not nest threads inside a parallel region).
// With fewer examples than threads, examples run one after another and each GEMM uses all
// threads instead.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include "op_checks.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace engm_fast {
namespace {

// Bound on the per-thread tile of g_i in the direct route, and on the per-chunk copies that
// weighted_outer_sum converts to the accumulation dtype: 2^22 elements = 16 MiB in float32 (the
// same bound as reference._DIRECT_CHUNK_ELEMENTS).
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

// sum_j x_j * y_j in double, from block sums in acc_t (float or double). Inputs of another type
// are converted to acc_t one block at a time on the stack.
template <typename acc_t, typename scalar_t>
double blocked_dot(const scalar_t* x, const scalar_t* y, int64_t n) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      total += static_cast<double>(dot_block(x + start, y + start, len));
    } else {
      acc_t xf[kBlock];
      acc_t yf[kBlock];
      for (int64_t j = 0; j < len; ++j) {
        xf[j] = static_cast<acc_t>(x[start + j]);
      }
      const acc_t* yp = xf;
      if (y != x) {  // squares (row norms) convert once
        for (int64_t j = 0; j < len; ++j) {
          yf[j] = static_cast<acc_t>(y[start + j]);
        }
        yp = yf;
      }
      total += static_cast<double>(dot_block(xf, yp, len));
    }
  }
  return total;
}

// a and b as contiguous [B, T, d] tensors (the GEMMs below run on slices of them).
BatchedRows contiguous_rows(const at::Tensor& a, const at::Tensor& b, const char* op) {
  BatchedRows r = batched_rows(a, b, op);
  r.a = r.a.contiguous();
  r.b = r.b.contiguous();
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

// n_i^2 = ||a_i||^2 ||b_i||^2 for T == 1, straight from the input rows (any supported dtype).
void sqnorm_row_norms(const BatchedRows& r, at::ScalarType acc, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, r.a.scalar_type(), "per_example_sqnorm_rows", [&] {
        using input_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES(acc, "per_example_sqnorm_rows_acc", [&] {
          using acc_t = scalar_t;
          const input_t* a_ptr = r.a.const_data_ptr<input_t>();
          const input_t* b_ptr = r.b.const_data_ptr<input_t>();
          acc_t* out_ptr = out.mutable_data_ptr<acc_t>();
          const int64_t d_in = r.d_in, d_out = r.d_out;
          // ~32K elements per task (at::internal::GRAIN_SIZE) amortizes the thread start-up.
          const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (d_in + d_out));
          at::parallel_for(0, r.B, grain, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              const input_t* ai = a_ptr + i * d_in;
              const input_t* bi = b_ptr + i * d_out;
              const double na = blocked_dot<acc_t>(ai, ai, d_in);
              const double nb = blocked_dot<acc_t>(bi, bi, d_out);
              out_ptr[i] = static_cast<acc_t>(na * nb);
            }
          });
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

at::Tensor per_example_sqnorm_cpu(
    const at::Tensor& a, const at::Tensor& b, c10::string_view mode, at::ScalarType acc) {
  const bool ghost = is_ghost_mode(mode);
  check_accumulation_dtype(acc, "per_example_sqnorm", "acc_dtype");
  const BatchedRows r = contiguous_rows(a, b, "per_example_sqnorm");
  if (r.T == 0 || r.d_in == 0 || r.d_out == 0) {
    return at::zeros({r.B}, r.a.options().dtype(acc));  // empty sums (also covers B == 0)
  }
  at::Tensor out = at::empty({r.B}, r.a.options().dtype(acc));
  if (r.B == 0) {
    return out;
  }
  if (ghost && r.T == 1) {
    sqnorm_row_norms(r, acc, out);  // 1 x 1 Gram matrices
  } else if (ghost) {
    sqnorm_ghost(r, acc, out);
  } else {
    sqnorm_direct(r, acc, out);
  }
  return out;
}

// sum_i w_i b_i^T a_i as (w * b)^T a over the B*T rows: one GEMM in the accumulation dtype, w's.
// The GEMM operand is round_D(w_r b_r) (engm_fast/reference.py): for inputs narrower than the
// accumulation dtype the weight goes into b and the product is rounded to the inputs' dtype D.
// Otherwise that rounding is the accumulation dtype's own, and the weight goes into the narrower
// of the two operands (b when d_out <= d_in, else a: the same bound), which makes the extra
// elementwise pass as small as possible; BLAS cannot scale rows on load.
// Inputs narrower than the accumulation dtype: the GEMM runs on converted chunks of at most
// kDirectTileElements elements per operand (the weight folded into the converted copy in place,
// no extra pass), and the sum is rounded once to D.
at::Tensor weighted_outer_sum_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& w) {
  const BatchedRows r = contiguous_rows(a, b, "weighted_outer_sum");
  check_weights(w, r, a, b);
  const int64_t B = r.B, T = r.T, d_in = r.d_in, d_out = r.d_out;
  const at::ScalarType dtype = r.a.scalar_type();
  const at::ScalarType acc = w.scalar_type();
  const bool round_products = dtype != acc;
  const bool weight_b = round_products || d_out <= d_in;
  const at::Tensor w_acc = w.detach();

  // Weighted [n*T, d] rows of examples [s, s + n) of a and b, in acc.
  auto rows_of = [&](int64_t s, int64_t n) {
    at::Tensor a_c = r.a.narrow(0, s, n).to(acc);  // no copy when already acc
    at::Tensor b_c = r.b.narrow(0, s, n).to(acc);
    const at::Tensor w_c = w_acc.narrow(0, s, n).view({n, 1, 1});
    const bool converted = dtype != acc;  // the copies are ours: scale them in place
    if (weight_b) {
      b_c = converted ? b_c.mul_(w_c) : b_c * w_c;
      if (round_products) {
        b_c.copy_(b_c.to(dtype));  // round_D(w_r b_r)
      }
    } else {
      a_c = converted ? a_c.mul_(w_c) : a_c * w_c;
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
