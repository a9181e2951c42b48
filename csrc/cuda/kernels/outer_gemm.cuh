// The GEMM shared by the direct route of per_example_sqnorm and by weighted_outer_sum:
//
//     C[m, n] = sum_k b[k, m] * a[k, n]        (m < d_out, n < d_in, k over rows)
//
// Both operands are stored with the reduction index k outermost and the output index
// contiguous ("MN-major"): a is [K, d_in], b is [K, d_out], row-major. One CTA computes one
// BM x BN tile of C over its k range, in a multi-stage cp.async pipeline:
//
//   prologue: stages 0 .. S-2 in flight
//   iteration kt: wait for stage kt, barrier, [scale b rows by w], prefetch stage kt+S-1
//                 (into the slot freed by iteration kt-1), multiply stage kt.
//
// Two epilogues (OuterMode):
//   kSqNorm   one CTA per (example z, tile): C = g_z restricted to the tile; the CTA writes
//             sum(C^2) to partial[z, tile]. Out-of-range rows/columns were loaded as zeros, so
//             they add exact zeros. g_z never leaves registers.
//   kWeighted split-K over the B*T rows: split z covers rows [z*k_per_split, ...); row k of b
//             is scaled by w[k / T] in shared memory right after it lands (no scaled copy of b
//             in global memory), and the CTA writes its partial C (fp32 / fp64) to
//             ws[z, m, n], or, with a single split, the rounded result straight to out[m, n].
//
// Arithmetic: fp16/bf16 use tensor cores (wmma 16x16x16, fp32 accumulators; wmma compiles to
// HMMA.16816 on sm_80/sm_90); float and double use a register-tiled SIMT product (no TF32:
// float results keep full fp32 accuracy, as the CPU path and torch's default matmul do).
#pragma once

#include <mma.h>

#include "common.cuh"

