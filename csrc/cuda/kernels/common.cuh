// Shared pieces of the torch-free CUDA kernels of engm_fast: element types, accumulation
// types, cp.async tile loads with zero fill, reductions, launch helpers.
//
// Nothing here includes torch: these headers compile with plain nvcc (the CMake target
// cuda_compile_check, sm_80 and sm_90) and are included by the torch binding
// csrc/cuda/per_example_ops.cu. Element types are the CUDA ones (__half, __nv_bfloat16,
// float, double); the binding maps at::Half / at::BFloat16 onto them (same 16-bit layouts).
//
// torch compiles CUDA sources with __CUDA_NO_HALF_OPERATORS__, __CUDA_NO_HALF_CONVERSIONS__,
// __CUDA_NO_BFLOAT16_CONVERSIONS__ and __CUDA_NO_HALF2_OPERATORS__, so every conversion below
// is an explicit intrinsic (the compile-check translation units define the same macros).
//
// Requirements: compute capability 8.0 or newer (cp.async, bf16 tensor-core MMA). The kernels
// are compiled only for sm_80+; on an older target their bodies trap (the binding refuses to
// launch there with an error naming the device, so the trap is never reached through it).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define ENGM_FAST_CUDA_UNSUPPORTED_ARCH 1
#else
#define ENGM_FAST_CUDA_UNSUPPORTED_ARCH 0
#endif

namespace engm_fast {
namespace cuda {

// ------------------------------------------------------------------------- element types

// Accumulation type the kernels are instantiated with: float for 16- and 32-bit inputs, double
// for double. The accumulation dtype is decided in Python (engm_fast/reference.py,
// accumulation_dtype) and passed to the ops; the binding refuses a dtype other than this one.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

template <typename T>
constexpr bool kIs16Bit = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

__host__ __device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__host__ __device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__host__ __device__ __forceinline__ float to_acc(float x) { return x; }
__host__ __device__ __forceinline__ double to_acc(double x) { return x; }

// Round-to-nearest-even conversion from the accumulation type, the rounding torch's casts use.
template <typename T>
__host__ __device__ __forceinline__ T from_acc(acc_t<T> x);
template <>
__host__ __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__host__ __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__host__ __device__ __forceinline__ double from_acc<double>(double x) { return x; }

// Runtime tag of an element type (the multi-tensor update mixes dtypes in one launch).
enum class ElemType : int32_t { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

// ------------------------------------------------------------------------- small helpers

__host__ __device__ constexpr int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }
__host__ __device__ constexpr int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }
__host__ __device__ constexpr int64_t max64(int64_t x, int64_t y) { return x > y ? x : y; }

// Rows of a [B, T, d] operand whose last dimension is contiguous (stride 1): element (i, t, j)
// is at ptr[i * batch_stride + t * row_stride + j]. Strides are in elements.
template <typename T>
struct Rows3 {
  const T* ptr;
  int64_t batch_stride;
  int64_t row_stride;
};

// ------------------------------------------------------------------------- asynchronous copies

// ENGM_FAST_HOST_EMULATION: tests/cuda_emulation compiles these headers with a host C++
// compiler and runs the kernels on CPU threads (this machine has no GPU). It supplies the
// cp.async hooks, the dynamic shared memory and the launch below; the device build never
// defines it.
#if defined(ENGM_FAST_HOST_EMULATION)
#define ENGM_FAST_DYNAMIC_SMEM(name) unsigned char* const name = engm_fast_emu_dynamic_smem()
#define ENGM_FAST_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  engm_fast_emu_launch(kernel, grid, block, smem_bytes, stream, __VA_ARGS__)
#else
#define ENGM_FAST_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define ENGM_FAST_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<grid, block, smem_bytes, stream>>>(__VA_ARGS__)
#endif

#if !defined(ENGM_FAST_HOST_EMULATION) && !ENGM_FAST_CUDA_UNSUPPORTED_ARCH && defined(__CUDA_ARCH__)
#define ENGM_FAST_CP_ASYNC_PTX 1
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#else
#define ENGM_FAST_CP_ASYNC_PTX 0
#endif

// Copies BYTES bytes to shared memory asynchronously: src_bytes (<= BYTES) from global memory,
// the rest zero-filled.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* smem_dst, const void* gmem_src, int src_bytes) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async moves 4, 8 or 16 bytes");
#if defined(ENGM_FAST_HOST_EMULATION)
  engm_fast_emu_cp_async(smem_dst, gmem_src, BYTES, src_bytes);
#elif ENGM_FAST_CP_ASYNC_PTX
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)),
                 "l"(gmem_src), "r"(src_bytes)
                 : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_addr(smem_dst)),
                 "l"(gmem_src), "n"(BYTES), "r"(src_bytes)
                 : "memory");
  }
