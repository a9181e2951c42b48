// The half / bfloat16 restrictions torch's CUDA extensions compile under
// (torch.utils.cpp_extension adds them to every nvcc command line). The torch-free translation
// units include this first, so the CMake compile check rejects what the extension build would:
// implicit conversions and operators of __half / __nv_bfloat16.
#pragma once

#ifndef __CUDA_NO_HALF_OPERATORS__
#define __CUDA_NO_HALF_OPERATORS__
#endif
#ifndef __CUDA_NO_HALF_CONVERSIONS__
#define __CUDA_NO_HALF_CONVERSIONS__
#endif
#ifndef __CUDA_NO_BFLOAT16_CONVERSIONS__
#define __CUDA_NO_BFLOAT16_CONVERSIONS__
#endif
#ifndef __CUDA_NO_HALF2_OPERATORS__
#define __CUDA_NO_HALF2_OPERATORS__
#endif
