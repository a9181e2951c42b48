// CPU implementation of engm_fast::sgd_momentum_update_ (schema in csrc/ops.cpp), the fused
// torch.optim.SGD step whose arithmetic and rounding engm_fast/reference.py defines:
//
//   d   = grad + weight_decay * param                 (weight_decay == 0: d = grad)
//   m   = d  (first_step)  |  momentum * buf + (1 - dampening) * d    (no buffer when momentum == 0)
//   buf = round(m)
//   s   = d + momentum * buf  (nesterov)  |  buf
//   param = round(param - lr * s)
//
// in the accumulation dtype (at::opmath_type: float32 for float16 / bfloat16 / float32 tensors,
// float64 for float64, as reference.accumulation_dtype), each stored value rounded once. One
// pass over memory per element (read param, grad, buf; write param, buf) instead of the
// reference's elementwise ATen passes.
//
// Threading: the elements of all tensors form one index range [0, total) that a single
// at::parallel_for splits, so a model with many small tensors (biases, norms) pays for one
// parallel region, not one per tensor. Tensors whose param, grad and buffer share one dense
// layout (contiguous, channels_last, ...) are updated in place through their data pointers;
// others are updated through contiguous copies that are written back.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "op_checks.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace engm_fast {
namespace {

struct Hyper {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, first_step;
};

// Elements [begin, end) of one tensor triple (raw pointers into dense memory of equal layout).
template <typename scalar_t>
void update_range(
    scalar_t* p, const scalar_t* g, scalar_t* buf, int64_t begin, int64_t end, const Hyper& h) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t lr = static_cast<opmath_t>(h.lr);
  const opmath_t mu = static_cast<opmath_t>(h.momentum);
  const opmath_t keep = static_cast<opmath_t>(1.0 - h.dampening);
  const opmath_t wd = static_cast<opmath_t>(h.weight_decay);
  const bool has_wd = h.weight_decay != 0.0;
  if (buf == nullptr) {  // momentum == 0: plain SGD
    for (int64_t j = begin; j < end; ++j) {
      const opmath_t pj = static_cast<opmath_t>(p[j]);
      opmath_t d = static_cast<opmath_t>(g[j]);
      if (has_wd) {
        d = d + wd * pj;
      }
      p[j] = static_cast<scalar_t>(pj - lr * d);
    }
    return;
  }
  for (int64_t j = begin; j < end; ++j) {
    const opmath_t pj = static_cast<opmath_t>(p[j]);
    opmath_t d = static_cast<opmath_t>(g[j]);
    if (has_wd) {
      d = d + wd * pj;
    }
    const opmath_t b = h.first_step ? d : mu * static_cast<opmath_t>(buf[j]) + keep * d;
    buf[j] = static_cast<scalar_t>(b);
    // The step uses the buffer as stored (the contract): for 16-bit buffers the rounded value,
    // so that the parameter moves by exactly what the buffer carries to the next step.
    const opmath_t stored = static_cast<opmath_t>(buf[j]);
    const opmath_t step = h.nesterov ? d + mu * stored : stored;
    p[j] = static_cast<scalar_t>(pj - lr * step);
  }
}

// One tensor triple as the kernel sees it: dense memory of equal layout for param, grad and
// buffer (the buffer undefined when momentum == 0), and the tensors to copy back into when the
// caller's param / buffer did not have that layout.
struct Work {
  at::Tensor p, g, buf;
  at::Tensor p_out, buf_out;  // defined when p / buf are copies that must be written back
};

bool same_dense_layout(const at::Tensor& ref, const at::Tensor& t) {
  return !t.defined() || (t.is_non_overlapping_and_dense() && t.strides() == ref.strides());
}

void sgd_momentum_update_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
    double momentum, double dampening, double weight_decay, bool nesterov, bool first_step) {
  const bool has_momentum = momentum != 0.0;
  const std::optional<at::Device> device =
      check_update_args(params, grads, momentum_buffers, has_momentum);
  TORCH_CHECK_VALUE(
      !device || device->is_cpu(), "sgd_momentum_update_ (CPU): the tensors are on ", *device,
      "; all must be on the CPU");
  const Hyper h{lr, momentum, dampening, weight_decay, nesterov, first_step};

  std::vector<Work> work;
  work.reserve(params.size());
  for (const auto i : c10::irange(params.size())) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const at::Tensor buf = has_momentum ? momentum_buffers[i] : at::Tensor();
    Work w;
    if (p.is_non_overlapping_and_dense() && same_dense_layout(p, g) && same_dense_layout(p, buf)) {
      w.p = p;
      w.g = g;
      w.buf = buf;
    } else {
      w.p = p.contiguous();
      w.g = g.contiguous();
      w.buf = buf.defined() ? buf.contiguous() : buf;
      if (!w.p.is_same(p)) {
        w.p_out = p;
      }
      if (buf.defined() && !w.buf.is_same(buf)) {
        w.buf_out = buf;
      }
    }
    work.push_back(std::move(w));
  }

  // Prefix offsets of every tensor in the global index range.
  std::vector<int64_t> start(work.size() + 1, 0);
  for (const auto i : c10::irange(work.size())) {
    start[i + 1] = start[i] + work[i].p.numel();
  }
  const int64_t total = start.back();
  if (total > 0) {
    // GRAIN_SIZE (32768) elements per task: an element costs ~5 loads/stores, so a task of that
    // size is ~0.1 ms of memory traffic, well above the thread wake-up cost.
    at::parallel_for(0, total, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      // First tensor that overlaps [begin, end).
      size_t t = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
      for (; t < work.size() && start[t] < end; ++t) {
        const Work& w = work[t];
        const int64_t lo = std::max(begin, start[t]) - start[t];
        const int64_t hi = std::min(end, start[t + 1]) - start[t];
        if (lo >= hi) {
          continue;  // empty tensor
        }
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, w.p.scalar_type(), "sgd_momentum_update_", [&] {
              update_range<scalar_t>(
                  w.p.mutable_data_ptr<scalar_t>(), w.g.const_data_ptr<scalar_t>(),
                  w.buf.defined() ? w.buf.mutable_data_ptr<scalar_t>() : nullptr, lo, hi, h);
            });
      }
    });
  }
  for (const Work& w : work) {
    if (w.p_out.defined()) {
      w.p_out.copy_(w.p);
    }
    if (w.buf_out.defined()) {
      w.buf_out.copy_(w.buf);
    }
  }
}

}  // namespace
}  // namespace engm_fast

TORCH_LIBRARY_IMPL(engm_fast, CPU, m) {
  m.impl("sgd_momentum_update_", &engm_fast::sgd_momentum_update_cpu);
}
