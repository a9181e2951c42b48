// Runs the engm_fast CUDA kernels (csrc/cuda/kernels) under the host emulation (emu.h) and
// compares them with float64 references computed here; built and run by
// tests/test_cuda_emulation.py. Inputs are poisoned (NaN) outside their valid elements and
// surrounded by NaN guards, outputs and workspaces start as NaN, so a missed write, a read of
// padding or an out-of-range access shows up as a NaN or an emulation error.
//
// Usage: harness sqnorm|weighted|sgd|all late|early|reverse OP:TYPE=TOL...   (EMU_VERBOSE=1: every check)
// The tolerances are those of engm_fast/reference.py's TOLERANCE table, passed by the test as
// e.g. sqnorm:fp16=2e-06 outer:bf16=0.003910 for every op (sqnorm, outer) and type (fp64,
// fp32, fp16, bf16); the SGD update is checked for equality with its own arithmetic instead.
// Exit status 0 iff every check passed (2: a tolerance is missing).
#include "emu.h"

#define ENGM_FAST_SQNORM_DEFINE_INSTANCES
#define ENGM_FAST_WEIGHTED_DEFINE_INSTANCES
#include "per_example_sqnorm.cuh"
#include "weighted_outer_sum.cuh"
#include "sgd_momentum.cu"

#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <random>
#include <string>

using namespace engm_fast::cuda;

