// per_example_sqnorm on CUDA: n_i^2 = ||b_i^T a_i||_F^2 for every example i, never writing a
// per-example gradient to global memory. Semantics: engm_fast/reference.py.
//
// Routes (the op wrappers of engm_fast/ops choose "ghost" or "direct"; the binding runs ghost
// at T == 1 as kRowNorms):
//   kRowNorms (T == 1)  n_i^2 = ||a_i||^2 ||b_i||^2: one warp per example.
//   kGhost              n_i^2 = sum_{t,s} (a_it . a_is)(b_it . b_is). One CTA per example and
//                       pair of BT-row blocks (t-block <= s-block: the Gram matrices are
//                       symmetric, off-diagonal pairs count twice) computes the Ga tile over
//                       d_in and then the Gb tile over d_out in one continuous cp.async
//                       pipeline, keeps both in registers and reduces sum(Ga .* Gb): the Gram
//                       matrices never reach global memory.
//   kDirect             g_i tile by tile (outer_gemm.cuh, kSqNorm): each CTA reduces its
//                       BM x BN tile of g_i to a sum of squares.
// Ghost and direct CTAs write one partial sum each to a workspace; a second small kernel adds
// an example's partials in a fixed order (double accumulation), so results are deterministic
// (no atomics) and "auto" equals the route it resolves to bit for bit.
//
// Accumulation: fp32 (fp16 / bf16 via tensor cores with fp32 accumulators, float on FMA
// units), fp64 for double: the accumulation dtype the caller passes (see common.cuh, AccType).
//
// Parallelism: the direct route cannot split the sum over T across CTAs (squares of partial
// sums are not partial sums of squares), so it has B * tiles CTAs; very small B with a small
// layer leaves SMs idle (e.g. B = 1, 64 x 576: 5 CTAs). The ghost route likewise has
// B * nb(nb+1)/2 CTAs for nb = ceil(T / BT) row blocks.
#pragma once

#include "outer_gemm.cuh"

namespace engm_fast {
namespace cuda {

enum class SqnormRoute : int { kRowNorms = 0, kGhost = 1, kDirect = 2 };

// ------------------------------------------------------------------------- ghost route

// 16-bit: BT x BT Gram tiles, 4 warps in 2 x 2, each warp (BT/2)^2 of Ga and of Gb.
// BT = 32 for T <= 32 (T = 16 wastes 3/4 of a 32 x 32 tile's MMAs, but the route is then bound
// by reading a and b), else 64. The k tiles are wide so that each stage moves enough bytes to
// keep HBM busy with few CTAs: at B = 256, T = 16, d = 1024 there is one (diagonal) block pair
// per example, 256 CTAs, and a stage of 16 valid rows x 128 features x 2 bytes = 4 KiB (3 in
// flight per CTA, 2-3 CTAs per SM: ~24-36 KiB per SM, about bandwidth x latency); 32-wide
// tiles would move 1 KiB per stage and pay 4x the barriers.
//   BT = 32: BK = 128, 4 stages, 68 KiB smem.  BT = 64: BK = 64, 4 stages, 72 KiB smem.
template <int BT_, int BK_>
struct TcGhostConfig {
  static constexpr bool kTensorCores = true;
  static constexpr int BT = BT_, BK = BK_, STAGES = 4, NT = 128;
  static constexpr int WT = BT / 2, F = WT / 16;
  static constexpr int kMinBlocks = 3;  // at most 170 registers per thread; smem allows 3
};

// float / double: 256 threads in 16 x 16; thread (ty, tx) owns rows t = ty + 16 i and
// columns s = tx + 16 j (i, j < BT / 16) of Ga and of Gb. BK = 128 bytes of features per row
// and stage (32 floats, 16 doubles), 3 stages: 27 KiB (BT = 32) or 54 KiB (BT = 64) of smem.
template <int BT_, int BK_>
struct SimtGhostConfig {
  static constexpr bool kTensorCores = false;
  static constexpr int BT = BT_, BK = BK_, STAGES = 3, NT = 256;
  static constexpr int TM = BT / 16;
  static constexpr int kMinBlocks = 2;  // at most 128 registers per thread
};

template <typename T, int BT>
struct GhostConfigFor {
  using type = std::conditional_t<kIs16Bit<T>, TcGhostConfig<BT, BT == 32 ? 128 : 64>,
                                  SimtGhostConfig<BT, std::is_same_v<T, double> ? 16 : 32>>;
};

// Shared memory: S stages of two [BT][BK + pad] tiles (rows t0.., rows s0..), features
// contiguous. Row pitch BK + 16 bytes.
template <typename T, typename Cfg>
struct GhostSmem {
  static constexpr int P = Cfg::BK + static_cast<int>(16 / sizeof(T));
  static constexpr int kTile = Cfg::BT * P;
  static constexpr int kBytes = Cfg::STAGES * 2 * kTile * static_cast<int>(sizeof(T));
};

template <typename T>
struct GhostArgs {
  Rows3<T> a, b;
  int64_t T_rows, d_in, d_out;
  int64_t nb;      // ceil(T / BT) row blocks
  int64_t npairs;  // nb (nb + 1) / 2 blocks pairs (t-block <= s-block)
  acc_t<T>* partial;  // [B, npairs]
};

template <typename T, typename Cfg>
struct TcGhostMath {
  using Smem = GhostSmem<T, Cfg>;
  using FragAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major>;
  static_assert(kIs16Bit<T>, "tensor-core path is for fp16 / bf16");

