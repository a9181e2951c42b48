// CUDA implementations of the engm_fast ops (schemas in csrc/ops.cpp): the thin binding.
//
// Checks (csrc/op_checks.h, shared with the CPU path), dtype dispatch, workspace allocation
// through torch's caching allocator, and launches on the current stream. What the ops compute
// is the contract of engm_fast/reference.py; the op wrappers of engm_fast/ops decide the route
// and the accumulation dtype and pass them in. The kernels are torch-free
// (csrc/cuda/kernels/*.cuh) and compiled, with their explicit instantiations, in
// csrc/cuda/kernels/*.cu; this file only calls their host launchers.
//
//   per_example_sqnorm(a, b, mode, acc_dtype)  -> [B] in acc_dtype
//     "ghost" -> the row-norm kernel when T == 1 (1 x 1 Gram matrices), else the ghost kernel;
//     "direct" -> the direct kernel.
//   weighted_outer_sum(a, b, w)     -> [d_out, d_in] in a's dtype; w in the accumulation dtype
//     (the kernels fold it into b on load and round each product to the inputs' dtype).
//   sgd_momentum_update_(params, grads, momentum_buffers, ...)  one launch for all tensors.
//
// The kernels are instantiated for one accumulation type per element type (kernels/common.cuh,
// AccType: the types reference.accumulation_dtype names); an acc_dtype (or w dtype) they were
// not built for is refused with an error naming both.
//
// Requirements: compute capability 8.0 or newer; inputs on one CUDA device. Inputs whose
// last dimension is not contiguous are copied (the kernels read features contiguously);
// other strides are passed through.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <vector>

#include "cuda/kernels/per_example_sqnorm.cuh"
#include "cuda/kernels/sgd_momentum.cuh"
#include "cuda/kernels/weighted_outer_sum.cuh"
#include "op_checks.h"

namespace engm_fast {
namespace {

namespace kc = engm_fast::cuda;

// at::Half / at::BFloat16 are 16-bit structs with the IEEE / bfloat16 bit layouts of __half /
// __nv_bfloat16; the kernels see the same bytes under the CUDA types.
template <typename scalar_t>
struct CudaScalar {
  using type = scalar_t;
};
template <>
struct CudaScalar<at::Half> {
  using type = __half;
};
template <>
struct CudaScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};
static_assert(sizeof(at::Half) == sizeof(__half) && alignof(at::Half) == alignof(__half), "fp16 layout");
static_assert(sizeof(at::BFloat16) == sizeof(__nv_bfloat16) && alignof(at::BFloat16) == alignof(__nv_bfloat16),
              "bf16 layout");

// The accumulation dtype the kernels for element type T are instantiated with.
template <typename T>
constexpr at::ScalarType kernel_accumulation_dtype() {
  return c10::CppTypeToScalarType<kc::acc_t<T>>::value;
}

// Refuses an accumulation dtype the kernels for `input` (element type T) were not built for.
template <typename T>
void check_kernel_accumulation(at::ScalarType requested, at::ScalarType input, const char* op, const char* what) {
  TORCH_CHECK(requested == kernel_accumulation_dtype<T>(), op, " (CUDA): the kernels accumulate ", input,
              " inputs in ", kernel_accumulation_dtype<T>(), "; got ", what, " ", requested);
}

// The kernels use cp.async and bf16 tensor-core MMA (sm_80+).
void check_device(const at::Device& device, const char* op) {
  TORCH_CHECK(device.is_cuda(), op, ": expected CUDA tensors, got a tensor on ", device);
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device.index());
  TORCH_CHECK(prop->major >= 8, op, ": the engm_fast CUDA kernels need compute capability 8.0 or newer; ", device,
              " (", prop->name, ") is ", prop->major, ".", prop->minor);
}

// Stride of dim for the kernels: 0 for a dimension of size 1 (never stepped over), so that a
// meaningless stride does not disable aligned vector copies.
int64_t kernel_stride(const at::Tensor& x, int64_t dim) { return x.size(dim) == 1 ? 0 : x.stride(dim); }

// a and b as [B, T, d] with a contiguous last dimension, after the checks of csrc/op_checks.h.
at::Tensor last_dim_contiguous(const at::Tensor& x) {
  return x.size(2) > 1 && x.stride(2) != 1 ? x.contiguous() : x;
}

BatchedRows cuda_rows(const at::Tensor& a, const at::Tensor& b, const char* op) {
  BatchedRows r = batched_rows(a, b, op);
  check_device(r.a.device(), op);
  r.a = last_dim_contiguous(r.a);
  r.b = last_dim_contiguous(r.b);
  return r;
}

