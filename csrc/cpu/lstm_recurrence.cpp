// CPU implementation of engm_fast::lstm_recurrence and engm_fast::lstm_recurrence_backward
// (schemas in csrc/ops.cpp): one layer and direction of an LSTM over a whole sequence, forward
// and backward through time, as engm_fast/ops/lstm.py defines them (with its pure-PyTorch
// reference and the deviation allowed).
//
// Why a kernel: the recurrence is T dependent steps, each one [B, H_out] x [H_out, 4H] GEMM and
// elementwise work on [B, 4H]. Written as ATen ops from Python (the reference), a step is about
// ten ops (sigmoid, the cell update, tanh(c), the hidden state), each a dispatch and a pass over
// memory; at B = 32, H = 256 they cost more than the step's GEMM (the README's LSTM benchmark
// notes have the profile). Here a step is the GEMM (ATen's addmm / mm, the same BLAS call) and
// ONE fused pass over the gates, split over the batch rows between threads, and the loop over
// the steps runs in C++.
//
// Forward, step t (in the direction's time order; h, c the previous step's states, h_0, c_0 the
// initial ones):
//   z   = gx_t + h W_hh^T + b_hh                        [B, 4H], gate order i, f, g, o
//         (the GEMM writes h W_hh^T; gx_t and b_hh are added in the fused pass)
//   i, f, o = sigmoid(z_i, z_f, z_o);  g = tanh(z_g)     stored in acts_t
//   c_t = f c + i g                                      stored in cells_t
//   m_t = o tanh(c_t)                                    tanh(c_t) stored in tanh_cells_t
//   h_t = m_t W_hr^T + ph_t  (with a projection)  |  m_t
// Backward, steps in reverse order (dh, dc the state gradients arriving from the later step):
//   dh  += grad_states_t;  d_ph_t = dh;  dm = dh W_hr (projection)  |  dh
//   dc  += dm o (1 - tanh(c_t)^2)
//   dz_t = [dc g i(1-i), dc c_{t-1} f(1-f), dc i (1-g^2), dm tanh(c_t) o(1-o)]
//   dc   = dc f;  dh = dz_t W_hh  (skipped after the first step unless h_0's gradient is wanted)
//
// Transcendentals: float32 uses a polynomial exp (Cephes' expf: range reduction by ln 2 and a
// degree-5 polynomial, at most 1.35 ulp) that the compiler vectorizes, sigmoid(x) = 1 / (1 + exp(-x))
// and tanh(x) = 2 sigmoid(2x) - 1 (the reference computes tanh the same way; ATen's vectorized
// tanh costs about 3x a sigmoid on this machine). float64 uses std::exp and std::tanh: it is the
// dtype the exactness tests run in, and it is not the fast path. On x86-64 the fused passes are
// compiled twice, for the baseline ISA and for AVX2 + FMA, and the AVX2 one is chosen at run
// time when the CPU has it (8 floats per instruction instead of 4; ENGM_FAST_CPU_ISA=baseline
// forces the baseline one, for tests).
//
// Threading: each fused pass splits the batch rows between threads with at::parallel_for (rows
// are independent); the GEMMs run between the passes with ATen's own threading.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace engm_fast {
namespace {

#if defined(__GNUC__) || defined(__clang__)
// The row functions are inlined into each ISA's wrapper, so each is compiled for that ISA.
#define ENGM_FAST_ALWAYS_INLINE inline __attribute__((always_inline))
// Not under clang-cl (_MSC_VER): __builtin_cpu_supports needs compiler-rt, which it does not link.
#if defined(__x86_64__) && !defined(_MSC_VER)
#define ENGM_FAST_X86_AVX2_CLONE 1
#endif
#else
#define ENGM_FAST_ALWAYS_INLINE inline
#endif

// Gates per thread chunk of a fused pass, at least (so at H = 256 two batch rows, 2048 gates):
// measured at B = 32, T = 32, H = 256 on 2 cores, forward 5.6 ms and backward 6.1 ms with such
// chunks, 6.3 ms and 8.4 ms with the whole pass on one thread.
constexpr int64_t kMinGatesPerChunk = 2048;

inline int64_t rows_per_chunk(int64_t H) {
  return std::max<int64_t>(1, kMinGatesPerChunk / std::max<int64_t>(1, 4 * H));
}

// Cephes' expf: exp(x) = 2^n exp(r), n = round(x / ln 2) (rounded by adding and subtracting
// 1.5 * 2^23: no branch, so the loops vectorize), r = x - n ln 2 (ln 2 split in two constants so
// that n ln 2 is exact), exp(r) a degree-5 polynomial. At most 1.35 ulp from exp over
// [-87, 87] (measured on a grid of step 1e-3). Clamped there: 2^n stays a normal float, and so
// does the smallest sigmoid, 1 / (1 + e^87) = 1.6e-38 (a subnormal gate would put every product
// with it on x86's slow path; the sigmoid is 1 in float32 from x = 17 on anyway).
ENGM_FAST_ALWAYS_INLINE float exp_poly(float x) {
  x = std::min(std::max(x, -87.0f), 87.0f);  // a NaN passes through, and the result is NaN
  constexpr float kRound = 12582912.0f;      // 1.5 * 2^23, bits 0x4B400000
  const float shifted = x * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n from the integer n in the low bits of `shifted`, in unsigned arithmetic (defined for any
  // input, a NaN included; no float-to-int conversion)
  uint32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
  const uint32_t bits = (shifted_bits - 0x4B400000u + 127u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

ENGM_FAST_ALWAYS_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_poly(-x)); }
ENGM_FAST_ALWAYS_INLINE float tanh_of(float x) { return 2.0f / (1.0f + exp_poly(-2.0f * x)) - 1.0f; }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double tanh_of(double x) { return std::tanh(x); }

// The forward's fused pass over rows [r0, r1) of one step. z: [B, 4H] (h W_hh^T, row stride 4H);
// gx, acts: this step's rows of gx and of the activated gates (row stride acts_stride); bias:
// [4H] or null; c_prev: [B, H] (row stride c_prev_stride); cells, tanh_c, m: this step's rows of
// those [B, T, .] outputs (row strides h_stride, h_stride, m_stride).
template <typename scalar_t>
struct ForwardStep {
  using scalar_type = scalar_t;
  const scalar_t* z;
  const scalar_t* gx;
  const scalar_t* bias;
  const scalar_t* c_prev;
  int64_t c_prev_stride;
  scalar_t* acts;
  int64_t acts_stride;
  scalar_t* cells;
  scalar_t* tanh_c;
  int64_t h_stride;  // row stride of cells / tanh_c (T H)
  scalar_t* m;
  int64_t m_stride;
  int64_t H;
};

template <typename scalar_t>
ENGM_FAST_ALWAYS_INLINE void step_rows(const ForwardStep<scalar_t>& s, int64_t r0, int64_t r1) {
  const int64_t H = s.H;
  for (int64_t b = r0; b < r1; ++b) {
    const scalar_t* z = s.z + b * 4 * H;
    const scalar_t* x = s.gx + b * s.acts_stride;
    scalar_t* a = s.acts + b * s.acts_stride;
    // i and f, then g, then o: three loops without a branch, so each vectorizes
    if (s.bias == nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < 2 * H; ++j) a[j] = sigmoid(x[j] + z[j]);
#pragma omp simd
      for (int64_t j = 2 * H; j < 3 * H; ++j) a[j] = tanh_of(x[j] + z[j]);
#pragma omp simd
      for (int64_t j = 3 * H; j < 4 * H; ++j) a[j] = sigmoid(x[j] + z[j]);
    } else {
      const scalar_t* bias = s.bias;
#pragma omp simd
      for (int64_t j = 0; j < 2 * H; ++j) a[j] = sigmoid(x[j] + z[j] + bias[j]);
#pragma omp simd
      for (int64_t j = 2 * H; j < 3 * H; ++j) a[j] = tanh_of(x[j] + z[j] + bias[j]);
#pragma omp simd
      for (int64_t j = 3 * H; j < 4 * H; ++j) a[j] = sigmoid(x[j] + z[j] + bias[j]);
    }
    const scalar_t* cp = s.c_prev + b * s.c_prev_stride;
    scalar_t* c = s.cells + b * s.h_stride;
    scalar_t* tc = s.tanh_c + b * s.h_stride;
    scalar_t* m = s.m + b * s.m_stride;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const scalar_t cj = a[H + j] * cp[j] + a[j] * a[2 * H + j];
      const scalar_t tj = tanh_of(cj);
      c[j] = cj;
      tc[j] = tj;
      m[j] = a[3 * H + j] * tj;
    }
  }
}

