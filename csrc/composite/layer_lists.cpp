// The layer-list ops (schemas in csrc/ops.cpp): the engine's per-step finalize in one call.
//
//   per_example_sqnorms(a, b, modes, acc_dtype)  sum_j per_example_sqnorm(a_j, b_j, modes_j)
//   weighted_outer_sums_(a, b, w, out)           out_j += weighted_outer_sum(a_j, b_j, w)
//
// Composite: each layer's norms go through the dispatcher to the registered per-layer op, and
// float32 / float64 weighted sums are one ATen addmm_ into the output (no temporary of the
// weight's size; 16-bit ones take the per-layer op for its rounding), so these run on every
// device that has per-layer kernels (CPU, CUDA) from this one file, with no Python between
// layers. Registered as CompositeExplicitAutograd: the engine calls them under
// no_grad on detached records, and their fake implementations live next to the wrappers
// (engm_fast/ops).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace engm_fast {
namespace {

at::Tensor per_example_sqnorm_op(const at::Tensor& a, const at::Tensor& b, c10::string_view mode, at::ScalarType acc) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("engm_fast::per_example_sqnorm", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, at::ScalarType)>();
  return op.call(a, b, mode, acc);
}

at::Tensor weighted_outer_sum_op(const at::Tensor& a, const at::Tensor& b, const at::Tensor& w) {  // 16-bit
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("engm_fast::weighted_outer_sum", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(a, b, w);
}

void check_lists(at::TensorList a, at::TensorList b, const char* op) {
  TORCH_CHECK(!a.empty() && a.size() == b.size(), op, ": a and b must be non-empty lists of the same length, got ",
              a.size(), " and ", b.size());
}

at::Tensor per_example_sqnorms(at::TensorList a, at::TensorList b, std::vector<std::string> modes,
                               at::ScalarType acc_dtype) {
  check_lists(a, b, "per_example_sqnorms");
  TORCH_CHECK(modes.size() == a.size(), "per_example_sqnorms: ", modes.size(), " modes for ", a.size(), " layers");
  at::Tensor total = per_example_sqnorm_op(a[0], b[0], modes[0], acc_dtype);
  for (size_t j = 1; j < a.size(); ++j) {
    const at::Tensor n2 = per_example_sqnorm_op(a[j], b[j], modes[j], acc_dtype);
    TORCH_CHECK(n2.sizes() == total.sizes(), "per_example_sqnorms: layer ", j, " has a batch of ", n2.size(0),
                ", layer 0 of ", total.size(0));
    total.add_(n2);
  }
  return total;
}

// out += (w * b)^T a with the weight folded into the smaller operand and the product added
// straight into out (addmm_): no [d_out, d_in] temporary. For float32 and float64 inputs this is
// weighted_outer_sum's arithmetic exactly (its inner rounding is the acc product's own); 16-bit
// inputs take the per-layer op, whose operand rounding round_D(w_r b_r) the contract fixes, and
// add its result.
void add_weighted_outer(const at::Tensor& a, const at::Tensor& b, const at::Tensor& w, const at::Tensor& out,
                        size_t j) {
  const int64_t B = a.size(0);
  const at::Tensor a3 = (a.dim() == 2 ? a.unsqueeze(1) : a).detach();
  const at::Tensor b3 = (b.dim() == 2 ? b.unsqueeze(1) : b).detach();
  const int64_t T = a3.size(1), d_in = a3.size(2), d_out = b3.size(2);
  TORCH_CHECK(out.is_contiguous() && out.numel() == d_in * d_out && out.scalar_type() == a.scalar_type() &&
                  out.device() == a.device(),
              "weighted_outer_sums_: out[", j, "] must be a contiguous ", a.scalar_type(), " tensor on ", a.device(),
              " of ", d_in * d_out, " elements, got ", out.scalar_type(), " ", out.sizes(), " on ", out.device());
  at::Tensor target = out.view({d_out, d_in});
  if (a.scalar_type() != w.scalar_type()) {  // 16-bit inputs: the op's rounding, then the addition
    target.add_(weighted_outer_sum_op(a, b, w));
    return;
  }
  TORCH_CHECK(w.dim() == 1 && w.size(0) == B, "weighted_outer_sums_: w must be [B] = [", B, "], got ", w.sizes());
  const at::Tensor wv = w.detach().view({B, 1, 1});
  if (d_out <= d_in) {
    target.addmm_((b3 * wv).reshape({B * T, d_out}).t(), a3.reshape({B * T, d_in}));
  } else {
    target.addmm_(b3.reshape({B * T, d_out}).t(), (a3 * wv).reshape({B * T, d_in}));
  }
}

void weighted_outer_sums_(at::TensorList a, at::TensorList b, const at::Tensor& w, at::TensorList out) {
  check_lists(a, b, "weighted_outer_sums_");
  TORCH_CHECK(out.size() == a.size(), "weighted_outer_sums_: ", out.size(), " outputs for ", a.size(), " layers");
  for (size_t j = 0; j < a.size(); ++j) {
    TORCH_CHECK(a[j].dim() >= 2 && b[j].dim() == a[j].dim() && a[j].size(0) == b[j].size(0) &&
                    a[j].scalar_type() == b[j].scalar_type(),
                "weighted_outer_sums_: layer ", j, ": a and b must both be [B, T, d] or [B, d] of one dtype, got ",
                a[j].sizes(), " and ", b[j].sizes());
    add_weighted_outer(a[j], b[j], w, out[j], j);
  }
}

}  // namespace
}  // namespace engm_fast

TORCH_LIBRARY_IMPL(engm_fast, CompositeExplicitAutograd, m) {
  m.impl("per_example_sqnorms", &engm_fast::per_example_sqnorms);
  m.impl("weighted_outer_sums_", &engm_fast::weighted_outer_sums_);
}
