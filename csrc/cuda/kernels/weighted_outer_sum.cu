// Torch-free translation unit: the weighted_outer_sum kernels (split-K GEMM with the weights
// applied on load, split reduction) for fp16, bf16, float and double. Compiled into the
// extension by setup.py and, for sm_80 and sm_90, by the CMake target cuda_compile_check.
#include "torch_build_flags.cuh"  // first: the half/bf16 restrictions of torch's builds

#define ENGM_FAST_WEIGHTED_DEFINE_INSTANCES
#include "weighted_outer_sum.cuh"

namespace engm_fast {
namespace cuda {

ENGM_FAST_WEIGHTED_PLAN(__half)
ENGM_FAST_WEIGHTED_PLAN(__nv_bfloat16)
ENGM_FAST_WEIGHTED_PLAN(float)
ENGM_FAST_WEIGHTED_PLAN(double)
ENGM_FAST_WEIGHTED_LAUNCHER(__half)
ENGM_FAST_WEIGHTED_LAUNCHER(__nv_bfloat16)
ENGM_FAST_WEIGHTED_LAUNCHER(float)
ENGM_FAST_WEIGHTED_LAUNCHER(double)

}  // namespace cuda
}  // namespace engm_fast