// The backward's fused pass over rows [r0, r1) of one step: reads dm (and, without a
// projection, adds grad_states_t to it), updates dc in place and writes dz_t.
template <typename scalar_t>
struct BackwardStep {
  using scalar_type = scalar_t;
  const scalar_t* dm;  // [B, H] row stride dm_stride: dh (no projection) or dh W_hr
  int64_t dm_stride;
  const scalar_t* g_out;  // grad_states_t rows (stride g_stride), or null; added to dm (no projection)
  int64_t g_stride;
  const scalar_t* acts;  // row stride acts_stride
  int64_t acts_stride;
  const scalar_t* tanh_c;  // row stride h_stride
  const scalar_t* c_prev;  // row stride c_prev_stride
  int64_t h_stride, c_prev_stride;
  scalar_t* dc;  // [B, H] contiguous
  scalar_t* dz;  // row stride acts_stride
  int64_t H;
};

template <typename scalar_t>
ENGM_FAST_ALWAYS_INLINE void step_rows(const BackwardStep<scalar_t>& s, int64_t r0, int64_t r1) {
  const int64_t H = s.H;
  for (int64_t b = r0; b < r1; ++b) {
    const scalar_t* dm = s.dm + b * s.dm_stride;
    const scalar_t* go = s.g_out == nullptr ? nullptr : s.g_out + b * s.g_stride;
    const scalar_t* a = s.acts + b * s.acts_stride;
    const scalar_t* tc = s.tanh_c + b * s.h_stride;
    const scalar_t* cp = s.c_prev + b * s.c_prev_stride;
    scalar_t* dc = s.dc + b * H;
    scalar_t* dz = s.dz + b * s.acts_stride;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const scalar_t i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];
      const scalar_t t = tc[j];
      const scalar_t dmj = go == nullptr ? dm[j] : dm[j] + go[j];
      const scalar_t dcj = dc[j] + dmj * (o - o * t * t);
      dz[j] = dcj * g * (i - i * i);
      dz[H + j] = dcj * cp[j] * (f - f * f);
      dz[2 * H + j] = dcj * (i - i * g * g);
      dz[3 * H + j] = dmj * t * (o - o * o);
      dc[j] = dcj * f;
    }
  }
}

