// Host emulation of the small part of CUDA the engm_fast kernels use, so that the kernels
// (csrc/cuda/kernels/*.cuh) run on a CPU with a host C++ compiler: blocks one after another,
// the threads of a block as cooperative user-level threads (ucontext) switching at barriers,
// so __syncthreads, __syncwarp, warp shuffles and warp-collective wmma calls are exact and
// deterministic.
//
// Checks that a device run would not report:
//   * cp.async: alignment of source (when bytes are read) and destination to the copy size,
//     src-size <= copy size, destination inside the launch's dynamic shared memory, source
//     bytes inside a registered allocation (emu::register_range);
//   * copies land either at their wait (late mode: a read before cp.async.wait_group sees
//     poison) or at issue (early mode, with forward or reverse thread order inside each
//     barrier interval: a write into a stage another thread still reads is seen by it);
//   * wmma: 32-byte aligned pointers and ldm multiples of 16 bytes, as the API requires;
//   * dynamic shared memory starts poisoned (0xFF bytes: NaN for fp16, bf16, fp32, fp64)
//     and is followed by a guard that must stay intact;
//   * committed copy groups still pending when a thread exits.
//
// What it cannot tell: speed, bank conflicts, register pressure; the hardware's wmma element
// map (the one below differs on purpose: the kernels must not depend on it) and tensor-core
// rounding (products are formed in fp32 here); races other than the two thread orders tried.
// The real device run (tests/test_ops.py on a GPU, benchmarks/gpu_validate.sh) is the proof.
#pragma once

#define ENGM_FAST_HOST_EMULATION 1

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static  // blocks run one at a time: one static object per declaration is the block's

inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "EMULATION ERROR: %s (block %u thread %u)\n", what, blockIdx.x, threadIdx.x);
  std::abort();
}

struct Range {
  const unsigned char* lo;
  const unsigned char* hi;
};
inline std::vector<Range> g_ranges;
inline void register_range(const void* p, size_t bytes) {
  g_ranges.push_back({static_cast<const unsigned char*>(p), static_cast<const unsigned char*>(p) + bytes});
}
inline void clear_ranges() { g_ranges.clear(); }
inline bool in_ranges(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  for (const Range& r : g_ranges) {
    if (c >= r.lo && c + bytes <= r.hi) return true;
  }
  return false;
}

enum class CopyMode { kLate, kEarlyForward, kEarlyReverse };
inline CopyMode g_mode = CopyMode::kLate;

struct Copy {
  void* dst;
  const void* src;
  int bytes;
  int src_bytes;
};

inline void do_copy(const Copy& c) {
  if (c.src_bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
  std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
}

enum class State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

struct Thread {
  ucontext_t ctx;
  std::vector<unsigned char> stack;
  State state = State::kRunnable;
  unsigned idx = 0;
  std::vector<std::vector<Copy>> groups;
  std::vector<Copy> open;
};

constexpr size_t kStack = 256 * 1024;

struct BlockRun {
  std::vector<Thread> threads;
  ucontext_t sched;
  int current = -1;
  int nt = 0;
  // barrier bookkeeping
  int block_arrived = 0;
  std::vector<int> warp_arrived;
  std::vector<unsigned char> shfl;  // 32 lanes x 8 bytes per warp
  std::vector<float> mma_scratch;   // per warp: A 16x16, B 16x16
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
};
inline BlockRun* g_run = nullptr;
inline std::vector<unsigned char> g_smem_storage;
constexpr size_t kSmemGuard = 4096;

inline Thread& self() { return g_run->threads[static_cast<size_t>(g_run->current)]; }
inline int lane() { return static_cast<int>(threadIdx.x % 32); }
inline int warp() { return static_cast<int>(threadIdx.x / 32); }

inline int live_in_block() {
  int n = 0;
  for (const Thread& t : g_run->threads) n += t.state != State::kDone;
  return n;
}
inline int live_in_warp(int w) {
  int n = 0;
  for (int i = w * 32; i < std::min(g_run->nt, w * 32 + 32); ++i) n += g_run->threads[i].state != State::kDone;
  return n;
}

inline void yield() { swapcontext(&self().ctx, &g_run->sched); }

// Releases the waiters of a barrier once every live participant has arrived.
inline void try_release_block() {
  if (g_run->block_arrived > 0 && g_run->block_arrived == live_in_block()) {
    for (Thread& t : g_run->threads) {
      if (t.state == State::kBlockBarrier) t.state = State::kRunnable;
    }
    g_run->block_arrived = 0;
  }
}
inline void try_release_warp(int w) {
  if (g_run->warp_arrived[w] > 0 && g_run->warp_arrived[w] == live_in_warp(w)) {
    for (int i = w * 32; i < std::min(g_run->nt, w * 32 + 32); ++i) {
      if (g_run->threads[i].state == State::kWarpBarrier) g_run->threads[i].state = State::kRunnable;
    }
    g_run->warp_arrived[w] = 0;
  }
}

inline void block_barrier() {
  self().state = State::kBlockBarrier;
  ++g_run->block_arrived;
  try_release_block();
  yield();
}
inline void warp_barrier() {
  const int w = warp();
  self().state = State::kWarpBarrier;
  ++g_run->warp_arrived[w];
  try_release_warp(w);
  yield();
}

}  // namespace emu

inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier(); }

template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int off) {
  static_assert(sizeof(V) <= 8, "up to 8 bytes");
  unsigned char* buf = emu::g_run->shfl.data() + static_cast<size_t>(emu::warp()) * 32 * 8;
  std::memcpy(buf + emu::lane() * 8, &v, sizeof(V));
  emu::warp_barrier();
  V r;
  std::memcpy(&r, buf + (emu::lane() ^ off) * 8, sizeof(V));
  emu::warp_barrier();
  return r;
}

// Streaming global loads / stores: plain accesses here.
inline uint4 __ldcs(const uint4* p) { return *p; }
inline void __stcs(uint4* p, uint4 v) { *p = v; }

inline unsigned char* engm_fast_emu_dynamic_smem() { return emu::g_run->smem; }

inline void engm_fast_emu_cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  if (src_bytes < 0 || src_bytes > bytes) emu::fail("cp.async src-size outside [0, cp-size]");
  if (reinterpret_cast<uintptr_t>(dst) % static_cast<uintptr_t>(bytes) != 0) emu::fail("cp.async destination misaligned");
  auto* d = static_cast<unsigned char*>(dst);
  if (d < emu::g_run->smem || d + bytes > emu::g_run->smem + emu::g_run->smem_bytes) {
    emu::fail("cp.async destination outside the dynamic shared memory");
  }
  if (src_bytes > 0) {
    if (reinterpret_cast<uintptr_t>(src) % static_cast<uintptr_t>(bytes) != 0) emu::fail("cp.async source misaligned");
    if (!emu::in_ranges(src, static_cast<size_t>(src_bytes))) emu::fail("cp.async reads outside every allocation");
  }
  const emu::Copy c{dst, src, bytes, src_bytes};
  if (emu::g_mode == emu::CopyMode::kLate) {
    emu::self().open.push_back(c);
  } else {
    emu::do_copy(c);
  }
}
inline void engm_fast_emu_cp_async_commit() {
  emu::Thread& t = emu::self();
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}
inline void engm_fast_emu_cp_async_wait(int n) {
  emu::Thread& t = emu::self();
  while (static_cast<int>(t.groups.size()) > n) {
    for (const emu::Copy& c : t.groups.front()) emu::do_copy(c);
    t.groups.erase(t.groups.begin());
  }
}

// ----------------------------------------------------------------------------- wmma

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// Lane l holds entries l*8 .. l*8+7 of the 16 x 16 matrix in row-major order (the real map is
// unspecified; the kernels must not depend on it, and this one differs from the hardware's).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "16x16x16 only");
  static constexpr int num_elements = 8;
  T x[8];
};

template <typename T>
inline float emu_to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return static_cast<float>(v);
  }
}

template <typename T>
inline void check_ptr(const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fail("wmma pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0) emu::fail("wmma ldm not a multiple of 16 bytes");
}

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  check_ptr(p, ldm);
  for (int e = 0; e < 8; ++e) {
    const int idx = emu::lane() * 8 + e;
    const int r = idx / 16, c = idx % 16;
    f.x[e] = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[r + c * ldm];
  }
  emu::warp_barrier();  // warp-collective
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t layout) {
  check_ptr(p, ldm);
  for (int e = 0; e < 8; ++e) {
    const int idx = emu::lane() * 8 + e;
    const int r = idx / 16, c = idx % 16;
    if (layout == mem_row_major) {
      p[r * ldm + c] = f.x[e];
    } else {
      p[r + c * ldm] = f.x[e];
    }
  }
  emu::warp_barrier();
}

template <typename T>
inline void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, T v) {
  for (int e = 0; e < 8; ++e) f.x[e] = v;
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float* s = emu::g_run->mma_scratch.data() + static_cast<size_t>(emu::warp()) * 512;
  for (int e = 0; e < 8; ++e) {
    s[emu::lane() * 8 + e] = emu_to_float(a.x[e]);
    s[256 + emu::lane() * 8 + e] = emu_to_float(b.x[e]);
  }
  emu::warp_barrier();
  float out[8];
  for (int e = 0; e < 8; ++e) {
    const int idx = emu::lane() * 8 + e;
    const int r = idx / 16, col = idx % 16;
    float acc = c.x[e];
    for (int k = 0; k < 16; ++k) acc += s[r * 16 + k] * s[256 + k * 16 + col];
    out[e] = acc;
  }
  emu::warp_barrier();
  for (int e = 0; e < 8; ++e) d.x[e] = out[e];
}
}  // namespace wmma
}  // namespace nvcuda