  FragAcc ga[Cfg::F][Cfg::F];
  FragAcc gb[Cfg::F][Cfg::F];
  int wm, wn;

  __device__ __forceinline__ explicit TcGhostMath(int tid) {
    const int warp = tid / 32;
    wm = warp / 2;
    wn = warp % 2;
#pragma unroll
    for (int i = 0; i < Cfg::F; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::F; ++j) {
        nvcuda::wmma::fill_fragment(ga[i][j], 0.0f);
        nvcuda::wmma::fill_fragment(gb[i][j], 0.0f);
      }
  }

  // G[t, s] += sum_k X[t, k] X[s, k]: the left operand is the t rows ([t][k], row-major
  // M x K), the right one the s rows read as K x N column-major (element (k, s) at s*P + k).
  // Fragment pointers: row offsets multiples of 16 rows (16 * P * 2 bytes with P = BK + 8 a
  // multiple of 8: a multiple of 256 bytes) plus k offsets, multiples of 16 elements (32
  // bytes): 32-byte aligned as wmma requires.
  __device__ __forceinline__ void accumulate(FragAcc (&g)[Cfg::F][Cfg::F], const T* ts, const T* ss) {
#pragma unroll
    for (int kk = 0; kk < Cfg::BK; kk += 16) {
      FragB fb[Cfg::F];
#pragma unroll
      for (int j = 0; j < Cfg::F; ++j) {
        nvcuda::wmma::load_matrix_sync(fb[j], ss + (wn * Cfg::WT + j * 16) * Smem::P + kk, Smem::P);
      }
#pragma unroll
      for (int i = 0; i < Cfg::F; ++i) {
        FragA fa;
        nvcuda::wmma::load_matrix_sync(fa, ts + (wm * Cfg::WT + i * 16) * Smem::P + kk, Smem::P);
#pragma unroll
        for (int j = 0; j < Cfg::F; ++j) nvcuda::wmma::mma_sync(g[i][j], fa, fb[j], g[i][j]);
      }
    }
  }

  __device__ __forceinline__ void step(const T* ts, const T* ss, bool phase_a) {
    if (phase_a) {
      accumulate(ga, ts, ss);
    } else {
      accumulate(gb, ts, ss);
    }
  }

  // ga and gb have the same fragment type, hence the same element -> (t, s) map: element e
  // of both is the same Gram entry.
  __device__ __forceinline__ float cross() const {
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < Cfg::F; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::F; ++j)
#pragma unroll
        for (int e = 0; e < FragAcc::num_elements; ++e) s += ga[i][j].x[e] * gb[i][j].x[e];
    return s;
  }
};

template <typename T, typename Cfg>
struct SimtGhostMath {
  using Smem = GhostSmem<T, Cfg>;
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "SIMT path is for float / double");
  T ga[Cfg::TM][Cfg::TM];
  T gb[Cfg::TM][Cfg::TM];
  int ty, tx;