namespace {

int g_failures = 0;
int g_checks = 0;
std::map<std::string, double> g_tolerance;  // "sqnorm:fp16" -> tolerance, from the command line

template <typename T>
const char* type_name() {
  if constexpr (std::is_same_v<T, __half>) return "fp16";
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return "bf16";
  if constexpr (std::is_same_v<T, float>) return "fp32";
  return "fp64";
}

template <typename T>
T from_double(double v) {
  return from_acc<T>(static_cast<acc_t<T>>(v));
}
template <typename T>
double to_double(T v) {
  return static_cast<double>(to_acc(v));
}
template <typename T>
T nan_value() {
  return from_double<T>(std::numeric_limits<double>::quiet_NaN());
}

// A [B, T, d] operand with row stride ld >= d and batch stride bs >= T * ld, poisoned (NaN)
// everywhere but the valid elements, plus NaN guard elements before and after; `shift`
// elements of offset to break alignment.
template <typename T>
struct Operand {
  std::vector<T> storage;
  T* ptr;
  int64_t B, rows, d, ld, bs;
  Operand(int64_t B_, int64_t rows_, int64_t d_, int64_t ld_, int64_t bs_, int shift, std::mt19937& gen)
      : B(B_), rows(rows_), d(d_), ld(ld_), bs(bs_) {
    const int64_t span = B > 0 ? (B - 1) * bs + (rows - 1) * ld + d : 0;
    const int64_t guard = 64;
    storage.assign(static_cast<size_t>(span + 2 * guard + 16), nan_value<T>());
    // 16-byte aligned start + guard (a multiple of 8 elements) + shift
    T* base = storage.data();
    while (reinterpret_cast<uintptr_t>(base) % 16 != 0) ++base;
    ptr = base + guard + shift;
    std::normal_distribution<double> nd(0.0, 1.0);
    for (int64_t i = 0; i < B; ++i)
      for (int64_t t = 0; t < rows; ++t)
        for (int64_t j = 0; j < d; ++j) at(i, t, j) = from_double<T>(nd(gen));
    emu::register_range(storage.data(), storage.size() * sizeof(T));
  }
  T& at(int64_t i, int64_t t, int64_t j) { return ptr[i * bs + t * ld + j]; }
  double v(int64_t i, int64_t t, int64_t j) const { return to_double(ptr[i * bs + t * ld + j]); }
  Rows3<T> rows3() const { return Rows3<T>{ptr, B == 1 ? 0 : bs, rows == 1 ? 0 : ld}; }
};

// The tolerance of engm_fast/reference.py's table for op ("sqnorm" or "outer") and T.
template <typename T>
double tolerance(const char* op) {
  const std::string key = std::string(op) + ":" + type_name<T>();
  const auto it = g_tolerance.find(key);
  if (it == g_tolerance.end()) {
    std::printf("no tolerance given for %s\n", key.c_str());
    std::exit(2);
  }
  return it->second;
}

void report(bool ok, const std::string& what, double err) {
  ++g_checks;
  if (std::getenv("EMU_VERBOSE") != nullptr) std::printf("%s %s: err %.3g\n", ok ? "ok  " : "FAIL", what.c_str(), err);
  if (!ok) {
    ++g_failures;
    std::printf("FAIL %s: err %.3g\n", what.c_str(), err);
  }
}

int64_t padded(int64_t d, int pad) { return pad ? (d + 7) / 8 * 8 + pad : d; }

template <typename T>
void check_sqnorm(int64_t B, int64_t rows, int64_t d_in, int64_t d_out, SqnormRoute route, int pad, int shift,
                  std::mt19937& gen) {
  using A = acc_t<T>;
  emu::clear_ranges();
  // pad > 0: rows padded to a multiple of 8 elements plus pad (16-byte vectors whose last chunk
  // straddles the row end), batch stride padded by pad more elements
  const int64_t lda = padded(d_in, pad), ldb = padded(d_out, pad);
  Operand<T> a(B, rows, d_in, lda, rows * lda + pad, shift, gen);
  Operand<T> b(B, rows, d_out, ldb, rows * ldb + pad, shift, gen);
  const int64_t ws_n = per_example_sqnorm_workspace<T>(route, B, rows, d_in, d_out);
  std::vector<A> ws(static_cast<size_t>(ws_n) + 1, std::numeric_limits<A>::quiet_NaN());
  std::vector<A> out(static_cast<size_t>(B) + 2, std::numeric_limits<A>::quiet_NaN());
  const cudaError_t err = launch_per_example_sqnorm<T>(route, a.rows3(), b.rows3(), B, rows, d_in, d_out, ws.data(),
                                                       out.data() + 1, nullptr);
  const std::string what = std::string("sqnorm ") + type_name<T>() + " route " + std::to_string(static_cast<int>(route)) +
                           " B" + std::to_string(B) + " T" + std::to_string(rows) + " " + std::to_string(d_in) + "x" +
                           std::to_string(d_out) + " pad" + std::to_string(pad) + " shift" + std::to_string(shift);
  if (err != cudaSuccess) {
    report(false, what + " launch error", 0);
    return;
  }
  report(std::isnan(static_cast<double>(out[0])) && std::isnan(static_cast<double>(out[B + 1])), what + " guard", 0);
  double worst = 0;
  for (int64_t i = 0; i < B; ++i) {
    double ref = 0, bound = 0;
    for (int64_t o = 0; o < d_out; ++o)
      for (int64_t n = 0; n < d_in; ++n) {
        double g = 0, ga = 0;
        for (int64_t t = 0; t < rows; ++t) {
          g += b.v(i, t, o) * a.v(i, t, n);
          ga += std::fabs(b.v(i, t, o) * a.v(i, t, n));
        }
        ref += g * g;
        bound += ga * ga;
      }
    const double e = std::fabs(static_cast<double>(out[i + 1]) - ref) / std::max(bound, 1e-300);
    worst = std::max(worst, std::isnan(e) ? 1e300 : e);
  }
  report(worst <= tolerance<T>("sqnorm"), what, worst);
}

template <typename T>
void check_weighted(int64_t B, int64_t rows, int64_t d_in, int64_t d_out, int pad, int shift, std::mt19937& gen) {
  using A = acc_t<T>;
  emu::clear_ranges();
  const int64_t lda = padded(d_in, pad), ldb = padded(d_out, pad);
  // rows of all examples contiguous with row strides lda / ldb: the [B*T, d] view
  Operand<T> a(1, B * rows, d_in, lda, 0, shift, gen);
  Operand<T> b(1, B * rows, d_out, ldb, 0, shift, gen);
  std::uniform_real_distribution<double> ud(-0.5, 1.5);
  std::vector<A> w(static_cast<size_t>(B));
  for (auto& x : w) x = static_cast<A>(ud(gen));  // in the accumulation type, not rounded to T
  emu::register_range(w.data(), w.size() * sizeof(A));
  WeightedOuterSumPlan plan;
  cudaError_t err = plan_weighted_outer_sum<T>(B * rows, d_in, d_out, &plan);
  std::vector<A> ws(static_cast<size_t>(plan.ws_elems) + 1, std::numeric_limits<A>::quiet_NaN());
  std::vector<T> out(static_cast<size_t>(d_in * d_out) + 2, nan_value<T>());
  if (err == cudaSuccess) {
    err = launch_weighted_outer_sum<T>(plan, a.ptr, B * rows == 1 ? 0 : lda, b.ptr, B * rows == 1 ? 0 : ldb, w.data(),
                                       rows, B * rows, d_in, d_out, plan.ws_elems > 0 ? ws.data() : nullptr,
                                       out.data() + 1, nullptr);
  }
  const std::string what = std::string("weighted ") + type_name<T>() + " B" + std::to_string(B) + " T" +
                           std::to_string(rows) + " " + std::to_string(d_in) + "x" + std::to_string(d_out) + " pad" +
                           std::to_string(pad) + " shift" + std::to_string(shift) + " splits" +
                           std::to_string(plan.splits);
  if (err != cudaSuccess) {
    report(false, what + " launch error", 0);
    return;
  }
  report(std::isnan(to_double(out[0])) && std::isnan(to_double(out[d_in * d_out + 1])), what + " guard", 0);
  // The contract: sum_r round_T(w_r b_r) a_r with the product formed in A; the deviation allowed
  // is the A summation and the final rounding to T.
  double worst = 0;
  for (int64_t o = 0; o < d_out; ++o)
    for (int64_t n = 0; n < d_in; ++n) {
      double ref = 0, bound = 0;
      for (int64_t k = 0; k < B * rows; ++k) {
        const A wk = w[static_cast<size_t>(k / rows)];
        const double operand = to_double(from_acc<T>(wk * to_acc(b.at(0, k, o))));  // round_T(w_r b_r)
        ref += operand * a.v(0, k, n);
        bound += std::fabs(static_cast<double>(wk) * b.v(0, k, o) * a.v(0, k, n));
      }
      const double e = std::fabs(to_double(out[1 + o * d_in + n]) - ref) / std::max(bound, 1e-300);
      worst = std::max(worst, std::isnan(e) ? 1e300 : e);
    }
  report(worst <= tolerance<T>("outer"), what, worst);
}

// -------------------------------------------------------------------------- sgd

struct SgdCase {
  double lr, momentum, dampening, weight_decay;
  bool nesterov;
};

template <typename T>
struct SgdTensor {
  std::vector<T> storage;
  T* p;
  T* g;
  T* buf;
  int64_t n;
  int shift;
};

template <typename T>
SgdTensor<T> make_sgd_tensor(int64_t n, int shift, std::mt19937& gen) {
  SgdTensor<T> t;
  t.n = n;
  t.shift = shift;
  t.storage.assign(static_cast<size_t>(3 * (n + 64) + 64), nan_value<T>());
  T* base = t.storage.data();
  while (reinterpret_cast<uintptr_t>(base) % 16 != 0) ++base;
  t.p = base + 8 + shift;
  t.g = t.p + n + 24;
  t.buf = t.g + n + 24;
  std::normal_distribution<double> nd(0.0, 1.0);
  for (int64_t i = 0; i < n; ++i) {
    t.p[i] = from_double<T>(nd(gen));
    t.g[i] = from_double<T>(nd(gen));
    t.buf[i] = from_double<T>(nd(gen));
  }
  return t;
}

// The reference's arithmetic in acc_t<T>, rounding where the kernel stores.
template <typename T>
void sgd_reference(SgdTensor<T>& t, std::vector<T>& p, std::vector<T>& buf, const SgdCase& c, bool first) {
  using A = acc_t<T>;
  for (int64_t i = 0; i < t.n; ++i) {
    const A pv = to_acc(p[i]);
    A d = to_acc(t.g[i]);
    if (c.weight_decay != 0) d = d + static_cast<A>(c.weight_decay) * pv;
    if (c.momentum != 0) {
      const A bv = first ? d : static_cast<A>(c.momentum) * to_acc(buf[i]) + static_cast<A>(1.0 - c.dampening) * d;
      buf[i] = from_acc<T>(bv);
      const A stored = to_acc(buf[i]);
      d = c.nesterov ? d + static_cast<A>(c.momentum) * stored : stored;
    }
    p[i] = from_acc<T>(pv - static_cast<A>(c.lr) * d);
  }
}

template <typename T>
ElemType elem() {
  if constexpr (std::is_same_v<T, __half>) return ElemType::kHalf;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return ElemType::kBFloat16;
  if constexpr (std::is_same_v<T, float>) return ElemType::kFloat;
  return ElemType::kDouble;
}

template <typename T>
double max_rel_diff(const T* x, const std::vector<T>& y, int64_t n) {
  double worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double a = to_double(x[i]), b = to_double(y[static_cast<size_t>(i)]);
    const double e = std::fabs(a - b) / std::max(std::fabs(b), 1e-30);
    worst = std::max(worst, std::isnan(e) ? 1e300 : e);
  }
  return worst;
}

