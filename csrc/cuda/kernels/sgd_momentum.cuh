// sgd_momentum_update_ on CUDA: one torch.optim.SGD step over lists of tensors in ONE launch.
// Arithmetic (engm_fast/reference.py sgd_momentum_update_, per element, in acc_t<T>: fp32 for
// fp16 / bf16 / float, fp64 for double):
//
//     d   = g + weight_decay * p                   (d = g when weight_decay == 0)
//     buf = d                       (first_step)   | momentum * buf + (1 - dampening) * d
//     d   = d + momentum * buf      (nesterov)     | buf          (skipped: momentum == 0)
//     p   = p - lr * d
//
// The stored (rounded to T) buffer is the one the step uses, and each stored value (buffer,
// parameter) is rounded once: the definition of engm_fast/reference.py.
//
// Multi-tensor layout (as torch's multi_tensor_apply, but with the metadata in device memory
// instead of kernel arguments, so any number of tensors fits one launch): the caller builds an
// array of SgdTensorMeta, one per non-empty tensor, with chunk_begin = the number of
// kSgdChunk-element chunks of the tensors before it, and copies it to the device. CTA c finds
// its tensor by binary search over chunk_begin and updates elements
// [(c - chunk_begin) * kSgdChunk, ...) of it. Tensors of different dtypes can share the launch:
// the element type is a per-tensor tag, uniform within a CTA.
//
// Memory traffic per element: read p, g, buf; write p, buf (5 x 4 bytes for fp32). With 16-byte
// vector accesses (when the three base pointers are 16-byte aligned; chunk starts are
// multiples of kSgdChunk elements, so every vector is aligned then) and 2 vectors in flight per
// thread, the kernel is meant to run at HBM bandwidth (~3 TB/s on H100: ~6.7 us per 1M fp32
// parameters).
#pragma once

#include <cstring>

#include "common.cuh"

namespace engm_fast {
namespace cuda {

struct SgdTensorMeta {
  void* param;
  const void* grad;
  void* buf;            // nullptr when momentum == 0
  int64_t numel;        // > 0
  int64_t chunk_begin;  // chunks of all previous entries
  int32_t dtype;        // ElemType
  int32_t reserved;     // padding to a multiple of 8 bytes, written 0
};

struct SgdHyper {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, first_step;
};

// Elements per CTA. 16384 (a quarter of torch's 65536) so that mid-sized models still give
// several CTAs per SM: ResNet-18 (62 tensors, 11.7M parameters) -> 759 CTAs on 132 SMs,
// against 227 with 65536, which would leave ~1.7 CTAs per SM, too few loads in flight for HBM.
constexpr int64_t kSgdChunk = 16384;
// 256 threads, 2 vectors of p, g and buf in flight per thread (96 bytes), at most 80 registers
// (3 CTAs per SM: 768 threads, ~72 KiB of loads in flight per SM, several times what
// bandwidth x latency needs: ~3.35 TB/s x ~0.8 us / 132 SMs ~ 20 KiB). Measured with ptxas
// (sm_90): 80 registers, no spills; ILP 4 at 64-80 registers spilled 400-640 bytes.
constexpr int kSgdThreads = 256;
constexpr int kSgdMinBlocks = 3;
constexpr int kSgdIlp = 2;

template <typename T>
struct alignas(16) SgdPack {
  T v[16 / sizeof(T)];
};

// 16-byte global accesses with the streaming hint (ld/st.global.cs: every byte is touched once,
// evict first). The pointers come from device-memory metadata, so without the intrinsics the
// compiler emits generic LD/ST, not LDG/STG. ld.global.cs is coherent, as p and buf need: they
// are read, then written, by the same thread.
template <typename T>
__device__ __forceinline__ SgdPack<T> load_pack(const SgdPack<T>* p) {
  const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
  SgdPack<T> r;
  memcpy(&r, &u, sizeof(r));
  return r;
}

template <typename T>
__device__ __forceinline__ void store_pack(SgdPack<T>* p, const SgdPack<T>& v) {
  uint4 u;
  memcpy(&u, &v, sizeof(u));
  __stcs(reinterpret_cast<uint4*>(p), u);
}

template <typename T>
struct SgdMath {
  using A = acc_t<T>;
  A lr, momentum, damp1, weight_decay;
  bool has_momentum, has_weight_decay, nesterov, first_step;

  __device__ __forceinline__ explicit SgdMath(const SgdHyper& h)
      : lr(static_cast<A>(h.lr)),
        momentum(static_cast<A>(h.momentum)),
        damp1(static_cast<A>(1.0 - h.dampening)),  // reference: alpha = 1 - dampening, a Python float
        weight_decay(static_cast<A>(h.weight_decay)),
        has_momentum(h.momentum != 0.0),
        has_weight_decay(h.weight_decay != 0.0),
        nesterov(h.nesterov),
        first_step(h.first_step) {}