  __device__ __forceinline__ explicit SimtGhostMath(int tid) {
    ty = tid / 16;
    tx = tid % 16;
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::TM; ++j) {
        ga[i][j] = T(0);
        gb[i][j] = T(0);
      }
  }

  __device__ __forceinline__ void accumulate(T (&g)[Cfg::TM][Cfg::TM], const T* ts, const T* ss) {
#pragma unroll
    for (int k = 0; k < Cfg::BK; ++k) {
      T rt[Cfg::TM];
      T rs[Cfg::TM];
#pragma unroll
      for (int i = 0; i < Cfg::TM; ++i) {
        rt[i] = ts[(ty + 16 * i) * Smem::P + k];
        rs[i] = ss[(tx + 16 * i) * Smem::P + k];
      }
#pragma unroll
      for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::TM; ++j) g[i][j] = fma(rt[i], rs[j], g[i][j]);
    }
  }

  __device__ __forceinline__ void step(const T* ts, const T* ss, bool phase_a) {
    if (phase_a) {
      accumulate(ga, ts, ss);
    } else {
      accumulate(gb, ts, ss);
    }
  }

  __device__ __forceinline__ T cross() const {
    T s = T(0);
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::TM; ++j) s = fma(ga[i][j], gb[i][j], s);
    return s;
  }
};

template <typename T, typename Cfg>
using GhostMath = std::conditional_t<Cfg::kTensorCores, TcGhostMath<T, Cfg>, SimtGhostMath<T, Cfg>>;

// Grid: B * npairs CTAs, the block pairs of one example adjacent (they share its rows in L2).
template <typename T, typename Cfg, int VEC>
__global__ void __launch_bounds__(Cfg::NT, Cfg::kMinBlocks) ghost_sqnorm_kernel(const GhostArgs<T> args) {
#if ENGM_FAST_CUDA_UNSUPPORTED_ARCH
  __trap();
#else
  using A = acc_t<T>;
  using Smem = GhostSmem<T, Cfg>;
  constexpr int BT = Cfg::BT, BK = Cfg::BK, S = Cfg::STAGES, NT = Cfg::NT;

  ENGM_FAST_DYNAMIC_SMEM(smem);
  T* const tiles = reinterpret_cast<T*>(smem);  // stage s: t rows at 2s, s rows at 2s + 1

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t bid = static_cast<int64_t>(blockIdx.x);
  const int64_t z = bid / args.npairs;
  const int64_t p = bid % args.npairs;
  // p -> (ti, si), ti <= si, row-major over the upper triangle: row ti has nb - ti pairs.
  int64_t ti = 0;
  int64_t rem = p;
  while (rem >= args.nb - ti) {
    rem -= args.nb - ti;
    ++ti;
  }
  const int64_t si = ti + rem;
  const bool diag = ti == si;
  const int64_t t0 = ti * BT;
  const int64_t s0 = si * BT;
  const int rows_t = static_cast<int>(min64(BT, args.T_rows - t0));
  const int rows_s = static_cast<int>(min64(BT, args.T_rows - s0));
  const int64_t kt_a = ceil_div(args.d_in, BK);
  const int64_t num_k_tiles = kt_a + ceil_div(args.d_out, BK);

  // k tiles [0, kt_a) stream a's features, [kt_a, num_k_tiles) b's. On a diagonal pair the
  // s rows are the t rows: loaded once, read twice.
  auto load_stage = [&](int stage, int64_t kt) {
    // Fields picked by value: a reference to either kernel parameter would force a copy of
    // both into local memory.
    const bool phase_a = kt < kt_a;
    const T* const ptr = phase_a ? args.a.ptr : args.b.ptr;
    const int64_t batch_stride = phase_a ? args.a.batch_stride : args.b.batch_stride;
    const int64_t row_stride = phase_a ? args.a.row_stride : args.b.row_stride;
    const int64_t k0 = (phase_a ? kt : kt - kt_a) * BK;
    const int cols = static_cast<int>(min64(BK, (phase_a ? args.d_in : args.d_out) - k0));
    const T* base = ptr + z * batch_stride + k0;
    load_tile<T, BT, BK, Smem::P, NT, VEC>(tiles + (2 * stage) * Smem::kTile, base + t0 * row_stride, row_stride,
                                            rows_t, cols, ptr, tid);
    if (!diag) {
      load_tile<T, BT, BK, Smem::P, NT, VEC>(tiles + (2 * stage + 1) * Smem::kTile, base + s0 * row_stride,
                                              row_stride, rows_s, cols, ptr, tid);
    }
  };

  GhostMath<T, Cfg> math(tid);

#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < num_k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < num_k_tiles; ++kt) {
    cp_async_wait<S - 2>();
    __syncthreads();
    const int stage = static_cast<int>(kt % S);
    const int64_t next = kt + S - 1;
    if (next < num_k_tiles) load_stage(static_cast<int>(next % S), next);
    cp_async_commit();
    const T* ts = tiles + (2 * stage) * Smem::kTile;
    const T* ss = diag ? ts : ts + Smem::kTile;
    math.step(ts, ss, kt < kt_a);
  }

  A v = static_cast<A>(math.cross());
  if (!diag) v *= A(2);
  v = block_sum<NT>(v);
  if (tid == 0) args.partial[z * args.npairs + p] = v;