void check_sgd(std::mt19937& gen) {
  const SgdCase cases[] = {{0.1, 0.9, 0.0, 0.0, false}, {0.05, 0.9, 0.1, 1e-2, true}, {0.2, 0.0, 0.0, 5e-4, false},
                           {0.1, 0.5, 0.5, 0.0, false}};
  for (const SgdCase& c : cases) {
    auto h1 = make_sgd_tensor<float>(kSgdChunk * 2 + 3, 0, gen);  // 3 chunks, aligned
    auto h2 = make_sgd_tensor<float>(37, 1, gen);                 // misaligned
    auto h3 = make_sgd_tensor<__half>(kSgdChunk + 9, 0, gen);
    auto h4 = make_sgd_tensor<__nv_bfloat16>(1, 3, gen);
    auto h5 = make_sgd_tensor<double>(1001, 1, gen);
    auto h6 = make_sgd_tensor<double>(kSgdChunk, 0, gen);
    // first_step: the buffers' old contents must be ignored (torch.empty buffers): make them NaN
    auto poison_buf = [](auto& t) {
      for (int64_t i = 0; i < t.n; ++i) t.buf[i] = nan_value<std::remove_pointer_t<decltype(t.buf)>>();
    };
    poison_buf(h1), poison_buf(h2), poison_buf(h3), poison_buf(h4), poison_buf(h5), poison_buf(h6);
    std::vector<float> p1(h1.p, h1.p + h1.n), b1(h1.buf, h1.buf + h1.n), p2(h2.p, h2.p + h2.n), b2(h2.buf, h2.buf + h2.n);
    std::vector<__half> p3(h3.p, h3.p + h3.n), b3(h3.buf, h3.buf + h3.n);
    std::vector<__nv_bfloat16> p4(h4.p, h4.p + h4.n), b4(h4.buf, h4.buf + h4.n);
    std::vector<double> p5(h5.p, h5.p + h5.n), b5(h5.buf, h5.buf + h5.n), p6(h6.p, h6.p + h6.n), b6(h6.buf, h6.buf + h6.n);
    const bool mom = c.momentum != 0;
    std::vector<SgdTensorMeta> meta;
    int64_t chunks = 0;
    auto add = [&](auto& t) {
      using TT = std::remove_pointer_t<decltype(t.p)>;
      SgdTensorMeta m{};
      m.param = t.p;
      m.grad = t.g;
      m.buf = mom ? t.buf : nullptr;
      m.numel = t.n;
      m.chunk_begin = chunks;
      m.dtype = static_cast<int32_t>(elem<TT>());
      meta.push_back(m);
      chunks += sgd_chunks(t.n);
    };
    add(h1), add(h2), add(h3), add(h4), add(h5), add(h6);
    for (int step = 0; step < 3; ++step) {
      SgdHyper h{c.lr, c.momentum, c.dampening, c.weight_decay, c.nesterov, step == 0};
      const cudaError_t err = launch_sgd_momentum(meta.data(), static_cast<int>(meta.size()), chunks, h, nullptr);
      report(err == cudaSuccess, "sgd launch", 0);
      sgd_reference(h1, p1, b1, c, step == 0);
      sgd_reference(h2, p2, b2, c, step == 0);
      sgd_reference(h3, p3, b3, c, step == 0);
      sgd_reference(h4, p4, b4, c, step == 0);
      sgd_reference(h5, p5, b5, c, step == 0);
      sgd_reference(h6, p6, b6, c, step == 0);
      const std::string what = "sgd case lr" + std::to_string(c.lr) + " mom" + std::to_string(c.momentum) + " nest" +
                               std::to_string(c.nesterov) + " step" + std::to_string(step);
      // identical arithmetic: equal up to contraction differences (none on x86-64 without FMA)
      double e = 0;
      e = std::max(e, max_rel_diff(h1.p, p1, h1.n));
      e = std::max(e, max_rel_diff(h2.p, p2, h2.n));
      e = std::max(e, max_rel_diff(h3.p, p3, h3.n));
      e = std::max(e, max_rel_diff(h4.p, p4, h4.n));
      e = std::max(e, max_rel_diff(h5.p, p5, h5.n));
      e = std::max(e, max_rel_diff(h6.p, p6, h6.n));
      if (mom) {
        e = std::max(e, max_rel_diff(h1.buf, b1, h1.n));
        e = std::max(e, max_rel_diff(h2.buf, b2, h2.n));
        e = std::max(e, max_rel_diff(h3.buf, b3, h3.n));
        e = std::max(e, max_rel_diff(h4.buf, b4, h4.n));
        e = std::max(e, max_rel_diff(h5.buf, b5, h5.n));
        e = std::max(e, max_rel_diff(h6.buf, b6, h6.n));
      }
      report(e == 0.0, what, e);
    }
    // guards between p, g and buf (24 NaN elements) and around untouched
    auto guard_ok = [](auto& t) {
      for (int k = 0; k < 24; ++k) {
        if (!std::isnan(to_double(t.p[t.n + k])) || !std::isnan(to_double(t.g[t.n + k]))) return false;
      }
      return std::isnan(to_double(t.p[-1]));
    };
    report(guard_ok(h1) && guard_ok(h2) && guard_ok(h3) && guard_ok(h4) && guard_ok(h5) && guard_ok(h6), "sgd guards", 0);
  }
}