namespace engm_fast {
namespace cuda {

enum class OuterMode { kSqNorm, kWeighted };

// ------------------------------------------------------------------------- configurations

// 16-bit inputs. Warp tile WM x WN = 64 x 32: per 16-wide k step a warp loads 4 A and 2 B
// fragments for 8 MMAs. BK = 32 with 4 stages keeps 3 k-tiles (96 rows) of loads in flight.
//   Small: BM = 64 (layers with d_out <= 64, e.g. convs 576 -> 64: the whole of d_out in one
//          tile, so `a`, the big operand, is read from HBM exactly once), 4 warps, 52 KiB smem.
//   Large: BM = 128, 8 warps, 68 KiB smem (2-3 CTAs per SM on H100's 228 KiB).
template <int BM_>
struct TcOuterConfig {
  static constexpr bool kTensorCores = true;
  static constexpr int BM = BM_, BN = 128, BK = 32, STAGES = 4;
  static constexpr int WM = 64, WN = 32;
  static constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN;
  static constexpr int NT = 32 * WARPS_M * WARPS_N;
  static constexpr int FM = WM / 16, FN = WN / 16;
  // Register cap 128 per thread (65536 / (NT * kMinBlocks)): 4 CTAs of 128 threads (small,
  // 4 x 53 KiB of smem also fits H100's 228 KiB) or 2 of 256 (large) per SM.
  static constexpr int kMinBlocks = NT == 128 ? 4 : 2;
};

// float / double. Each thread owns a TM x TN block of C (TM rows contiguous, TN columns
// contiguous, read from shared memory as 16-byte vectors); 256 threads = (BM/TM) x (BN/TN).
// float, BM = 128: 8 x 8 per thread, 16 k-rows per stage: 64 FMA per 4 vector loads.
template <int BM_, int BK_, int TM_, int STAGES_>
struct SimtOuterConfig {
  static constexpr bool kTensorCores = false;
  static constexpr int BM = BM_, BN = 128, BK = BK_, STAGES = STAGES_;
  static constexpr int TM = TM_, TN = 8;
  static constexpr int THREADS_N = BN / TN;
  static constexpr int NT = (BM / TM) * THREADS_N;
  static constexpr int kMinBlocks = 2;  // 256 threads: at most 128 registers per thread
};

using TcOuterSmall = TcOuterConfig<64>;
using TcOuterLarge = TcOuterConfig<128>;
using SimtOuterFloatSmall = SimtOuterConfig<64, 16, 4, 3>;   // 38 KiB smem
using SimtOuterFloatLarge = SimtOuterConfig<128, 16, 8, 3>;  // 50 KiB smem
using SimtOuterDouble = SimtOuterConfig<64, 8, 4, 3>;        // 37 KiB smem

// Configuration by element type and d_out (BM = 64 suffices for d_out <= 64).
template <typename T, bool kSmallM>
struct OuterConfigFor;
template <bool kSmallM>
struct OuterConfigFor<__half, kSmallM> {
  using type = std::conditional_t<kSmallM, TcOuterSmall, TcOuterLarge>;
};
template <bool kSmallM>
struct OuterConfigFor<__nv_bfloat16, kSmallM> {
  using type = std::conditional_t<kSmallM, TcOuterSmall, TcOuterLarge>;
};
template <bool kSmallM>
struct OuterConfigFor<float, kSmallM> {
  using type = std::conditional_t<kSmallM, SimtOuterFloatSmall, SimtOuterFloatLarge>;
};
template <bool kSmallM>
struct OuterConfigFor<double, kSmallM> {
  using type = SimtOuterDouble;
};

// Shared-memory layout of one configuration: S stages of the b tile ([BK][BM + pad]), then S
// of the a tile ([BK][BN + pad]), then S rows of BK weights (weighted mode). The 16-byte row
// padding shifts consecutive k rows by 4 banks, which spreads the column reads of wmma loads
// and SIMT vector loads over the banks.
template <typename T, typename Cfg>
struct OuterSmem {
  using A = acc_t<T>;
  static constexpr int kPad = static_cast<int>(16 / sizeof(T));
  static constexpr int PA = Cfg::BM + kPad;  // pitch of the b tile (M operand)
  static constexpr int PB = Cfg::BN + kPad;  // pitch of the a tile (N operand)
  static constexpr int kAStage = Cfg::BK * PA;
  static constexpr int kBStage = Cfg::BK * PB;
  static constexpr int kTileBytes = Cfg::STAGES * (kAStage + kBStage) * static_cast<int>(sizeof(T));
  static constexpr int kBytes = kTileBytes + Cfg::STAGES * Cfg::BK * static_cast<int>(sizeof(A));
};

template <typename T>
struct OuterGemmArgs {
  Rows3<T> a;  // N operand, [batches or 1, K, d_in]
  Rows3<T> b;  // M operand, [batches or 1, K, d_out]
  int64_t k_rows;  // kSqNorm: T (rows per example); kWeighted: B * T
  int64_t d_in, d_out;
  int64_t tiles_n, tiles_m;
  // kSqNorm: [batches, tiles_m * tiles_n] sums of squares.
  acc_t<T>* partial;
  // kWeighted.
  const acc_t<T>* w;     // [B], in acc_t<T> (not rounded to T)
  int64_t rows_per_w;    // T: row k has weight w[k / T]
  int64_t k_per_split;   // multiple of BK
  acc_t<T>* ws;          // [splits, d_out, d_in] when splits > 1
  T* out;                // [d_out, d_in] when splits == 1 (then ws is unused)
};

// ------------------------------------------------------------------------- math policies

// Tensor cores: each warp owns FM x FN 16x16 accumulator fragments at (wm*WM, wn*WN).
template <typename T, typename Cfg>
struct TcOuterMath {
  using Smem = OuterSmem<T, Cfg>;
  using FragAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::col_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::row_major>;
  static_assert(kIs16Bit<T>, "tensor-core path is for fp16 / bf16");

  FragAcc acc[Cfg::FM][Cfg::FN];
  int wm, wn;