#endif
}

// ------------------------------------------------------------------------- row norms, reduction

constexpr int kWarpPerRowThreads = 256;

// T == 1: one warp per example, out[i] = (sum_j a_ij^2) (sum_j b_ij^2).
template <typename T>
__global__ void __launch_bounds__(kWarpPerRowThreads)
    rownorm_sqnorm_kernel(const Rows3<T> a, const Rows3<T> b, int64_t B, int64_t d_in, int64_t d_out,
                          acc_t<T>* out) {
  using A = acc_t<T>;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (kWarpPerRowThreads / 32) + threadIdx.x / 32;
  if (i >= B) return;  // the whole warp leaves together: i is uniform across it
  const T* ai = a.ptr + i * a.batch_stride;
  const T* bi = b.ptr + i * b.batch_stride;
  A sa = A(0), sb = A(0);
  for (int64_t j = lane; j < d_in; j += 32) {
    const A x = to_acc(ai[j]);
    sa = fma(x, x, sa);
  }
  for (int64_t j = lane; j < d_out; j += 32) {
    const A x = to_acc(bi[j]);
    sb = fma(x, x, sb);
  }
  sa = warp_sum(sa);
  sb = warp_sum(sb);
  if (lane == 0) out[i] = sa * sb;
}

// out[i] = sum_j partial[i, j] over j < per, in double, in a fixed order.
template <typename A>
__global__ void __launch_bounds__(kWarpPerRowThreads)
    sum_partials_kernel(const A* __restrict__ partial, int64_t per, int64_t B, A* __restrict__ out) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (kWarpPerRowThreads / 32) + threadIdx.x / 32;
  if (i >= B) return;
  double s = 0.0;
  for (int64_t j = lane; j < per; j += 32) s += static_cast<double>(partial[i * per + j]);
  s = warp_sum(s);
  if (lane == 0) out[i] = static_cast<A>(s);
}

// ------------------------------------------------------------------------- host side

inline int ghost_block_rows(int64_t rows) { return rows <= 32 ? 32 : 64; }

// Calls f(Cfg{}) with the outer-GEMM configuration the direct route uses for d_out.
template <typename T, typename F>
inline auto with_direct_config(int64_t d_out, F&& f) {
  if (d_out <= 64) return f(typename OuterConfigFor<T, true>::type{});
  return f(typename OuterConfigFor<T, false>::type{});
}

// Elements of acc_t<T> the launcher needs as workspace (0 for row norms). B, rows (= T), d_in,
// d_out are the problem sizes (after [B, d] inputs are viewed as [B, 1, d]).
template <typename T>
int64_t per_example_sqnorm_workspace(SqnormRoute route, int64_t B, int64_t rows, int64_t d_in, int64_t d_out) {
  if (B <= 0 || rows <= 0 || d_in <= 0 || d_out <= 0) return 0;
  switch (route) {
    case SqnormRoute::kRowNorms:
      return 0;
    case SqnormRoute::kGhost: {
      const int64_t nb = ceil_div(rows, ghost_block_rows(rows));
      return B * (nb * (nb + 1) / 2);
    }
    case SqnormRoute::kDirect:
      return with_direct_config<T>(d_out, [&](auto cfg) {
        using Cfg = decltype(cfg);
        return B * ceil_div(d_out, Cfg::BM) * ceil_div(d_in, Cfg::BN);
      });
  }
  return 0;
}

template <typename T, int BT>
inline cudaError_t launch_ghost(const GhostArgs<T>& args, int vec, int64_t blocks, cudaStream_t stream) {
  using Cfg = typename GhostConfigFor<T, BT>::type;
  return dispatch_vec<T>(vec, [&](auto v) -> cudaError_t {
    auto kernel = ghost_sqnorm_kernel<T, Cfg, decltype(v)::value>;
    constexpr int kSmem = GhostSmem<T, Cfg>::kBytes;
    cudaError_t err = allow_dynamic_smem(kernel, kSmem);
    if (err != cudaSuccess) return err;
    ENGM_FAST_LAUNCH(kernel, static_cast<unsigned>(blocks), Cfg::NT, kSmem, stream, args);
    return cudaGetLastError();
  });
}

