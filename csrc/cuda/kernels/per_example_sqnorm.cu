// Torch-free translation unit: the per_example_sqnorm kernels (all three routes) for fp16,
// bf16, float and double. Compiled into the extension by setup.py and, for sm_80 and sm_90,
// by the CMake target cuda_compile_check.
#include "torch_build_flags.cuh"  // first: the half/bf16 restrictions of torch's builds

#define ENGM_FAST_SQNORM_DEFINE_INSTANCES
#include "per_example_sqnorm.cuh"

namespace engm_fast {
namespace cuda {

ENGM_FAST_SQNORM_LAUNCHER(__half)
ENGM_FAST_SQNORM_LAUNCHER(__nv_bfloat16)
ENGM_FAST_SQNORM_LAUNCHER(float)
ENGM_FAST_SQNORM_LAUNCHER(double)

}  // namespace cuda
}  // namespace engm_fast
