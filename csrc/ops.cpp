// Operator schemas of the engm_fast library, declared once for every backend.
//
// What each op computes, its rounding and the deviation a backend may have, is the contract in
// engm_fast/reference.py (with its pure-PyTorch definitions). The Python wrappers of
// engm_fast/ops check the arguments and decide, once for every backend, what the kernels are
// given explicitly here: the route of per_example_sqnorm and the accumulation dtype.
// Backends register implementations with TORCH_LIBRARY_IMPL:
//   csrc/cpu/*.cpp    CPU   (always built)
//   csrc/cuda/*.cu    CUDA  (built only where torch has CUDA and nvcc is found)
// Fake (meta) implementations for torch.compile / opcheck live in Python
// (engm_fast/ops, torch.library.register_fake), next to the wrappers.
//
// This file is also the Python entry point of the shared library: `import engm_fast._C`
// loads the .so, which runs the static TORCH_LIBRARY initializers below, after which the ops
// are reachable as torch.ops.engm_fast.<name>. The module itself is empty.

#include <Python.h>

#include <torch/library.h>

extern "C" {
// An empty module named _C (the pattern of pytorch/extension-cpp): importing it is only a way
// to dlopen the library so that the operator registrations run. No Python bindings of our
// own: every entry point goes through the dispatcher (torch.ops), so autograd, torch.compile
// and the fake-tensor machinery see the ops.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "Native operators of engm_fast; importing registers torch.ops.engm_fast.*",  // doc
      -1,  // no per-interpreter state
      nullptr,  // no methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(engm_fast, m) {
  // ||b_i^T a_i||_F^2 for every example i. a: [B, T, d_in] or [B, d_in]; b: [B, T, d_out] or
  // [B, d_out]; mode: the route, "ghost" or "direct" (engm_fast.ops.per_example_sqnorm resolves
  // "auto"); acc_dtype: float32 or float64, the dtype of the sums and of the [B] result.
  m.def("per_example_sqnorm(Tensor a, Tensor b, str mode, ScalarType acc_dtype) -> Tensor");
  // sum_i w_i b_i^T a_i, [d_out, d_in] in a's dtype. w: [B] in the accumulation dtype (float32 or
  // float64), which the products w_r b_r are formed and summed in.
  m.def("weighted_outer_sum(Tensor a, Tensor b, Tensor w) -> Tensor");
  // The engine's finalize, one call per step for a list of layers j (csrc/composite/layer_lists.cpp,
  // any device): sum_j per_example_sqnorm(a_j, b_j, modes_j, acc_dtype), [B] ...
  m.def("per_example_sqnorms(Tensor[] a, Tensor[] b, str[] modes, ScalarType acc_dtype) -> Tensor");
  // ... and out_j += weighted_outer_sum(a_j, b_j, w) in place (out_j contiguous, d_out_j * d_in_j
  // elements, a_j's dtype), w in the accumulation dtype.
  m.def("weighted_outer_sums_(Tensor[] a, Tensor[] b, Tensor w, Tensor(a!)[] out) -> ()");
  // One SGD-momentum step over lists of tensors (torch.optim.SGD's arithmetic), in place, in the
  // accumulation dtype, rounding only the stored buffer and parameter:
  //   d = grad + weight_decay * param
  //   buf = d                                    (first_step)
  //   buf = momentum * buf + (1 - dampening) * d (otherwise); skipped when momentum == 0
  //   d = d + momentum * buf (nesterov) or buf   (the stored buffer)
  //   param -= lr * d
  // momentum_buffers is empty when momentum == 0, else one per param. All lists hold tensors
  // of one device; each param/grad/buffer triple shares shape and dtype.
  m.def(
      "sgd_momentum_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool first_step) -> ()");
  // One layer and direction of an LSTM over a sequence: a layer, not a per-example reduction,
  // so its contract, reference and tolerances are in engm_fast/ops/lstm.py (CPU kernel only). gx: [B, T, 4H], the input projection with b_ih; h0: [B, H_out]; c0: [B, H];
  // w_hh: [4H, H_out]; with a projection (proj_size) w_hr: [H_out, H] and ph: [B, T, H_out], its
  // additive input. Returns the states h_t [B, T, H_out], the gates after their activations
  // [B, T, 4H], the cells c_t and tanh(c_t) [B, T, H], and the projection's inputs m_t [B, T, H]
  // (a 0-element tensor without a projection: m_t are the states).
  m.def(
      "lstm_recurrence(Tensor gx, Tensor h0, Tensor c0, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor? ph, "
      "bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Its backward through time: the gradients of gx (dz, [B, T, 4H]), h0 ([B, H_out], a 0-element
  // tensor unless need_h0), c0 ([B, H]) and ph ([B, T, H_out], 0-element without a projection),
  // from the gradients of the states, h_T and c_T (each optional: absent is zero) and what the
  // forward returned.
  m.def(
      "lstm_recurrence_backward(Tensor? grad_states, Tensor? grad_h, Tensor? grad_c, Tensor w_hh, Tensor? w_hr, "
      "Tensor acts, Tensor cells, Tensor tanh_cells, Tensor c0, bool reverse, bool need_h0) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}
