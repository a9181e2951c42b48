// Torch-free translation unit: the multi-tensor SGD-momentum kernel (all four element types in
// one kernel, selected per tensor) and its launcher. Compiled into the extension by setup.py
// and, for sm_80 and sm_90, by the CMake target cuda_compile_check.
#include "torch_build_flags.cuh"  // first: the half/bf16 restrictions of torch's builds

#include "sgd_momentum.cuh"

namespace engm_fast {
namespace cuda {
namespace {

// Grid: total_chunks CTAs of kSgdThreads threads; CTA c updates one chunk of one tensor.
__global__ void __launch_bounds__(kSgdThreads, kSgdMinBlocks)
    sgd_momentum_multi_tensor_kernel(const SgdTensorMeta* __restrict__ meta, int n_tensors, const SgdHyper h) {
  __shared__ int tensor_index;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x);
  if (threadIdx.x == 0) {
    // Largest j with meta[j].chunk_begin <= chunk; entries are non-empty, so begins strictly
    // increase and that j is the tensor owning the chunk. log2(n_tensors) reads, cached in L1.
    int lo = 0, hi = n_tensors - 1;
    while (lo < hi) {
      const int mid = lo + (hi - lo + 1) / 2;
      if (meta[mid].chunk_begin <= chunk) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    tensor_index = lo;
  }
  __syncthreads();
  const SgdTensorMeta m = meta[tensor_index];
  const int64_t begin = (chunk - m.chunk_begin) * kSgdChunk;
  const int64_t end = min64(m.numel, begin + kSgdChunk);
  switch (static_cast<ElemType>(m.dtype)) {
    case ElemType::kHalf:
      sgd_update_range<__half>(m, begin, end, h);
      break;
    case ElemType::kBFloat16:
      sgd_update_range<__nv_bfloat16>(m, begin, end, h);
      break;
    case ElemType::kFloat:
      sgd_update_range<float>(m, begin, end, h);
      break;
    case ElemType::kDouble:
      sgd_update_range<double>(m, begin, end, h);
      break;
  }
}

}  // namespace

cudaError_t launch_sgd_momentum(const SgdTensorMeta* meta_device, int n_tensors, int64_t total_chunks,
                                const SgdHyper& h, cudaStream_t stream) {
  if (n_tensors <= 0 || total_chunks <= 0) return cudaSuccess;
  if (total_chunks > kMaxGridX) return cudaErrorInvalidConfiguration;
  ENGM_FAST_LAUNCH(sgd_momentum_multi_tensor_kernel, static_cast<unsigned>(total_chunks), kSgdThreads, 0, stream,
                   meta_device, n_tensors, h);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace engm_fast