  __device__ __forceinline__ explicit TcOuterMath(int tid) {
    const int warp = tid / 32;
    wm = warp / Cfg::WARPS_N;
    wn = warp % Cfg::WARPS_N;
#pragma unroll
    for (int i = 0; i < Cfg::FM; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::FN; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }

  // as: b tile [BK][PA] = the M x K operand stored column-major (element (m, k) at k*PA + m);
  // bs: a tile [BK][PB] = the K x N operand row-major. Fragment pointers are 32-byte aligned:
  // k offsets are multiples of 16 rows (16 * PA * 2 bytes, PA a multiple of 8) and m / n
  // offsets multiples of 16 elements (32 bytes).
  __device__ __forceinline__ void step(const T* as, const T* bs) {
#pragma unroll
    for (int kk = 0; kk < Cfg::BK; kk += 16) {
      FragB fb[Cfg::FN];
#pragma unroll
      for (int j = 0; j < Cfg::FN; ++j) {
        nvcuda::wmma::load_matrix_sync(fb[j], bs + kk * Smem::PB + wn * Cfg::WN + j * 16, Smem::PB);
      }
#pragma unroll
      for (int i = 0; i < Cfg::FM; ++i) {
        FragA fa;
        nvcuda::wmma::load_matrix_sync(fa, as + kk * Smem::PA + wm * Cfg::WM + i * 16, Smem::PA);
#pragma unroll
        for (int j = 0; j < Cfg::FN; ++j) nvcuda::wmma::mma_sync(acc[i][j], fa, fb[j], acc[i][j]);
      }
    }
  }

  // The element -> (row, col) map of a fragment is unspecified, but a sum over all elements
  // does not need it.
  __device__ __forceinline__ float sum_squares() const {
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < Cfg::FM; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::FN; ++j)
#pragma unroll
        for (int e = 0; e < FragAcc::num_elements; ++e) s += acc[i][j].x[e] * acc[i][j].x[e];
    return s;
  }

  // Writes the tile (rows m0.., columns n0..) through a 16 x 16 float staging buffer per warp
  // (1 KiB each, in the pipeline's shared memory, which the caller has drained), with bounds
  // checks, to ws (fp32, row stride d_in) or, rounded, to out.
  __device__ __forceinline__ void store(unsigned char* smem, int64_t m0, int64_t n0, int64_t d_out, int64_t d_in,
                                        float* ws, T* out) {
    const int lane = threadIdx.x % 32;
    float* stage = reinterpret_cast<float*>(smem) + (threadIdx.x / 32) * 256;
#pragma unroll
    for (int i = 0; i < Cfg::FM; ++i) {
#pragma unroll
      for (int j = 0; j < Cfg::FN; ++j) {
        nvcuda::wmma::store_matrix_sync(stage, acc[i][j], 16, nvcuda::wmma::mem_row_major);
        __syncwarp();
        const int64_t mb = m0 + wm * Cfg::WM + i * 16;
        const int64_t nb = n0 + wn * Cfg::WN + j * 16;
#pragma unroll
        for (int e = lane; e < 256; e += 32) {
          const int64_t m = mb + e / 16;
          const int64_t n = nb + e % 16;
          if (m < d_out && n < d_in) {
            if (out != nullptr) {
              out[m * d_in + n] = from_acc<T>(stage[e]);
            } else {
              ws[m * d_in + n] = stage[e];
            }
          }
        }
        __syncwarp();
      }
    }
  }
};

// 16-byte vector reads of N elements from shared memory (address 16-byte aligned).
template <typename T, int N>
__device__ __forceinline__ void load_smem_vec(const T* p, T (&r)[N]) {
  static_assert((N * sizeof(T)) % 16 == 0, "whole 16-byte vectors");
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int v = 0; v < N / 4; ++v) {
      const float4 x = reinterpret_cast<const float4*>(p)[v];
      r[4 * v] = x.x;
      r[4 * v + 1] = x.y;
      r[4 * v + 2] = x.z;
      r[4 * v + 3] = x.w;
    }
  } else {
    static_assert(std::is_same_v<T, double>, "SIMT path is for float / double");
#pragma unroll
    for (int v = 0; v < N / 2; ++v) {
      const double2 x = reinterpret_cast<const double2*>(p)[v];
      r[2 * v] = x.x;
      r[2 * v + 1] = x.y;
    }
  }
}

