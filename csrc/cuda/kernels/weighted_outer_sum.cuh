// weighted_outer_sum on CUDA: out = sum_i w_i b_i^T a_i = sum_k w[k / T] b[k, :]^T a[k, :]
// over the R = B*T rows, [d_out, d_in] in the input dtype. Semantics: engm_fast/reference.py.
//
// One GEMM (outer_gemm.cuh, kWeighted) with the reduction over rows split across CTAs
// ("split-K") so that a short-and-wide problem such as R = 131072 rows into a 64 x 576 output
// (5 output tiles) still fills the GPU. The weight of each row is applied to the b tile in
// shared memory as it lands (the product rounded once to T, engm_fast/reference.py), so no
// scaled copy of b is ever written.
//
// Split choice (plan_weighted_outer_sum): as many splits as fill one wave of resident CTAs
// (occupancy x SMs) given the output tiles, at least 8 k-tiles (256 rows for 16-bit) per split
// so that the pipeline prologue and the epilogue stay small next to the main loop. Each split
// writes its fp32 (fp64) partial tile to a workspace and a final kernel adds the splits in a
// fixed order and rounds once to T: deterministic, no atomics. With one split the GEMM
// epilogue rounds and writes `out` directly (no workspace).
//   e.g. H100 (132 SMs), bf16, R = 131072 rows, 64 x 576: 5 tiles of 64 x 128, 4 resident
//        CTAs/SM (128 threads, 128 registers, 53 KiB smem) -> 528 slots, 105 splits of 40
//        k-tiles = 1280 rows, i.e. 103 non-empty splits; workspace 103 * 64 * 576 * 4 B = 15 MB,
//        written and read once (mostly in H100's 50 MB L2) next to 168 MB of operands.
//   R = 32768, 768 x 768: 36 tiles of 128 x 128, 2 CTAs/SM -> 7 splits of 4704 rows, 252 CTAs
//        (one wave), workspace 16.5 MB.
#pragma once

#include "outer_gemm.cuh"

namespace engm_fast {
namespace cuda {

struct WeightedOuterSumPlan {
  int64_t splits = 1;
  int64_t k_per_split = 0;  // rows per split, a multiple of the tile's BK
  int64_t ws_elems = 0;     // acc_t<T> elements of workspace (0 when splits == 1)
};

// Calls f(Cfg{}) with the configuration used for d_out (the same as the direct route's).
template <typename T, typename F>
inline auto with_weighted_config(int64_t d_out, F&& f) {
  if (d_out <= 64) return f(typename OuterConfigFor<T, true>::type{});
  return f(typename OuterConfigFor<T, false>::type{});
}

// Splits for R rows into a d_out x d_in output on the current device.
template <typename T>
cudaError_t plan_weighted_outer_sum(int64_t R, int64_t d_in, int64_t d_out, WeightedOuterSumPlan* plan) {
  *plan = WeightedOuterSumPlan{};
  if (R <= 0 || d_in <= 0 || d_out <= 0) return cudaSuccess;
  return with_weighted_config<T>(d_out, [&](auto cfg) -> cudaError_t {
    using Cfg = decltype(cfg);
    int sms = 0;
    cudaError_t err = current_sm_count(&sms);
    if (err != cudaSuccess) return err;
    // Occupancy of the widest-copy instantiation (the others use the same resources but for
    // the copy loop's registers).
    auto kernel = outer_gemm_kernel<T, Cfg, static_cast<int>(16 / sizeof(T)), OuterMode::kWeighted>;
    constexpr int kSmem = OuterSmem<T, Cfg>::kBytes;
    err = allow_dynamic_smem(kernel, kSmem);
    if (err != cudaSuccess) return err;
    int per_sm = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Cfg::NT, kSmem);
    if (err != cudaSuccess) return err;
    const int64_t slots = static_cast<int64_t>(sms) * max64(1, per_sm);
    const int64_t tiles = ceil_div(d_out, Cfg::BM) * ceil_div(d_in, Cfg::BN);
    const int64_t k_tiles = ceil_div(R, Cfg::BK);
    // Floor, not ceiling: splits * tiles <= slots keeps the grid within one wave (a ceiling
    // would start a second, nearly empty wave: 1.09 waves for 36 tiles on 264 slots).
    int64_t splits = tiles >= slots ? 1 : slots / tiles;
    splits = min64(splits, max64(1, k_tiles / 8));
    const int64_t k_per_split = ceil_div(k_tiles, splits) * Cfg::BK;
    plan->splits = ceil_div(R, k_per_split);  // no empty split
    plan->k_per_split = k_per_split;
    plan->ws_elems = plan->splits > 1 ? plan->splits * d_out * d_in : 0;
    return cudaSuccess;
  });
}

constexpr int kSumSplitsThreads = 256;

// out[e] = T(sum_s ws[s, e]) for e < n, the splits added in order.
template <typename T>
__global__ void __launch_bounds__(kSumSplitsThreads)
    sum_splits_kernel(const acc_t<T>* __restrict__ ws, int64_t splits, int64_t n, T* __restrict__ out) {
  using A = acc_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kSumSplitsThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kSumSplitsThreads + threadIdx.x; e < n; e += stride) {
    A s = A(0);
    for (int64_t k = 0; k < splits; ++k) s += ws[k * n + e];
    out[e] = from_acc<T>(s);
  }
}