// Writes out[0..B) (acc_t<T>): n_i^2 by `route`. a and b are [B, rows, d_in] and [B, rows, d_out]
// with contiguous last dimensions; `workspace` holds per_example_sqnorm_workspace<T>(...)
// elements. Empty sums (rows, d_in or d_out zero) give zeros. Asynchronous on `stream`.
template <typename T>
cudaError_t launch_per_example_sqnorm(SqnormRoute route, Rows3<T> a, Rows3<T> b, int64_t B, int64_t rows, int64_t d_in,
                                      int64_t d_out, acc_t<T>* workspace, acc_t<T>* out, cudaStream_t stream) {
  using A = acc_t<T>;
  if (B <= 0) return cudaSuccess;
  if (rows <= 0 || d_in <= 0 || d_out <= 0) {
    return cudaMemsetAsync(out, 0, static_cast<size_t>(B) * sizeof(A), stream);  // all-zero bits = +0.0
  }
  const int64_t reduce_blocks = ceil_div(B, kWarpPerRowThreads / 32);
  if (reduce_blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  if (route == SqnormRoute::kRowNorms) {
    ENGM_FAST_LAUNCH(rownorm_sqnorm_kernel<T>, static_cast<unsigned>(reduce_blocks), kWarpPerRowThreads, 0, stream, a,
                     b, B, d_in, d_out, out);
    return cudaGetLastError();
  }
  const void* ptrs[2] = {a.ptr, b.ptr};
  const int64_t strides[4] = {a.batch_stride, a.row_stride, b.batch_stride, b.row_stride};
  const int vec = pick_vec<T>(ptrs, 2, strides, 4);
  const int64_t per = per_example_sqnorm_workspace<T>(route, B, rows, d_in, d_out) / B;
  if (per > kMaxGridX / B) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaSuccess;
  if (route == SqnormRoute::kGhost) {
    GhostArgs<T> args{};
    args.a = a;
    args.b = b;
    args.T_rows = rows;
    args.d_in = d_in;
    args.d_out = d_out;
    args.nb = ceil_div(rows, ghost_block_rows(rows));
    args.npairs = per;
    args.partial = workspace;
    err = ghost_block_rows(rows) == 32 ? launch_ghost<T, 32>(args, vec, B * per, stream)
                                    : launch_ghost<T, 64>(args, vec, B * per, stream);
  } else {
    err = with_direct_config<T>(d_out, [&](auto cfg) {
      using Cfg = decltype(cfg);
      OuterGemmArgs<T> args{};
      args.a = a;
      args.b = b;
      args.k_rows = rows;
      args.d_in = d_in;
      args.d_out = d_out;
      args.tiles_n = ceil_div(d_in, Cfg::BN);
      args.tiles_m = ceil_div(d_out, Cfg::BM);
      args.partial = workspace;
      return launch_outer_gemm<T, Cfg, OuterMode::kSqNorm>(args, vec, B * per, stream);
    });
  }
  if (err != cudaSuccess) return err;
  ENGM_FAST_LAUNCH(sum_partials_kernel<A>, static_cast<unsigned>(reduce_blocks), kWarpPerRowThreads, 0, stream,
                   static_cast<const A*>(workspace), per, B, out);
  return cudaGetLastError();
}

// The launcher is instantiated for the four element types once, in per_example_sqnorm.cu
// (compiled into the extension and by the CMake compile check); translation units that include
// this header, like the torch binding, link to those instead of compiling the kernels again.
#define ENGM_FAST_SQNORM_LAUNCHER(T)                                                                             \
  template cudaError_t launch_per_example_sqnorm<T>(SqnormRoute, Rows3<T>, Rows3<T>, int64_t, int64_t, int64_t, \
                                                    int64_t, acc_t<T>*, acc_t<T>*, cudaStream_t);
#ifndef ENGM_FAST_SQNORM_DEFINE_INSTANCES
extern ENGM_FAST_SQNORM_LAUNCHER(__half)
extern ENGM_FAST_SQNORM_LAUNCHER(__nv_bfloat16)
extern ENGM_FAST_SQNORM_LAUNCHER(float)
extern ENGM_FAST_SQNORM_LAUNCHER(double)
#endif

}  // namespace cuda
}  // namespace engm_fast
