// The layer-list ops (schemas in csrc/ops.cpp): the engine's per-step finalize in one call.
//
//   per_example_sqnorms(a, b, modes, acc_dtype)  sum_j per_example_sqnorm(a_j, b_j, modes_j)
//   weighted_outer_sums_(a, b, w, out)           out_j += weighted_outer_sum(a_j, b_j, w)
//
// Composite: each layer goes through the dispatcher to the registered per-layer op, so these
// run on every device that has per-layer kernels (CPU, CUDA) from this one file, with no
// Python between layers. Registered as CompositeExplicitAutograd: the engine calls them under
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

at::Tensor weighted_outer_sum_op(const at::Tensor& a, const at::Tensor& b, const at::Tensor& w) {
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

void weighted_outer_sums_(at::TensorList a, at::TensorList b, const at::Tensor& w, at::TensorList out) {
  check_lists(a, b, "weighted_outer_sums_");
  TORCH_CHECK(out.size() == a.size(), "weighted_outer_sums_: ", out.size(), " outputs for ", a.size(), " layers");
  for (size_t j = 0; j < a.size(); ++j) {
    const at::Tensor sum = weighted_outer_sum_op(a[j], b[j], w);
    const at::Tensor& o = out[j];
    TORCH_CHECK(o.is_contiguous() && o.numel() == sum.numel() && o.scalar_type() == sum.scalar_type() &&
                    o.device() == sum.device(),
                "weighted_outer_sums_: out[", j, "] must be a contiguous ", sum.scalar_type(), " tensor on ",
                sum.device(), " of ", sum.numel(), " elements, got ", o.scalar_type(), " ", o.sizes(), " on ",
                o.device());
    o.view(sum.sizes()).add_(sum);
  }
}

}  // namespace
}  // namespace engm_fast

TORCH_LIBRARY_IMPL(engm_fast, CompositeExplicitAutograd, m) {
  m.impl("per_example_sqnorms", &engm_fast::per_example_sqnorms);
  m.impl("weighted_outer_sums_", &engm_fast::weighted_outer_sums_);
}