template <typename T>
void check_sqnorm_empty() {
  using A = acc_t<T>;
  // B == 0: nothing written; T == 0 or d == 0: zeros.
  std::vector<A> out(4, std::numeric_limits<A>::quiet_NaN());
  const Rows3<T> none{nullptr, 0, 0};
  cudaError_t err = launch_per_example_sqnorm<T>(SqnormRoute::kDirect, none, none, 0, 3, 4, 5, nullptr, out.data(), nullptr);
  report(err == cudaSuccess && std::isnan(static_cast<double>(out[0])), std::string("sqnorm B=0 ") + type_name<T>(), 0);
  for (SqnormRoute route : {SqnormRoute::kGhost, SqnormRoute::kDirect, SqnormRoute::kRowNorms}) {
    for (int which = 0; which < 3; ++which) {
      std::fill(out.begin(), out.end(), std::numeric_limits<A>::quiet_NaN());
      err = launch_per_example_sqnorm<T>(route, none, none, 3, which == 0 ? 0 : 2, which == 1 ? 0 : 4,
                                         which == 2 ? 0 : 5, nullptr, out.data(), nullptr);
      report(err == cudaSuccess && out[0] == A(0) && out[1] == A(0) && out[2] == A(0) &&
                 std::isnan(static_cast<double>(out[3])),
             std::string("sqnorm empty sum ") + type_name<T>(), 0);
    }
  }
}