#else
  (void)smem_dst;
  (void)gmem_src;
  (void)src_bytes;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(ENGM_FAST_HOST_EMULATION)
  engm_fast_emu_cp_async_commit();
#elif ENGM_FAST_CP_ASYNC_PTX
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(ENGM_FAST_HOST_EMULATION)
  engm_fast_emu_cp_async_wait(N);
#elif ENGM_FAST_CP_ASYNC_PTX
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ------------------------------------------------------------------------- tile loads
//
// A tile of ROWS x COLS elements is copied from global memory (row stride `ld`, contiguous
// columns) into shared memory (row pitch PITCH elements). Elements outside
// [0, rows_valid) x [0, cols_valid) are written as zeros, so partial tiles at the edges of
// non-multiple sizes contribute nothing to any product.
//
// VEC is the number of elements moved per copy instruction:
//   VEC * sizeof(T) in {4, 8, 16}: asynchronous cp.async copies (16 bytes with .cg, which
//     skips L1: every byte is used once per CTA; 4 and 8 bytes with .ca, the only cache mode
//     that allows them). The caller chose VEC so that the tensor's base pointer and all its
//     strides are multiples of VEC elements (pick_vec below), hence every copy is aligned; a
//     copy straddling the row end reads only the valid bytes (cp.async src-size) and zero-fills
//     the rest of the chunk in shared memory.
//   VEC == 1 with a 2-byte type: no 2-byte cp.async exists; plain loads and stores (the
//     fallback for odd feature sizes of fp16/bf16 tensors).
// PITCH * sizeof(T) and the tile's column origin must be multiples of 16 bytes (all tile
// configurations below use a 16-byte row padding), so shared-memory destinations are aligned.

template <typename T, int ROWS, int COLS, int PITCH, int NT, int VEC>
__device__ __forceinline__ void load_tile(T* __restrict__ smem, const T* __restrict__ gmem, int64_t ld,
                                          int rows_valid, int cols_valid, const T* __restrict__ safe,
                                          int tid) {
  static_assert(COLS % VEC == 0, "tile width must be a multiple of the copy width");
  static_assert((PITCH * sizeof(T)) % 16 == 0, "shared rows must stay 16-byte aligned");
  constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
  constexpr int kChunksPerRow = COLS / VEC;
  // Thread tid always copies the same column chunk, in rows r0, r0 + kRowStep, ...: its source
  // address advances by a constant, so the unrolled loop needs two 64-bit registers for
  // addresses, not one per copy.
  static_assert(NT % kChunksPerRow == 0, "a row's chunks must divide the thread count");
  constexpr int kRowStep = NT / kChunksPerRow;
  constexpr int kIters = (ROWS + kRowStep - 1) / kRowStep;
  const int r0 = tid / kChunksPerRow;
  const int col = (tid % kChunksPerRow) * VEC;
  const int left = cols_valid - col;  // valid elements from this chunk on (may be <= 0)
  const int valid = left < VEC ? left : VEC;
  const T* src = gmem + static_cast<int64_t>(r0) * ld + col;
  const int64_t src_step = static_cast<int64_t>(kRowStep) * ld;
  T* dst = smem + r0 * PITCH + col;
  if constexpr (kBytes >= 4) {
    static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "unsupported copy width");
    const int bytes = valid > 0 ? valid * static_cast<int>(sizeof(T)) : 0;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int r = r0 + it * kRowStep;
      if (ROWS % kRowStep != 0 && r >= ROWS) break;
      const int n = r < rows_valid ? bytes : 0;
      // With 0 source bytes nothing is read (the chunk is zero-filled); the address given is
      // still a valid one.
      cp_async<kBytes>(dst + it * kRowStep * PITCH, n > 0 ? src + it * src_step : safe, n);
    }
  } else {
    static_assert(VEC == 1, "2-byte elements are copied one by one");
    // Plain loads: unrolled by 8 (not fully) to bound the registers holding loaded values.
#pragma unroll 8
    for (int it = 0; it < kIters; ++it) {
      const int r = r0 + it * kRowStep;
      if (ROWS % kRowStep != 0 && r >= ROWS) break;
      T v = from_acc<T>(0.0f);
      if (r < rows_valid && valid > 0) v = src[it * src_step];
      dst[it * kRowStep * PITCH] = v;
    }
    (void)safe;
  }
}