#ifdef ENGM_FAST_X86_AVX2_CLONE
__attribute__((target("avx2,fma"))) void step_rows_avx2(const ForwardStep<float>& s, int64_t r0, int64_t r1) {
  step_rows(s, r0, r1);
}
__attribute__((target("avx2,fma"))) void step_rows_avx2(const BackwardStep<float>& s, int64_t r0, int64_t r1) {
  step_rows(s, r0, r1);
}
// Whether to run the AVX2 + FMA passes: when the CPU has both, unless ENGM_FAST_CPU_ISA=baseline
// is set (read once; the tests use it to run the baseline passes on an AVX2 machine).
bool cpu_has_avx2_fma() {
  static const bool has = [] {
    const char* isa = std::getenv("ENGM_FAST_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "baseline") == 0) {
      return false;
    }
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#endif

// One fused pass (ForwardStep or BackwardStep) over the B batch rows, split between threads; in
// float32 the AVX2 + FMA version where the CPU has it.
template <typename Step>
void run_step(const Step& s, int64_t B) {
  at::parallel_for(0, B, rows_per_chunk(s.H), [&](int64_t r0, int64_t r1) {
#ifdef ENGM_FAST_X86_AVX2_CLONE
    if constexpr (std::is_same_v<typename Step::scalar_type, float>) {
      if (cpu_has_avx2_fma()) {
        step_rows_avx2(s, r0, r1);
        return;
      }
    }
#endif
    step_rows(s, r0, r1);
  });
}

// Shapes of one layer and direction, checked once (callers of torch.ops.engm_fast.* may bypass
// the Python wrapper, engm_fast.ops.lstm, which checks the same first).
struct Dims {
  int64_t B, T, G, H, H_out;
};

Dims check_args(const at::Tensor& gx, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
                const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
                const std::optional<at::Tensor>& ph, const char* op) {
  TORCH_CHECK(gx.dim() == 3 && gx.size(2) % 4 == 0, op, ": gx must be [B, T, 4H]; got ", gx.sizes());
  Dims d{gx.size(0), gx.size(1), gx.size(2), gx.size(2) / 4, 0};
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == d.G, op, ": w_hh must be [4H, H_out] = [", d.G, ", H_out]; got ",
              w_hh.sizes());
  d.H_out = w_hh.size(1);
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == d.B && h0.size(1) == d.H_out, op, ": h0 must be [B, H_out] = [", d.B,
              ", ", d.H_out, "]; got ", h0.sizes());
  TORCH_CHECK(c0.dim() == 2 && c0.size(0) == d.B && c0.size(1) == d.H, op, ": c0 must be [B, H] = [", d.B, ", ",
              d.H, "]; got ", c0.sizes());
  TORCH_CHECK(!b_hh.has_value() || (b_hh->dim() == 1 && b_hh->size(0) == d.G), op, ": b_hh must be [4H] = [", d.G,
              "]");
  TORCH_CHECK(w_hr.has_value() == ph.has_value(), op, ": w_hr and ph come together (a projection) or not at all");
  TORCH_CHECK(w_hr.has_value() || d.H_out == d.H, op, ": without a projection H_out must equal H; got w_hh ",
              w_hh.sizes());
  if (w_hr.has_value()) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(0) == d.H_out && w_hr->size(1) == d.H, op,
                ": w_hr must be [H_out, H] = [", d.H_out, ", ", d.H, "]; got ", w_hr->sizes());
    TORCH_CHECK(ph->dim() == 3 && ph->size(0) == d.B && ph->size(1) == d.T && ph->size(2) == d.H_out, op,
                ": ph must be [B, T, H_out] = [", d.B, ", ", d.T, ", ", d.H_out, "]; got ", ph->sizes());
  }
  const auto dtype = gx.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": the CPU kernel runs float32 and float64; got ",
              dtype);
  for (const at::Tensor* t : {&h0, &c0, &w_hh}) {
    TORCH_CHECK(t->scalar_type() == dtype && t->device().is_cpu(), op,
                ": every tensor must be a CPU tensor of gx's dtype ", dtype);
  }
  for (const auto* t : {&b_hh, &w_hr, &ph}) {
    TORCH_CHECK(!t->has_value() || ((*t)->scalar_type() == dtype && (*t)->device().is_cpu()), op,
                ": every tensor must be a CPU tensor of gx's dtype ", dtype);
  }
  return d;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_cpu(
    const at::Tensor& gx_in, const at::Tensor& h0_in, const at::Tensor& c0_in, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_hh_in, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& ph_in, bool reverse) {
  const Dims d = check_args(gx_in, h0_in, c0_in, w_hh, b_hh_in, w_hr, ph_in, "lstm_recurrence");
  at::NoGradGuard no_grad;
  const int64_t B = d.B, T = d.T, G = d.G, H = d.H;
  const auto gx = gx_in.contiguous();
  const auto c0 = c0_in.contiguous();
  const auto b_hh = b_hh_in.has_value() ? std::optional<at::Tensor>(b_hh_in->contiguous()) : std::nullopt;
  const bool projected = w_hr.has_value();
  auto states = at::empty({B, T, d.H_out}, gx.options());
  auto acts = at::empty({B, T, G}, gx.options());
  auto cells = at::empty({B, T, H}, gx.options());
  auto tanh_c = at::empty({B, T, H}, gx.options());
  auto m = projected ? at::empty({B, T, H}, gx.options()) : at::empty({0}, gx.options());
  auto z = at::empty({B, G}, gx.options());
  const auto w_hh_t = w_hh.t().contiguous();  // [H_out, 4H]: about 5% faster GEMMs than the transposed view
  const auto w_hr_t = projected ? w_hr->t() : at::Tensor();
  at::Tensor h = h0_in;
  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "lstm_recurrence", [&] {
    const scalar_t* c_prev = c0.data_ptr<scalar_t>();
    int64_t c_prev_stride = H;
    for (const auto step : c10::irange(T)) {
      const int64_t t = reverse ? T - 1 - step : step;
      at::mm_out(z, h, w_hh_t);
      scalar_t* m_t = projected ? m.data_ptr<scalar_t>() + t * H : states.data_ptr<scalar_t>() + t * d.H_out;
      ForwardStep<scalar_t> s{z.const_data_ptr<scalar_t>(),
                              gx.const_data_ptr<scalar_t>() + t * G,
                              b_hh.has_value() ? b_hh->const_data_ptr<scalar_t>() : nullptr,
                              c_prev,
                              c_prev_stride,
                              acts.data_ptr<scalar_t>() + t * G,
                              T * G,
                              cells.data_ptr<scalar_t>() + t * H,
                              tanh_c.data_ptr<scalar_t>() + t * H,
                              T * H,
                              m_t,
                              T * H,
                              H};
      run_step(s, B);
      if (projected) {
        auto h_t = states.select(1, t);
        at::addmm_out(h_t, ph_in->select(1, t), m.select(1, t), w_hr_t);
      }
      h = states.select(1, t);
      c_prev = cells.data_ptr<scalar_t>() + t * H;
      c_prev_stride = T * H;
    }
  });
  return {states, acts, cells, tanh_c, m};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_backward_cpu(
    const std::optional<at::Tensor>& grad_states, const std::optional<at::Tensor>& grad_h,
    const std::optional<at::Tensor>& grad_c, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& acts_in, const at::Tensor& cells_in, const at::Tensor& tanh_c_in, const at::Tensor& c0_in,
    bool reverse, bool need_h0) {
  TORCH_CHECK(acts_in.dim() == 3 && acts_in.size(2) % 4 == 0, "lstm_recurrence_backward: acts must be [B, T, 4H]; got ",
              acts_in.sizes());
  const int64_t B = acts_in.size(0), T = acts_in.size(1), G = acts_in.size(2), H = G / 4;
  const auto opts = acts_in.options();
  // Shapes through the forward's checks, with stand-ins for what the backward does not read.
  const Dims d = check_args(acts_in, at::empty({B, w_hh.size(1)}, opts), c0_in, w_hh, std::nullopt, w_hr,
                            w_hr.has_value() ? std::optional<at::Tensor>(at::empty({B, T, w_hh.size(1)}, opts))
                                             : std::nullopt,
                            "lstm_recurrence_backward");
  for (const at::Tensor* t : {&cells_in, &tanh_c_in}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == B && t->size(1) == T && t->size(2) == H &&
                    t->scalar_type() == acts_in.scalar_type(),
                "lstm_recurrence_backward: cells and tanh_cells must be [B, T, H] = [", B, ", ", T, ", ", H,
                "] of acts' dtype; got ", t->sizes());
  }
  const struct {
    const std::optional<at::Tensor>& t;
    std::vector<int64_t> shape;
    const char* name;
  } grads[] = {{grad_states, {B, T, d.H_out}, "grad_states"},
                {grad_h, {B, d.H_out}, "grad_h"},
                {grad_c, {B, H}, "grad_c"}};
  for (const auto& g : grads) {
    TORCH_CHECK(!g.t.has_value() || (g.t->sizes() == at::IntArrayRef(g.shape) &&
                                     g.t->scalar_type() == acts_in.scalar_type() && g.t->device().is_cpu()),
                "lstm_recurrence_backward: ", g.name, " must be a CPU tensor of shape ", at::IntArrayRef(g.shape),
                " and acts' dtype; got ", g.t.has_value() ? g.t->sizes() : at::IntArrayRef());
  }
  at::NoGradGuard no_grad;
  const bool projected = w_hr.has_value();
  const auto acts = acts_in.contiguous();
  const auto cells = cells_in.contiguous();
  const auto tanh_c = tanh_c_in.contiguous();
  const auto c0 = c0_in.contiguous();
  const auto g_out = grad_states.has_value() ? grad_states->contiguous() : at::Tensor();
  auto dz = at::empty({B, T, G}, opts);
  auto d_ph = projected ? at::empty({B, T, d.H_out}, opts) : at::empty({0}, opts);
  auto dh = grad_h.has_value() ? grad_h->contiguous().clone() : at::zeros({B, d.H_out}, opts);
  auto dc = grad_c.has_value() ? grad_c->contiguous().clone() : at::zeros({B, H}, opts);
  auto dm = projected ? at::empty({B, H}, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "lstm_recurrence_backward", [&] {
    for (const auto k : c10::irange(T)) {
      const int64_t t = reverse ? k : T - 1 - k;  // the steps last-first in the direction's time order
      const bool first_in_time = k == T - 1;
      const int64_t t_prev = reverse ? t + 1 : t - 1;
      // Without a projection dm = dh + grad_states_t, added in the fused pass; with one, dm is
      // (dh + grad_states_t) W_hr, a GEMM first.
      const scalar_t* dm_rows = dh.const_data_ptr<scalar_t>();
      const scalar_t* g_rows = nullptr;
      if (!projected && g_out.defined()) {
        g_rows = g_out.const_data_ptr<scalar_t>() + t * d.H_out;
      }
      if (projected) {
        auto d_ph_t = d_ph.select(1, t);
        if (g_out.defined()) {
          at::add_out(d_ph_t, dh, g_out.select(1, t));
        } else {
          d_ph_t.copy_(dh);
        }
        at::mm_out(dm, d_ph_t, *w_hr);
        dm_rows = dm.const_data_ptr<scalar_t>();
      }
      BackwardStep<scalar_t> s{dm_rows,
                               H,
                               g_rows,
                               T * d.H_out,
                               acts.const_data_ptr<scalar_t>() + t * G,
                               T * G,
                               tanh_c.const_data_ptr<scalar_t>() + t * H,
                               first_in_time ? c0.const_data_ptr<scalar_t>()
                                             : cells.const_data_ptr<scalar_t>() + t_prev * H,
                               T * H,
                               first_in_time ? H : T * H,
                               dc.data_ptr<scalar_t>(),
                               dz.data_ptr<scalar_t>() + t * G,
                               H};
      run_step(s, B);
      if (!first_in_time || need_h0) {
        at::mm_out(dh, dz.select(1, t), w_hh);
      }
    }
  });
  if (!need_h0) {
    dh = at::empty({0}, opts);
  }
  return {dz, dh, dc, d_ph};
}

}  // namespace
}  // namespace engm_fast

TORCH_LIBRARY_IMPL(engm_fast, CPU, m) {
  m.impl("lstm_recurrence", &engm_fast::lstm_recurrence_cpu);
  m.impl("lstm_recurrence_backward", &engm_fast::lstm_recurrence_backward_cpu);
}