  // One element: p and buf updated in place (buf ignored without momentum).
  __device__ __forceinline__ void apply(T& p, T g, T& buf) const {
    const A pv = to_acc(p);
    A d = to_acc(g);
    if (has_weight_decay) d = d + weight_decay * pv;
    if (has_momentum) {
      const A bv = first_step ? d : momentum * to_acc(buf) + damp1 * d;
      buf = from_acc<T>(bv);
      const A stored = to_acc(buf);
      d = nesterov ? d + momentum * stored : stored;
    }
    p = from_acc<T>(pv - lr * d);
  }
};

template <typename T>
__device__ __forceinline__ void sgd_update_range(const SgdTensorMeta& m, int64_t begin, int64_t end,
                                                 const SgdHyper& h) {
  const SgdMath<T> math(h);
  T* const p = static_cast<T*>(m.param);
  const T* const g = static_cast<const T*>(m.grad);
  T* const buf = static_cast<T*>(m.buf);
  const bool with_buf = math.has_momentum;
  const int tid = static_cast<int>(threadIdx.x);
  constexpr int kVec = static_cast<int>(16 / sizeof(T));

  const bool aligned = (reinterpret_cast<uintptr_t>(p) % 16 == 0) && (reinterpret_cast<uintptr_t>(g) % 16 == 0) &&
                       (!with_buf || reinterpret_cast<uintptr_t>(buf) % 16 == 0);
  int64_t scalar_begin = begin;
  if (aligned) {
    // begin is a multiple of kSgdChunk, hence of kVec: p + begin is 16-byte aligned.
    const int64_t nvec = (end - begin) / kVec;
    SgdPack<T>* pv = reinterpret_cast<SgdPack<T>*>(p + begin);
    const SgdPack<T>* gv = reinterpret_cast<const SgdPack<T>*>(g + begin);
    SgdPack<T>* bv = with_buf ? reinterpret_cast<SgdPack<T>*>(buf + begin) : nullptr;
    for (int64_t v0 = tid; v0 < nvec; v0 += static_cast<int64_t>(kSgdThreads) * kSgdIlp) {
      SgdPack<T> rp[kSgdIlp], rg[kSgdIlp], rb[kSgdIlp];
#pragma unroll
      for (int u = 0; u < kSgdIlp; ++u) {
        const int64_t v = v0 + static_cast<int64_t>(u) * kSgdThreads;
        if (v < nvec) {
          rp[u] = load_pack(pv + v);
          rg[u] = load_pack(gv + v);
          if (with_buf) rb[u] = load_pack(bv + v);
        }
      }
#pragma unroll
      for (int u = 0; u < kSgdIlp; ++u) {
        const int64_t v = v0 + static_cast<int64_t>(u) * kSgdThreads;
        if (v < nvec) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) math.apply(rp[u].v[e], rg[u].v[e], rb[u].v[e]);
          store_pack(pv + v, rp[u]);
          if (with_buf) store_pack(bv + v, rb[u]);
        }
      }
    }
    scalar_begin = begin + nvec * kVec;
  }
  // Unaligned tensors, and the < kVec elements at the end of an aligned one.
  for (int64_t e0 = scalar_begin + tid; e0 < end; e0 += static_cast<int64_t>(kSgdThreads) * kSgdIlp) {
    T rp[kSgdIlp], rg[kSgdIlp], rb[kSgdIlp];
#pragma unroll
    for (int u = 0; u < kSgdIlp; ++u) {
      const int64_t e = e0 + static_cast<int64_t>(u) * kSgdThreads;
      if (e < end) {
        rp[u] = p[e];
        rg[u] = g[e];
        rb[u] = with_buf ? buf[e] : rp[u];
      }
    }
#pragma unroll
    for (int u = 0; u < kSgdIlp; ++u) {
      const int64_t e = e0 + static_cast<int64_t>(u) * kSgdThreads;
      if (e < end) {
        math.apply(rp[u], rg[u], rb[u]);
        p[e] = rp[u];
        if (with_buf) buf[e] = rb[u];
      }
    }
  }
}

// Chunks of a tensor of `numel` elements.
inline int64_t sgd_chunks(int64_t numel) { return ceil_div(numel, kSgdChunk); }

// meta_device: n_tensors entries in device memory (see the layout above), all non-empty;
// total_chunks: sum of sgd_chunks(numel). Asynchronous on `stream`. Defined, with its
// kernel, in sgd_momentum.cu (a non-template kernel defined in a header would be defined once
// per including translation unit).
cudaError_t launch_sgd_momentum(const SgdTensorMeta* meta_device, int n_tensors, int64_t total_chunks,
                                const SgdHyper& h, cudaStream_t stream);

}  // namespace cuda
}  // namespace engm_fast