template <typename T>
void sqnorm_suite(std::mt19937& gen) {
  check_sqnorm_empty<T>();
  // (B, T, d_in, d_out): T = 1, d = 1, B = 1; sizes that are not multiples of any tile;
  // d_out > 64 (the 128-row configuration), several tiles in both dimensions; ghost with
  // T <= 32 (32-row blocks), T = 33 (one 64-row block), T = 70 (two blocks: off-diagonal pair).
  const int64_t shapes[][4] = {
      {1, 1, 1, 1},    {3, 1, 13, 33}, {2, 7, 1, 5},    {3, 33, 13, 7},  {2, 5, 130, 65}, {2, 40, 72, 24},
      {1, 70, 16, 8},  {2, 33, 24, 16}, {2, 31, 8, 40}, {1, 3, 9, 200},  {2, 17, 260, 130},
  };
  for (const auto& s : shapes) {
    for (SqnormRoute route : {SqnormRoute::kGhost, SqnormRoute::kDirect, SqnormRoute::kRowNorms}) {
      if (route == SqnormRoute::kRowNorms && s[1] != 1) continue;
      for (int layout = 0; layout < 3; ++layout) {
        // 0: contiguous; 1: rows padded to a multiple of 8 elements (16-byte vectors with a
        // partial chunk at the row end); 2: contiguous but shifted by one element (misaligned)
        const int pad = layout == 1 ? 8 : 0;
        const int shift = layout == 2 ? 1 : 0;
        check_sqnorm<T>(s[0], s[1], s[2], s[3], route, pad, shift, gen);
      }
    }
  }
}