// SIMT: thread (ty, tx) owns C rows ty*TM .. +TM and columns tx*TN .. +TN. In a warp the 16
// threads of one ty read 16 consecutive 32-byte column blocks (512 contiguous bytes, 4 shared
// memory wavefronts, the minimum) and the 2 distinct ty rows are broadcasts.
template <typename T, typename Cfg>
struct SimtOuterMath {
  using Smem = OuterSmem<T, Cfg>;
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "SIMT path is for float / double");
  T acc[Cfg::TM][Cfg::TN];
  int ty, tx;

  __device__ __forceinline__ explicit SimtOuterMath(int tid) {
    ty = tid / Cfg::THREADS_N;
    tx = tid % Cfg::THREADS_N;
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::TN; ++j) acc[i][j] = T(0);
  }

  __device__ __forceinline__ void step(const T* as, const T* bs) {
#pragma unroll
    for (int k = 0; k < Cfg::BK; ++k) {
      T ra[Cfg::TM];
      T rb[Cfg::TN];
      load_smem_vec<T, Cfg::TM>(as + k * Smem::PA + ty * Cfg::TM, ra);
      load_smem_vec<T, Cfg::TN>(bs + k * Smem::PB + tx * Cfg::TN, rb);
#pragma unroll
      for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::TN; ++j) acc[i][j] = fma(ra[i], rb[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ T sum_squares() const {
    T s = T(0);
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::TN; ++j) s = fma(acc[i][j], acc[i][j], s);
    return s;
  }

  __device__ __forceinline__ void store(unsigned char*, int64_t m0, int64_t n0, int64_t d_out, int64_t d_in, T* ws,
                                        T* out) {
    T* dst = out != nullptr ? out : ws;
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i) {
      const int64_t m = m0 + ty * Cfg::TM + i;
      if (m >= d_out) continue;
#pragma unroll
      for (int j = 0; j < Cfg::TN; ++j) {
        const int64_t n = n0 + tx * Cfg::TN + j;
        if (n < d_in) dst[m * d_in + n] = acc[i][j];
      }
    }
  }
};

template <typename T, typename Cfg>
using OuterMath = std::conditional_t<Cfg::kTensorCores, TcOuterMath<T, Cfg>, SimtOuterMath<T, Cfg>>;

// ------------------------------------------------------------------------- the kernel

// Grid: one-dimensional, tiles_n * tiles_m * batches CTAs; n tile fastest, so the CTAs of one
// example (or split) run together and share its b rows in L2.
template <typename T, typename Cfg, int VEC, OuterMode MODE>
__global__ void __launch_bounds__(Cfg::NT, Cfg::kMinBlocks) outer_gemm_kernel(const OuterGemmArgs<T> args) {
#if ENGM_FAST_CUDA_UNSUPPORTED_ARCH
  __trap();
#else
  using A = acc_t<T>;
  using Smem = OuterSmem<T, Cfg>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, S = Cfg::STAGES, NT = Cfg::NT;
  static_assert(S >= 2, "at least double buffering");

  ENGM_FAST_DYNAMIC_SMEM(smem);
  T* const as_all = reinterpret_cast<T*>(smem);
  T* const bs_all = as_all + S * Smem::kAStage;
  A* const ws_all = reinterpret_cast<A*>(smem + Smem::kTileBytes);

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t bid = static_cast<int64_t>(blockIdx.x);
  const int64_t n_tile = bid % args.tiles_n;
  const int64_t rest = bid / args.tiles_n;
  const int64_t m_tile = rest % args.tiles_m;
  const int64_t z = rest / args.tiles_m;
  const int64_t m0 = m_tile * BM;
  const int64_t n0 = n_tile * BN;

  const T* a_base;
  const T* b_base;
  int64_t k_begin, k_end;
  if constexpr (MODE == OuterMode::kSqNorm) {
    a_base = args.a.ptr + z * args.a.batch_stride;
    b_base = args.b.ptr + z * args.b.batch_stride;
    k_begin = 0;
    k_end = args.k_rows;
  } else {
    a_base = args.a.ptr;
    b_base = args.b.ptr;
    k_begin = z * args.k_per_split;
    k_end = min64(args.k_rows, k_begin + args.k_per_split);
  }
  const int cols_b = static_cast<int>(min64(BM, args.d_out - m0));
  const int cols_a = static_cast<int>(min64(BN, args.d_in - n0));
  const int64_t num_k_tiles = ceil_div(k_end - k_begin, BK);

  auto load_stage = [&](int stage, int64_t kt) {
    const int64_t k0 = k_begin + kt * BK;
    const int rows = static_cast<int>(min64(BK, k_end - k0));
    load_tile<T, BK, BM, Smem::PA, NT, VEC>(as_all + stage * Smem::kAStage, b_base + k0 * args.b.row_stride + m0,
                                            args.b.row_stride, rows, cols_b, args.b.ptr, tid);
    load_tile<T, BK, BN, Smem::PB, NT, VEC>(bs_all + stage * Smem::kBStage, a_base + k0 * args.a.row_stride + n0,
                                            args.a.row_stride, rows, cols_a, args.a.ptr, tid);
    if constexpr (MODE == OuterMode::kWeighted) {
      // One 64-bit division per row and stage, by BK threads; rows past the end get w = 0.
      if (tid < BK) {
        const bool valid = tid < rows;
        const A* src = valid ? args.w + (k0 + tid) / args.rows_per_w : args.w;
        cp_async<static_cast<int>(sizeof(A))>(ws_all + stage * BK + tid, src, valid ? static_cast<int>(sizeof(A)) : 0);
      }
    }
  };

  OuterMath<T, Cfg> math(tid);

#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < num_k_tiles) load_stage(s, s);
    cp_async_commit();  // empty groups keep the group count uniform
  }
  for (int64_t kt = 0; kt < num_k_tiles; ++kt) {
    cp_async_wait<S - 2>();  // this thread's copies of stage kt have landed
    __syncthreads();         // everyone's have, and stage kt-1 is no longer being read
    const int stage = static_cast<int>(kt % S);
    T* const as = as_all + stage * Smem::kAStage;
    if constexpr (MODE == OuterMode::kWeighted) {
      // b[k, :] *= w[k / T], the product formed in A and rounded once to T: the operand
      // round_T(w_r b_r) of the contract (engm_fast/reference.py). Thread
      // tid scales column tid % BM of rows tid / BM, + NT / BM, ...
      static_assert(NT % BM == 0, "whole rows per pass");
      const A* wrow = ws_all + stage * BK;
      const int c = tid % BM;
#pragma unroll 4
      for (int r = tid / BM; r < BK; r += NT / BM) {
        as[r * Smem::PA + c] = from_acc<T>(to_acc(as[r * Smem::PA + c]) * wrow[r]);
      }
      __syncthreads();
    }
    const int64_t next = kt + S - 1;
    if (next < num_k_tiles) load_stage(static_cast<int>(next % S), next);
    cp_async_commit();
    math.step(as, bs_all + stage * Smem::kBStage);
  }

  if constexpr (MODE == OuterMode::kSqNorm) {
    const A s = block_sum<NT>(static_cast<A>(math.sum_squares()));
    if (tid == 0) args.partial[z * args.tiles_m * args.tiles_n + m_tile * args.tiles_n + n_tile] = s;
  } else {
    cp_async_wait<0>();
    __syncthreads();  // the pipeline's shared memory becomes the epilogue's staging buffer
    A* ws = args.out != nullptr ? nullptr : args.ws + z * args.d_out * args.d_in;
    math.store(smem, m0, n0, args.d_out, args.d_in, ws, args.out);
  }