// Writes out ([d_out, d_in], row-major, contiguous) = sum_k w[k / rows_per_w] b[k]^T a[k]
// over k < R. a: R rows of d_in (row stride a_row_stride, contiguous features), b likewise;
// w: acc_t<T> weights (as given, not rounded to T); ws: plan.ws_elems elements.
// R == 0 writes zeros. Asynchronous on `stream`.
template <typename T>
cudaError_t launch_weighted_outer_sum(const WeightedOuterSumPlan& plan, const T* a, int64_t a_row_stride, const T* b,
                                      int64_t b_row_stride, const acc_t<T>* w, int64_t rows_per_w, int64_t R,
                                      int64_t d_in, int64_t d_out, acc_t<T>* ws, T* out, cudaStream_t stream) {
  if (d_in <= 0 || d_out <= 0) return cudaSuccess;
  if (R <= 0) {
    return cudaMemsetAsync(out, 0, static_cast<size_t>(d_in * d_out) * sizeof(T), stream);  // zero bits = +0
  }
  if (plan.splits < 1 || plan.k_per_split <= 0 || (plan.splits > 1 && ws == nullptr)) return cudaErrorInvalidValue;
  const void* ptrs[2] = {a, b};
  const int64_t strides[2] = {a_row_stride, b_row_stride};
  const int vec = pick_vec<T>(ptrs, 2, strides, 2);
  cudaError_t err = with_weighted_config<T>(d_out, [&](auto cfg) -> cudaError_t {
    using Cfg = decltype(cfg);
    OuterGemmArgs<T> args{};
    args.a = Rows3<T>{a, 0, a_row_stride};
    args.b = Rows3<T>{b, 0, b_row_stride};
    args.k_rows = R;
    args.d_in = d_in;
    args.d_out = d_out;
    args.tiles_n = ceil_div(d_in, Cfg::BN);
    args.tiles_m = ceil_div(d_out, Cfg::BM);
    args.w = w;
    args.rows_per_w = rows_per_w;
    args.k_per_split = plan.k_per_split;
    args.ws = plan.splits > 1 ? ws : nullptr;
    args.out = plan.splits > 1 ? nullptr : out;
    const int64_t tiles = args.tiles_n * args.tiles_m;
    if (plan.splits > kMaxGridX / tiles) return cudaErrorInvalidConfiguration;
    return launch_outer_gemm<T, Cfg, OuterMode::kWeighted>(args, vec, tiles * plan.splits, stream);
  });
  if (err != cudaSuccess || plan.splits == 1) return err;
  const int64_t n = d_out * d_in;
  // Grid-stride: at most 64K blocks of 256 threads; each thread reads `splits` values.
  const int64_t blocks = min64(ceil_div(n, kSumSplitsThreads), 65535);
  ENGM_FAST_LAUNCH(sum_splits_kernel<T>, static_cast<unsigned>(blocks), kSumSplitsThreads, 0, stream,
                   static_cast<const acc_t<T>*>(ws), plan.splits, n, out);
  return cudaGetLastError();
}

// Instantiated for the four element types once, in weighted_outer_sum.cu (see
// per_example_sqnorm.cuh for why).
#define ENGM_FAST_WEIGHTED_PLAN(T) \
  template cudaError_t plan_weighted_outer_sum<T>(int64_t, int64_t, int64_t, WeightedOuterSumPlan*);
#define ENGM_FAST_WEIGHTED_LAUNCHER(T)                                                                          \
  template cudaError_t launch_weighted_outer_sum<T>(const WeightedOuterSumPlan&, const T*, int64_t, const T*, \
                                                    int64_t, const acc_t<T>*, int64_t, int64_t, int64_t,       \
                                                    int64_t, acc_t<T>*, T*, cudaStream_t);
#ifndef ENGM_FAST_WEIGHTED_DEFINE_INSTANCES
extern ENGM_FAST_WEIGHTED_PLAN(__half)
extern ENGM_FAST_WEIGHTED_PLAN(__nv_bfloat16)
extern ENGM_FAST_WEIGHTED_PLAN(float)
extern ENGM_FAST_WEIGHTED_PLAN(double)
extern ENGM_FAST_WEIGHTED_LAUNCHER(__half)
extern ENGM_FAST_WEIGHTED_LAUNCHER(__nv_bfloat16)
extern ENGM_FAST_WEIGHTED_LAUNCHER(float)
extern ENGM_FAST_WEIGHTED_LAUNCHER(double)
#endif

}  // namespace cuda
}  // namespace engm_fast