template <typename T>
void check_weighted_empty() {
  // R == 0: zeros; d_in or d_out == 0: nothing to write.
  std::vector<T> out(7, nan_value<T>());
  WeightedOuterSumPlan plan;
  cudaError_t err = plan_weighted_outer_sum<T>(0, 3, 2, &plan);
  if (err == cudaSuccess) {
    err = launch_weighted_outer_sum<T>(plan, nullptr, 0, nullptr, 0, nullptr, 1, 0, 3, 2, nullptr, out.data(), nullptr);
  }
  bool ok = err == cudaSuccess && std::isnan(to_double(out[6]));
  for (int k = 0; k < 6; ++k) ok = ok && to_double(out[k]) == 0.0;
  report(ok, std::string("weighted R=0 ") + type_name<T>(), 0);
}

template <typename T>
void weighted_suite(std::mt19937& gen) {
  check_weighted_empty<T>();
  const int64_t shapes[][4] = {
      {1, 1, 1, 1}, {3, 5, 13, 33}, {2, 7, 130, 65}, {5, 9, 24, 16}, {4, 200, 8, 8}, {3, 100, 17, 70},
  };
  for (const auto& s : shapes) {
    for (int layout = 0; layout < 3; ++layout) {
      const int pad = layout == 1 ? 8 : 0;
      const int shift = layout == 2 ? 1 : 0;
      check_weighted<T>(s[0], s[1], s[2], s[3], pad, shift, gen);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string which = argc > 1 ? argv[1] : "all";
  const std::string mode = argc > 2 ? argv[2] : "late";
  for (int i = 3; i < argc; ++i) {  // OP:TYPE=TOL
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    if (eq == std::string::npos) {
      std::printf("bad tolerance argument %s (expected OP:TYPE=TOL)\n", arg.c_str());
      return 2;
    }
    g_tolerance[arg.substr(0, eq)] = std::strtod(arg.c_str() + eq + 1, nullptr);
  }
  emu::g_mode = mode == "early" ? emu::CopyMode::kEarlyForward
                : mode == "reverse" ? emu::CopyMode::kEarlyReverse
                                    : emu::CopyMode::kLate;
  std::mt19937 gen(12345);
  if (which == "sqnorm" || which == "all") {
    sqnorm_suite<float>(gen);
    sqnorm_suite<double>(gen);
    sqnorm_suite<__half>(gen);
    sqnorm_suite<__nv_bfloat16>(gen);
  }
  if (which == "weighted" || which == "all") {
    weighted_suite<float>(gen);
    weighted_suite<double>(gen);
    weighted_suite<__half>(gen);
    weighted_suite<__nv_bfloat16>(gen);
  }
  if (which == "sgd" || which == "all") check_sgd(gen);
  std::printf("%d checks, %d failures (%s, copies %s)\n", g_checks, g_failures, which.c_str(), mode.c_str());
  return g_failures == 0 ? 0 : 1;
}