// ----------------------------------------------------------------------------- launch

namespace emu {
template <typename F>
struct Trampoline {
  static inline F* fn = nullptr;
  static void run() {
    (*fn)();
    Thread& t = self();
    for (const auto& g : t.groups) {
      if (!g.empty()) fail("a thread exited with committed cp.async copies never waited for");
    }
    if (!t.open.empty()) fail("a thread exited with uncommitted cp.async copies");
    t.state = State::kDone;
    try_release_block();
    try_release_warp(warp());
    // returning resumes uc_link (the scheduler)
  }
};

inline std::vector<std::vector<unsigned char>> g_stacks;
}  // namespace emu

template <typename... KArgs, typename... Args>
inline void engm_fast_emu_launch(void (*kernel)(KArgs...), unsigned grid, int block, int smem_bytes, cudaStream_t,
                                 Args&&... args) {
  using namespace emu;
  gridDim = dim3(grid, 1, 1);
  blockDim = dim3(static_cast<unsigned>(block), 1, 1);
  auto call = [&]() { kernel(static_cast<KArgs>(args)...); };
  using Call = decltype(call);
  Trampoline<Call>::fn = &call;
  if (g_stacks.size() < static_cast<size_t>(block)) g_stacks.resize(static_cast<size_t>(block));
  for (auto& s : g_stacks) {
    if (s.size() < kStack) s.resize(kStack);
  }
  g_smem_storage.assign(static_cast<size_t>(smem_bytes) + kSmemGuard + 256, 0xFF);
  unsigned char* base = g_smem_storage.data();
  base += (128 - reinterpret_cast<uintptr_t>(base) % 128) % 128;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = uint3{b, 0, 0};
    BlockRun run;
    run.nt = block;
    run.threads.resize(static_cast<size_t>(block));
    run.warp_arrived.assign(static_cast<size_t>((block + 31) / 32), 0);
    run.shfl.assign(static_cast<size_t>((block + 31) / 32) * 32 * 8, 0);
    run.mma_scratch.assign(static_cast<size_t>((block + 31) / 32) * 512, 0.0f);
    std::memset(base, 0xFF, static_cast<size_t>(smem_bytes) + kSmemGuard);
    run.smem = base;
    run.smem_bytes = static_cast<size_t>(smem_bytes);
    g_run = &run;
    for (int i = 0; i < block; ++i) {
      Thread& t = run.threads[static_cast<size_t>(i)];
      t.idx = static_cast<unsigned>(i);
      getcontext(&t.ctx);
      t.ctx.uc_stack.ss_sp = g_stacks[static_cast<size_t>(i)].data();
      t.ctx.uc_stack.ss_size = kStack;
      t.ctx.uc_link = &run.sched;
      makecontext(&t.ctx, &Trampoline<Call>::run, 0);
    }
    // Round-robin over runnable threads, forward or reverse, until all are done.
    const bool reverse = g_mode == CopyMode::kEarlyReverse;
    for (;;) {
      bool any_live = false, progressed = false;
      for (int k = 0; k < block; ++k) {
        const int i = reverse ? block - 1 - k : k;
        Thread& t = run.threads[static_cast<size_t>(i)];
        if (t.state == State::kDone) continue;
        any_live = true;
        if (t.state != State::kRunnable) continue;
        run.current = i;
        threadIdx = uint3{static_cast<unsigned>(i), 0, 0};
        swapcontext(&run.sched, &t.ctx);
        progressed = true;
      }
      if (!any_live) break;
      if (!progressed) fail("deadlock: every live thread waits at a barrier that cannot complete");
    }
    for (size_t k = static_cast<size_t>(smem_bytes); k < static_cast<size_t>(smem_bytes) + kSmemGuard; ++k) {
      if (base[k] != 0xFF) fail("write past the end of the dynamic shared memory");
    }
    g_run = nullptr;
  }
}

// ----------------------------------------------------------------------------- runtime API

namespace emu {
inline int g_sm_count = 4;
inline int g_occupancy = 2;
}  // namespace emu

extern "C" {
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *v = emu::g_sm_count;
  return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value > 227 * 1024) return cudaErrorInvalidValue;
  return cudaSuccess;
}
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int, size_t) {
  *n = emu::g_occupancy;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError(void) { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "error"; }
}
// nvcc's cuda_runtime.h has these templates for kernel pointers; the host compiler sees only
// the const void* versions.
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(f), attr, value);
}
template <typename F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F* f, int threads, size_t smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, reinterpret_cast<const void*>(f), threads, smem);
}