#endif
}

// Calls f(std::integral_constant<int, VEC>{}) for a runtime VEC among the widths pick_vec<T>
// returns, so each width is one kernel instantiation.
template <typename T, typename F>
inline cudaError_t dispatch_vec(int vec, F&& f) {
  if constexpr (kIs16Bit<T>) {
    if (vec == 8) return f(std::integral_constant<int, 8>{});
    if (vec == 2) return f(std::integral_constant<int, 2>{});
    return f(std::integral_constant<int, 1>{});
  } else if constexpr (std::is_same_v<T, float>) {
    if (vec == 4) return f(std::integral_constant<int, 4>{});
    return f(std::integral_constant<int, 1>{});
  } else {
    if (vec == 2) return f(std::integral_constant<int, 2>{});
    return f(std::integral_constant<int, 1>{});
  }
}

// Launches outer_gemm_kernel<T, Cfg, vec, MODE> over `blocks` CTAs.
template <typename T, typename Cfg, OuterMode MODE>
inline cudaError_t launch_outer_gemm(const OuterGemmArgs<T>& args, int vec, int64_t blocks, cudaStream_t stream) {
  if (blocks <= 0) return cudaSuccess;
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  return dispatch_vec<T>(vec, [&](auto v) -> cudaError_t {
    auto kernel = outer_gemm_kernel<T, Cfg, decltype(v)::value, MODE>;
    constexpr int kSmem = OuterSmem<T, Cfg>::kBytes;
    cudaError_t err = allow_dynamic_smem(kernel, kSmem);
    if (err != cudaSuccess) return err;
    ENGM_FAST_LAUNCH(kernel, static_cast<unsigned>(blocks), Cfg::NT, kSmem, stream, args);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace engm_fast