// Widest VEC (elements per copy, see load_tile) usable for operands whose base pointers and
// strides are given: every pointer a multiple of VEC * sizeof(T) bytes and every stride a
// multiple of VEC elements. 16 bytes when possible, else the element itself (4- and 8-byte
// types) or 4 bytes (2-byte types with even strides), else 1 (2-byte types, plain loads).
template <typename T>
inline int pick_vec(const void* const* ptrs, int n_ptrs, const int64_t* strides, int n_strides) {
  auto ok = [&](int vec) {
    const uintptr_t bytes = static_cast<uintptr_t>(vec) * sizeof(T);
    for (int i = 0; i < n_ptrs; ++i) {
      if (reinterpret_cast<uintptr_t>(ptrs[i]) % bytes != 0) return false;
    }
    for (int i = 0; i < n_strides; ++i) {
      if (strides[i] % vec != 0) return false;
    }
    return true;
  };
  constexpr int kVec16 = static_cast<int>(16 / sizeof(T));
  if (ok(kVec16)) return kVec16;
  if constexpr (sizeof(T) >= 4) {
    return 1;  // element-wide cp.async: 4 (float) or 8 (double) bytes, always aligned
  } else {
    return ok(2) ? 2 : 1;
  }
}

// ------------------------------------------------------------------------- reductions

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  return v;
}

// Sum of v over the NT threads of the block; the result is valid in thread 0. Uses its own
// 32-entry static shared array and ends with a barrier-free read (one call per kernel).
template <int NT, typename A>
__device__ __forceinline__ A block_sum(A v) {
  static_assert(NT % 32 == 0 && NT <= 1024, "whole warps only");
  constexpr int kWarps = NT / 32;
  __shared__ A warp_sums[kWarps];
  v = warp_sum(v);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  A total = A(0);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
  }
  return total;
}

// ------------------------------------------------------------------------- launch helpers

// Allows `smem_bytes` of dynamic shared memory for `kernel` (needed above 48 KiB) and returns
// the error of the attribute call. The attribute is per function; setting it on every launch
// costs about a microsecond and stays correct across devices.
template <typename Kernel>
inline cudaError_t allow_dynamic_smem(Kernel kernel, int smem_bytes) {
  if (smem_bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
}

// Number of multiprocessors of the current device.
inline cudaError_t current_sm_count(int* count) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
}

// Grids here are one-dimensional (x allows 2^31 - 1 blocks; y and z only 65535, which B or the
// number of tiles can exceed).
constexpr int64_t kMaxGridX = 2147483647;

}  // namespace cuda
}  // namespace engm_fast