at::Tensor per_example_sqnorm_cuda(const at::Tensor& a, const at::Tensor& b, c10::string_view mode,
                                   at::ScalarType acc) {
  const bool ghost = is_ghost_mode(mode);
  check_accumulation_dtype(acc, "per_example_sqnorm", "acc_dtype");
  const BatchedRows r = cuda_rows(a, b, "per_example_sqnorm");
  const c10::cuda::CUDAGuard device_guard(r.a.device());
  if (r.T == 0 || r.d_in == 0 || r.d_out == 0) {
    return at::zeros({r.B}, r.a.options().dtype(acc));  // empty sums (also covers B == 0)
  }
  at::Tensor out = at::empty({r.B}, r.a.options().dtype(acc));
  if (r.B == 0) return out;
  const kc::SqnormRoute route =
      !ghost ? kc::SqnormRoute::kDirect : (r.T == 1 ? kc::SqnormRoute::kRowNorms : kc::SqnormRoute::kGhost);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.a.scalar_type(), "per_example_sqnorm_cuda", [&] {
    using T = typename CudaScalar<scalar_t>::type;
    using A = kc::acc_t<T>;
    check_kernel_accumulation<T>(acc, r.a.scalar_type(), "per_example_sqnorm", "acc_dtype");
    const int64_t ws_elems = kc::per_example_sqnorm_workspace<T>(route, r.B, r.T, r.d_in, r.d_out);
    at::Tensor ws = ws_elems > 0 ? at::empty({ws_elems}, r.a.options().dtype(acc)) : at::Tensor();
    const kc::Rows3<T> ra{reinterpret_cast<const T*>(r.a.const_data_ptr<scalar_t>()), kernel_stride(r.a, 0),
                          kernel_stride(r.a, 1)};
    const kc::Rows3<T> rb{reinterpret_cast<const T*>(r.b.const_data_ptr<scalar_t>()), kernel_stride(r.b, 0),
                          kernel_stride(r.b, 1)};
    C10_CUDA_CHECK(kc::launch_per_example_sqnorm<T>(route, ra, rb, r.B, r.T, r.d_in, r.d_out,
                                                    ws_elems > 0 ? ws.mutable_data_ptr<A>() : nullptr,
                                                    out.mutable_data_ptr<A>(), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// [B, T, d] (last dimension contiguous) as [B*T, d] rows with a contiguous last dimension.
at::Tensor as_rows(const at::Tensor& x3) {
  at::Tensor y = x3.reshape({x3.size(0) * x3.size(1), x3.size(2)});  // a copy only if not viewable
  if (y.size(1) > 1 && y.stride(1) != 1) y = y.contiguous();
  return y;
}

at::Tensor weighted_outer_sum_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& w) {
  const BatchedRows r = cuda_rows(a, b, "weighted_outer_sum");
  check_weights(w, r, a, b);
  const c10::cuda::CUDAGuard device_guard(r.a.device());
  const int64_t B = r.B, T = r.T, d_in = r.d_in, d_out = r.d_out;
  const at::ScalarType dtype = r.a.scalar_type();
  const at::ScalarType acc = w.scalar_type();
  if (B * T == 0 || d_in == 0 || d_out == 0) {
    return at::zeros({d_out, d_in}, r.a.options());
  }
  const at::Tensor a_rows = as_rows(r.a);
  const at::Tensor b_rows = as_rows(r.b);
  const at::Tensor w_acc = w.detach().contiguous();  // the kernels read w[k / T]
  at::Tensor out = at::empty({d_out, d_in}, r.a.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "weighted_outer_sum_cuda", [&] {
    using T_ = typename CudaScalar<scalar_t>::type;
    using A = kc::acc_t<T_>;
    check_kernel_accumulation<T_>(acc, dtype, "weighted_outer_sum", "w of dtype");
    kc::WeightedOuterSumPlan plan;
    C10_CUDA_CHECK(kc::plan_weighted_outer_sum<T_>(B * T, d_in, d_out, &plan));
    at::Tensor ws = plan.ws_elems > 0 ? at::empty({plan.ws_elems}, r.a.options().dtype(acc)) : at::Tensor();
    C10_CUDA_CHECK(kc::launch_weighted_outer_sum<T_>(
        plan, reinterpret_cast<const T_*>(a_rows.const_data_ptr<scalar_t>()), kernel_stride(a_rows, 0),
        reinterpret_cast<const T_*>(b_rows.const_data_ptr<scalar_t>()), kernel_stride(b_rows, 0),
        w_acc.const_data_ptr<A>(), T, B * T, d_in, d_out, plan.ws_elems > 0 ? ws.mutable_data_ptr<A>() : nullptr,
        reinterpret_cast<T_*>(out.mutable_data_ptr<scalar_t>()), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

kc::ElemType elem_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return kc::ElemType::kHalf;
    case at::kBFloat16:
      return kc::ElemType::kBFloat16;
    case at::kFloat:
      return kc::ElemType::kFloat;
    default:
      return kc::ElemType::kDouble;  // callers checked is_supported_dtype
  }
}

// x itself when it is dense with the strides of `like` (then the three tensors of a triple are
// updated as flat arrays element by element), else a copy of x with like's layout.
at::Tensor with_layout_of(const at::Tensor& x, const at::Tensor& like) {
  if (x.is_non_overlapping_and_dense() && x.strides() == like.strides()) return x;
  return at::empty_like(like).copy_(x);
}

void sgd_momentum_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                              double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                              bool first_step) {
  const bool has_momentum = momentum != 0.0;
  const std::optional<at::Device> checked = check_update_args(params, grads, momentum_buffers, has_momentum);
  if (!checked) return;
  const at::Device device = *checked;
  check_device(device, "sgd_momentum_update_");
  const c10::cuda::CUDAGuard device_guard(device);

  // Tensors the kernel updates, and the write-backs for params / buffers that had to be copied
  // (not dense, or a layout differing within the triple).
  std::vector<at::Tensor> keep_alive;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (original, updated copy)
  std::vector<kc::SgdTensorMeta> meta;
  int64_t total_chunks = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    at::Tensor p_k = p.is_non_overlapping_and_dense() ? p : p.contiguous();
    if (!p_k.is_same(p)) write_back.emplace_back(p, p_k);
    at::Tensor g_k = with_layout_of(grads[i], p_k);
    at::Tensor b_k;
    if (has_momentum) {
      b_k = with_layout_of(momentum_buffers[i], p_k);
      if (!b_k.is_same(momentum_buffers[i])) write_back.emplace_back(momentum_buffers[i], b_k);
    }
    kc::SgdTensorMeta m{};
    m.param = p_k.data_ptr();
    m.grad = g_k.const_data_ptr();
    m.buf = has_momentum ? b_k.data_ptr() : nullptr;
    m.numel = p_k.numel();
    m.chunk_begin = total_chunks;
    m.dtype = static_cast<int32_t>(elem_type(p.scalar_type()));
    m.reserved = 0;
    meta.push_back(m);
    total_chunks += kc::sgd_chunks(m.numel);
    keep_alive.push_back(std::move(p_k));
    keep_alive.push_back(std::move(g_k));
    if (has_momentum) keep_alive.push_back(std::move(b_k));
  }
  if (meta.empty()) return;
  TORCH_CHECK(meta.size() <= static_cast<size_t>(INT32_MAX), "sgd_momentum_update_: too many tensors (", meta.size(),
              ")");

  // Metadata to the device: pinned staging buffer, asynchronous copy on the current stream (the
  // caching host allocator keeps the pinned block until that copy has completed).
  const int64_t bytes = static_cast<int64_t>(meta.size() * sizeof(kc::SgdTensorMeta));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.mutable_data_ptr(), meta.data(), static_cast<size_t>(bytes));
  const at::Tensor dev = host.to(at::TensorOptions().device(device), /*non_blocking=*/true);

  kc::SgdHyper h{};
  h.lr = lr;
  h.momentum = momentum;
  h.dampening = dampening;
  h.weight_decay = weight_decay;
  h.nesterov = nesterov;
  h.first_step = first_step;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(kc::launch_sgd_momentum(reinterpret_cast<const kc::SgdTensorMeta*>(dev.const_data_ptr()),
                                         static_cast<int>(meta.size()), total_chunks, h, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (auto& [original, updated] : write_back) original.copy_(updated);
}

}  // namespace
}  // namespace engm_fast

TORCH_LIBRARY_IMPL(engm_fast, CUDA, m) {
  m.impl("per_example_sqnorm", &engm_fast::per_example_sqnorm_cuda);
  m.impl("weighted_outer_sum", &engm_fast::weighted_outer_sum_cuda);
  m.impl("sgd_momentum_update_", &engm_fast::sgd_momentum_update_cuda);
}
