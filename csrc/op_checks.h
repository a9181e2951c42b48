// Argument checks of the engm_fast ops, shared by the native backends (csrc/cpu, csrc/cuda).
//
// The op wrappers of engm_fast/ops check every argument first (engm_fast/reference.py:
// check_rows, check_weights, check_update_args) and decide what the kernels are given: the
// route of per_example_sqnorm ("ghost" or "direct") and the accumulation dtype. The checks here
// are the ones the kernels' memory accesses depend on, for callers of torch.ops.engm_fast.*
// that bypass the wrappers: ranks and sizes the kernels index with, dtypes they are compiled
// for, one device, and the values of the explicit mode and accumulation dtype. They do not
// decide anything: which route and which accumulation dtype is the wrappers' business.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <cstdint>
#include <optional>

namespace engm_fast {

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// a and b of per_example_sqnorm / weighted_outer_sum as [B, T, d] views ([B, d] inputs are
// T = 1), detached (the kernels call ATen ops on slices and must not build autograd graphs);
// each backend makes the layout its kernels read.
struct BatchedRows {
  at::Tensor a, b;
  int64_t B, T, d_in, d_out;
};

inline BatchedRows batched_rows(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(
      (a.dim() == 2 || a.dim() == 3) && b.dim() == a.dim(),
      op, ": a and b must both be [B, T, d] or both [B, d]; got a ", a.sizes(), " and b ",
      b.sizes());
  TORCH_CHECK(
      a.size(0) == b.size(0) && (a.dim() == 2 || a.size(1) == b.size(1)),
      op, ": a and b must agree in B (and T); got a ", a.sizes(), " and b ", b.sizes());
  TORCH_CHECK(
      a.scalar_type() == b.scalar_type() && is_supported_dtype(a.scalar_type()),
      op, ": a and b must share one dtype among float16, bfloat16, float32, float64; got ",
      a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(
      a.device() == b.device(),
      op, ": a and b are on different devices (", a.device(), ", ", b.device(), ")");
  BatchedRows r;
  r.a = (a.dim() == 2 ? a.unsqueeze(1) : a).detach();
  r.b = (b.dim() == 2 ? b.unsqueeze(1) : b).detach();
  r.B = r.a.size(0);
  r.T = r.a.size(1);
  r.d_in = r.a.size(2);
  r.d_out = r.b.size(2);
  return r;
}

// per_example_sqnorm's explicit route: true for "ghost", false for "direct".
inline bool is_ghost_mode(c10::string_view mode) {
  TORCH_CHECK(
      mode == "ghost" || mode == "direct",
      "per_example_sqnorm: mode must be 'ghost' or 'direct' (engm_fast.ops.per_example_sqnorm resolves "
      "'auto'), got '", mode, "'");
  return mode == "ghost";
}

// The accumulation dtype a kernel is asked to sum in (per_example_sqnorm's acc_dtype,
// weighted_outer_sum's w.dtype).
inline void check_accumulation_dtype(at::ScalarType acc, const char* op, const char* what) {
  TORCH_CHECK(
      acc == at::kFloat || acc == at::kDouble,
      op, ": ", what, " must be float32 or float64 (the accumulation dtype), got ", acc);
}

// weighted_outer_sum's weights: [B], in the accumulation dtype, on the inputs' device.
inline void check_weights(const at::Tensor& w, const BatchedRows& r, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(
      w.dim() == 1 && w.size(0) == r.B,
      "weighted_outer_sum: w must be [B] = [", r.B, "], got ", w.sizes(), " (a ", a.sizes(),
      ", b ", b.sizes(), ")");
  TORCH_CHECK(
      w.device() == r.a.device(),
      "weighted_outer_sum: w is on ", w.device(), ", a and b on ", r.a.device());
  check_accumulation_dtype(w.scalar_type(), "weighted_outer_sum", "w");
}

// sgd_momentum_update_'s lists: one grad (and, with momentum, one buffer) per param, of the
// param's shape and supported dtype, all on one device. Returns that device (nullopt when
// there are no params).
inline std::optional<at::Device> check_update_args(
    at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, bool has_momentum) {
  TORCH_CHECK_VALUE(
      params.size() == grads.size() && (!has_momentum || momentum_buffers.size() == params.size()),
      "sgd_momentum_update_: got ", params.size(), " params, ", grads.size(), " grads and ",
      momentum_buffers.size(),
      " momentum buffers (buffers: one per param when momentum != 0)");
  if (params.empty()) {
    return std::nullopt;
  }
  const at::Device device = params[0].device();
  for (const auto i : c10::irange(params.size())) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK_VALUE(
        p.sizes() == g.sizes(), "sgd_momentum_update_: param ", i, " has shape ", p.sizes(),
        ", grad ", g.sizes());
    TORCH_CHECK_TYPE(
        is_supported_dtype(p.scalar_type()) && g.scalar_type() == p.scalar_type(),
        "sgd_momentum_update_: param ", i, " and its grad must share one dtype among float16, "
        "bfloat16, float32, float64; got ", p.scalar_type(), " and ", g.scalar_type());
    TORCH_CHECK_VALUE(
        p.device() == device && g.device() == device, "sgd_momentum_update_: param ", i,
        " is on ", p.device(), " and its grad on ", g.device(), "; all tensors must be on ", device);
    if (has_momentum) {
      const at::Tensor& buf = momentum_buffers[i];
      TORCH_CHECK_VALUE(
          buf.sizes() == p.sizes(), "sgd_momentum_update_: momentum buffer ", i, " has shape ",
          buf.sizes(), ", param ", p.sizes());
      TORCH_CHECK_TYPE(
          buf.scalar_type() == p.scalar_type(), "sgd_momentum_update_: momentum buffer ", i,
          " is ", buf.scalar_type(), ", its param ", p.scalar_type(), " (they must match)");
      TORCH_CHECK_VALUE(
          buf.device() == device, "sgd_momentum_update_: momentum buffer ", i, " is on ",
          buf.device(), "; all tensors must be on ", device);
    }
  }
  return device;
}

}  // namespace engm_fast
