// CPU GIM attention backward: one fused pass per block of query rows, no score matrix kept.
//
// Op ``fastgim_cpu::gim_attention_backward`` (float32, float64 or bfloat16 inputs, any T > 0):
//
//   per query head h (threads take heads one at a time), per block of R query rows, against the
//   keys [0, hi) it can see:
//     X  = (alpha q) k^T - c LSE          alpha = scale log2(e) / T, c = log2(e) / T   (one GEMM)
//     E  = 2^X  (= exp((S - LSE) / T), 0 at causally hidden keys)
//     P_T = E / rowsum(E);   P = E^T / rowsum(E^T)  (E^2 for T = 2, E for T = 1)
//     dV += P^T (g dO)                                                               (GEMM)
//     dP  = dO v^T                                                                   (GEMM)
//     dS  = P_T (dP - rowsum(dP P_T));    dgate += sum rowsum(dP P)
//     dQ  = dS k;   dK += dS^T q                                                     (two GEMMs)
//   scaled at the end by scale * q_scale * g, scale * k_scale * g, v_scale * g.
//
// bfloat16: the GEMMs take bfloat16 operands (P' and dS rounded to bfloat16, as PyTorch's flash
// backward does) and accumulate in float32; the softmax arithmetic and the gradients are float32.
// Both softmaxes are normalised by their own row sums, so the forward's LSE only has to be close
// (it keeps 2^X <= 1): float64 results match the float64 reference to rounding although the LSE is
// float32. Scope (the Python side checks it and falls back to the torch backend otherwise): no mask,
// window or softcap; causal only with Lq <= Lk (every row sees a key).
//
// Subnormal numbers (|x| < 1.2e-38 in float32) are flushed to zero while the kernel runs (x86's
// FTZ and DAZ flags, per worker thread, restored after): gradients of that size are common far from
// the loss (CHG's query and key gradients: up to half the entries) and every later GEMM on them runs
// many times slower; the values they stand for are below 1e-30 of the largest ones.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

namespace fastgim_cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTGIM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTGIM_CLONES
#endif
#define FASTGIM_INLINE inline __attribute__((always_inline))

// 2^x for x <= 0 (Cephes exp2f polynomial, relative error ~2e-7); inputs below -126 give 2^-126.
FASTGIM_INLINE float fast_exp2(float x) {
  x = x < -126.0f ? -126.0f : x;
  const float n = std::floor(x + 0.5f);
  const float f = x - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

FASTGIM_INLINE double fast_exp2(double x) { return std::exp2(x); }

enum class Mode { kOne, kTwo, kOther };  // T = 1, T = 2, any other T

// bfloat16 storage as raw bits (round to nearest even; no NaN reaches it).
using bf16 = uint16_t;
FASTGIM_INLINE float load(float x) { return x; }
FASTGIM_INLINE double load(double x) { return x; }
FASTGIM_INLINE float load(bf16 x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
template <typename S> FASTGIM_INLINE S store(float x);
template <> FASTGIM_INLINE float store<float>(float x) { return x; }
template <> FASTGIM_INLINE bf16 store<bf16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<bf16>(bits >> 16);
}
template <typename S> FASTGIM_INLINE S store(double x) { return x; }

// Pass A over one row: E = 2^(x - bias) in place for j < visible, 0 after; the unnormalised P' into p
// (E^2 for T = 2, E^T otherwise, E for T = 1 when p is given). Returns rowsum(E) and rowsum(P').
template <typename T, typename S>
FASTGIM_INLINE void exp_row(T* s, S* p, int64_t visible, int64_t width, T bias, T temperature, Mode mode,
                            T* sum_e, T* sum_p) {
  T se = 0, sp = 0;
  if (mode == Mode::kOther) {
#pragma omp simd reduction(+ : se, sp)
    for (int64_t j = 0; j < visible; ++j) {
      const T x = s[j] - bias;
      const T e = fast_exp2(x);
      const T pj = fast_exp2(x * temperature);
      s[j] = e;
      p[j] = store<S>(pj);
      se += e;
      sp += pj;
    }
  } else if (mode == Mode::kTwo) {
#pragma omp simd reduction(+ : se, sp)
    for (int64_t j = 0; j < visible; ++j) {
      const T e = fast_exp2(s[j] - bias);
      s[j] = e;
      p[j] = store<S>(e * e);
      se += e;
      sp += e * e;
    }
  } else if (p != nullptr) {
#pragma omp simd reduction(+ : se)
    for (int64_t j = 0; j < visible; ++j) {
      const T e = fast_exp2(s[j] - bias);
      s[j] = e;
      p[j] = store<S>(e);
      se += e;
    }
    sp = se;
  } else {
#pragma omp simd reduction(+ : se)
    for (int64_t j = 0; j < visible; ++j) {
      const T e = fast_exp2(s[j] - bias);
      s[j] = e;
      se += e;
    }
    sp = se;
  }
  for (int64_t j = visible; j < width; ++j) s[j] = 0;
  if (p != nullptr)
    for (int64_t j = visible; j < width; ++j) p[j] = store<S>(T(0));
  *sum_e = se;
  *sum_p = sp;
}

// Pass B over one row: dP (in d) -> dS = t E (dP - t rowsum(dP E)) into ds (may be d). Returns
// rowsum(dP P') when want_gate (P' from E for T = 1, 2, from p otherwise).
template <typename T, typename S>
FASTGIM_INLINE T ds_row(T* d, const T* e, const S* p, S* ds, int64_t width, T t, Mode mode, bool want_gate) {
  T u = 0, w = 0;
  if (want_gate && mode == Mode::kTwo) {
#pragma omp simd reduction(+ : u, w)
    for (int64_t j = 0; j < width; ++j) {
      const T de = d[j] * e[j];
      u += de;
      w += de * e[j];
    }
  } else if (want_gate && mode == Mode::kOther) {
#pragma omp simd reduction(+ : u, w)
    for (int64_t j = 0; j < width; ++j) {
      u += d[j] * e[j];
      w += d[j] * load(p[j]);
    }
  } else {
#pragma omp simd reduction(+ : u)
    for (int64_t j = 0; j < width; ++j) u += d[j] * e[j];
    w = u;
  }
  const T delta = t * u;
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) ds[j] = store<S>(t * e[j] * (d[j] - delta));
  return w;
}

struct RowArgs {
  int64_t rows, width;
  const int64_t* visible;
  Mode mode;
  bool want_gate;
};

// The hot loops, compiled per instruction set for float (the right clone is picked at load time).
template <typename T, typename S>
FASTGIM_INLINE void exp_rows_impl(const RowArgs& a, T* s, S* p, const T* bias, T temperature, T* sum_e, T* sum_p) {
  for (int64_t r = 0; r < a.rows; ++r)
    exp_row<T, S>(s + r * a.width, p ? p + r * a.width : nullptr, a.visible[r], a.width, bias[r], temperature,
                  a.mode, sum_e + r, sum_p + r);
}

template <typename T, typename S>
FASTGIM_INLINE void ds_rows_impl(const RowArgs& a, T* d, const T* e, const S* p, S* ds, const T* t, T* w) {
  for (int64_t r = 0; r < a.rows; ++r)
    w[r] = ds_row<T, S>(d + r * a.width, e + r * a.width, p ? p + r * a.width : nullptr, ds + r * a.width,
                        a.width, t[r], a.mode, a.want_gate);
}

FASTGIM_CLONES void exp_rows(const RowArgs& a, float* s, float* p, const float* bias, float temperature,
                             float* sum_e, float* sum_p) {
  exp_rows_impl<float, float>(a, s, p, bias, temperature, sum_e, sum_p);
}
FASTGIM_CLONES void exp_rows(const RowArgs& a, float* s, bf16* p, const float* bias, float temperature,
                             float* sum_e, float* sum_p) {
  exp_rows_impl<float, bf16>(a, s, p, bias, temperature, sum_e, sum_p);
}
void exp_rows(const RowArgs& a, double* s, double* p, const double* bias, double temperature, double* sum_e,
              double* sum_p) {
  exp_rows_impl<double, double>(a, s, p, bias, temperature, sum_e, sum_p);
}
FASTGIM_CLONES void ds_rows(const RowArgs& a, float* d, const float* e, const float* p, float* ds, const float* t,
                            float* w) {
  ds_rows_impl<float, float>(a, d, e, p, ds, t, w);
}
FASTGIM_CLONES void ds_rows(const RowArgs& a, float* d, const float* e, const bf16* p, bf16* ds, const float* t,
                            float* w) {
  ds_rows_impl<float, bf16>(a, d, e, p, ds, t, w);
}
void ds_rows(const RowArgs& a, double* d, const double* e, const double* p, double* ds, const double* t,
             double* w) {
  ds_rows_impl<double, double>(a, d, e, p, ds, t, w);
}

// BLAS (exported by libtorch_cpu on the usual builds: MKL's, with its bfloat16 x bfloat16 -> float32
// GEMM); weak, so that the library also loads without them and the GEMMs then go through ATen.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
void GEMM_BF16BF16F32(const char*, const char*, const int*, const int*, const int*, const float*, const bf16*,
                      const int*, const bf16*, const int*, const float*, float*, const int*) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

// One BLAS thread on this thread while alive: the GEMMs run inside our own parallel loop, and MKL's
// nested teams (torch sets MKL's global thread count) spin-wait against it on a busy machine.
// Runs work() on n threads (this one included) and rethrows the first exception. Not at::parallel_for: its
// OpenMP body is inlined into this file, which is built without -fopenmp, so it would run on one thread.
template <typename F>
void run_on_threads(int64_t n, const F& work) {
  if (n <= 1) {
    work();
    return;
  }
  const at::ThreadLocalState state;
  std::vector<std::exception_ptr> errors(n);
  std::vector<std::thread> threads;
  threads.reserve(n - 1);
  for (int64_t i = 1; i < n; ++i) {
    threads.emplace_back([&, i] {
      at::ThreadLocalStateGuard guard(state);
      try {
        work();
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
  }
  try {
    work();
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& thread : threads) thread.join();
  for (auto& error : errors) {
    if (error) std::rethrow_exception(error);
  }
}

// Flush-to-zero and denormals-are-zero on this thread while alive (x86; elsewhere no change).
struct FlushSubnormals {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int saved = _mm_getcsr();
  FlushSubnormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushSubnormals() { _mm_setcsr(saved); }
#endif
};

struct SingleThreadedBlas {
  int previous = 0;
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
  }
};

template <typename S> constexpr at::ScalarType scalar_type_of() {
  if constexpr (std::is_same_v<S, bf16>) return at::kBFloat16;
  else return c10::CppTypeToScalarType<S>::value;
}

template <typename S>
at::Tensor as_matrix(const S* data, bool trans, int64_t rows, int64_t cols, int64_t ld) {
  // op(X) of a row-major X with leading dimension ld, as a float / double tensor; op(X) is rows x cols.
  auto opts = at::TensorOptions().dtype(scalar_type_of<S>());
  at::Tensor x = trans ? at::from_blob(const_cast<S*>(data), {cols, rows}, {ld, 1}, opts).t()
                       : at::from_blob(const_cast<S*>(data), {rows, cols}, {ld, 1}, opts);
  return std::is_same_v<S, bf16> ? x.to(at::kFloat) : x;
}

// Row-major C (m x n, ldc) = alpha op(A) op(B) + beta C, op(A) m x k: column-major BLAS on the transposes.
template <typename S, typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const S* a, int64_t lda, const S* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
  if constexpr (std::is_same_v<S, float>) {
    if (sgemm_ != nullptr) return sgemm_(&cb, &ca, &in, &im, &ik, &alpha, b, &ib, a, &ia, &beta, c, &ic);
  } else if constexpr (std::is_same_v<S, double>) {
    if (dgemm_ != nullptr) return dgemm_(&cb, &ca, &in, &im, &ik, &alpha, b, &ib, a, &ia, &beta, c, &ic);
  } else {
    if (GEMM_BF16BF16F32 != nullptr)
      return GEMM_BF16BF16F32(&cb, &ca, &in, &im, &ik, &alpha, b, &ib, a, &ia, &beta, c, &ic);
  }
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  at::addmm_out(out, out, as_matrix(a, ta, m, k, lda), as_matrix(b, tb, k, n, ldb), beta, alpha);
}

struct Problem {
  int64_t batch, hq, hkv, lq, lk, dim, dim_v, block_rows;
  bool causal;
  double scale, temperature, q_scale, k_scale, v_scale;
};

// Per-head pointers: q, dout (Lq rows), k (Lk, D), v (Lk, Dv) in the storage type S; the per-head
// gradients dq (Lq, D), dk (Lk, D), dv (Lk, Dv) and lse (Lq) in the compute type T.
template <typename S, typename T>
struct Head {
  const S *q, *k, *v, *dout;
  const T* lse;
  T *dq, *dk, *dv;
  T gate;
};

// Thread workspace: score-sized tiles s, d (T) and p, ds (S: aliases of d for T = 2 / in place when
// S == T), plus row vectors.
template <typename S, typename T>
struct Workspace {
  std::vector<T> s, d, rows;
  std::vector<S> p, ds, do_scaled;
  Workspace(const Problem& pb, Mode mode) : s(pb.block_rows * pb.lk), d(pb.block_rows * pb.lk),
      rows(5 * pb.block_rows), do_scaled(pb.block_rows * pb.dim_v) {
    constexpr bool same = std::is_same_v<S, T>;
    if (!same || mode == Mode::kOther) p.resize(pb.block_rows * pb.lk);
    if (!same) ds.resize(pb.block_rows * pb.lk);
  }
};

// One query head: fills dq, accumulates into dk / dv (zeroed, per head), returns sum_rows rowsum(dP P).
template <typename S, typename T>
T head_backward(const Problem& pb, const Head<S, T>& h, bool want_gate, Workspace<S, T>& ws) {
  constexpr bool same = std::is_same_v<S, T>;
  const Mode mode = pb.temperature == 1.0 ? Mode::kOne : (pb.temperature == 2.0 ? Mode::kTwo : Mode::kOther);
  const T c = static_cast<T>(M_LOG2E / pb.temperature);
  const T alpha = static_cast<T>(pb.scale) * c;
  const int64_t offset = pb.lk - pb.lq, rmax = pb.block_rows, D = pb.dim, Dv = pb.dim_v;
  T *s_buf = ws.s.data(), *d_buf = ws.d.data();
  T *bias = ws.rows.data(), *sum_e = bias + rmax, *sum_p = sum_e + rmax, *t = sum_p + rmax, *w = t + rmax;
  // P' (S): its own buffer, except T = 2 with S == T (d, dead once dV is accumulated) and T = 1 with
  // S == T (E itself). dS (S): in place in d when S == T.
  S* p_buf = nullptr;
  if (!ws.p.empty()) p_buf = ws.p.data();
  else if constexpr (same) p_buf = mode == Mode::kTwo ? d_buf : nullptr;
  S* ds_buf = nullptr;
  if constexpr (same) ds_buf = d_buf;
  else ds_buf = ws.ds.data();
  S* do_scaled = ws.do_scaled.data();
  std::vector<int64_t> visible(rmax);
  T gate_sum = 0;
  for (int64_t i0 = 0; i0 < pb.lq; i0 += rmax) {
    const int64_t rows = std::min(rmax, pb.lq - i0);
    const int64_t hi = pb.causal ? std::min(pb.lk, i0 + rows + offset) : pb.lk;
    for (int64_t r = 0; r < rows; ++r) {
      visible[r] = pb.causal ? std::min(hi, i0 + r + offset + 1) : hi;
      bias[r] = c * h.lse[i0 + r];
    }
    const RowArgs args{rows, hi, visible.data(), mode, want_gate};
    const S* q_blk = h.q + i0 * D;
    const S* do_blk = h.dout + i0 * Dv;
    gemm<S, T>(false, true, rows, hi, D, alpha, q_blk, D, h.k, D, T(0), s_buf, hi);  // X = alpha q k^T
    exp_rows(args, s_buf, p_buf, bias, static_cast<T>(pb.temperature), sum_e, sum_p);
    // dV += P'^T (dO / rowsum(P')): the row normalisation goes to the small dO rows.
    for (int64_t r = 0; r < rows; ++r) {
      t[r] = T(1) / sum_e[r];
      const T rp = T(1) / sum_p[r];
      for (int64_t x = 0; x < Dv; ++x) do_scaled[r * Dv + x] = store<S>(load(do_blk[r * Dv + x]) * rp);
    }
    const S* p_mat = p_buf;
    if constexpr (same) p_mat = p_buf ? p_buf : s_buf;
    gemm<S, T>(true, false, hi, Dv, rows, T(1), p_mat, hi, do_scaled, Dv, T(1), h.dv, Dv);
    gemm<S, T>(false, true, rows, hi, Dv, T(1), do_blk, Dv, h.v, Dv, T(0), d_buf, hi);  // dP = dO v^T
    ds_rows(args, d_buf, s_buf, mode == Mode::kOther ? p_buf : nullptr, ds_buf, t, w);
    if (want_gate) {
      for (int64_t r = 0; r < rows; ++r) gate_sum += w[r] / sum_p[r];
    }
    gemm<S, T>(false, false, rows, D, hi, T(1), ds_buf, hi, h.k, D, T(0), h.dq + i0 * D, D);  // dQ = dS k
    gemm<S, T>(true, false, hi, D, rows, T(1), ds_buf, hi, q_blk, D, T(1), h.dk, D);           // dK += dS^T q
  }
  const T g = h.gate;
  const T fq = static_cast<T>(pb.scale * pb.q_scale) * g, fk = static_cast<T>(pb.scale * pb.k_scale) * g;
  const T fv = static_cast<T>(pb.v_scale) * g;
  for (int64_t x = 0; x < pb.lq * D; ++x) h.dq[x] *= fq;
  for (int64_t x = 0; x < pb.lk * D; ++x) h.dk[x] *= fk;
  for (int64_t x = 0; x < pb.lk * Dv; ++x) h.dv[x] *= fv;
  return gate_sum;
}

template <typename S, typename T>
std::vector<at::Tensor> backward_impl(const Problem& pb, const at::Tensor& dout, const at::Tensor& q,
                                      const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                                      const c10::optional<at::Tensor>& gate) {
  auto opts = q.options().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor lse_c = lse.to(opts).contiguous();
  at::Tensor gate_c = gate.has_value() ? gate->to(opts).contiguous() : at::Tensor();
  const bool want_gate = gate.has_value();
  const int64_t group = pb.hq / pb.hkv;
  at::Tensor dq = at::empty({pb.batch, pb.hq, pb.lq, pb.dim}, opts);
  at::Tensor dk = at::zeros({pb.batch, pb.hq, pb.lk, pb.dim}, opts);
  at::Tensor dv = at::zeros({pb.batch, pb.hq, pb.lk, pb.dim_v}, opts);
  at::Tensor dgate = at::zeros({pb.batch, pb.hq}, opts);
  const Mode mode = pb.temperature == 1.0 ? Mode::kOne : (pb.temperature == 2.0 ? Mode::kTwo : Mode::kOther);
  auto ptr = [](const at::Tensor& x) { return static_cast<const S*>(x.data_ptr()); };
  const S *qp = ptr(q), *kp = ptr(k), *vp = ptr(v), *dop = ptr(dout);
  const T* lsep = lse_c.data_ptr<T>();
  T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>(), *dgp = dgate.data_ptr<T>();
  const int64_t D = pb.dim, Dv = pb.dim_v;
  // One task per thread, each taking the next head until none is left: a thread that the OS holds
  // back (a busy machine) does fewer heads instead of making the others wait for its fixed share.
  const int64_t heads = pb.batch * pb.hq;
  std::atomic<int64_t> next_head{0};
  run_on_threads(std::min<int64_t>(heads, at::get_num_threads()), [&] {
    SingleThreadedBlas single_threaded_blas;
    FlushSubnormals flush_subnormals;
    Workspace<S, T> ws(pb, mode);
    for (int64_t bh = next_head++; bh < heads; bh = next_head++) {
      const int64_t kv = (bh / pb.hq) * pb.hkv + (bh % pb.hq) / group;  // b * Hkv + h / G
      Head<S, T> h{qp + bh * pb.lq * D, kp + kv * pb.lk * D, vp + kv * pb.lk * Dv, dop + bh * pb.lq * Dv,
                   lsep + bh * pb.lq, dqp + bh * pb.lq * D, dkp + bh * pb.lk * D, dvp + bh * pb.lk * Dv,
                   want_gate ? gate_c.data_ptr<T>()[bh] : T(1)};
      dgp[bh] = head_backward<S, T>(pb, h, want_gate, ws);
    }
  });
  if (group > 1) {  // the sums over a group's heads may cancel into the subnormal range: flush those too
    const double smallest_normal = static_cast<double>(std::numeric_limits<T>::min());
    dk = dk.view({pb.batch, pb.hkv, group, pb.lk, pb.dim}).sum(2);
    dv = dv.view({pb.batch, pb.hkv, group, pb.lk, pb.dim_v}).sum(2);
    dk.masked_fill_(dk.abs() < smallest_normal, 0);
    dv.masked_fill_(dv.abs() < smallest_normal, 0);
  }
  return {dq, dk, dv, want_gate ? dgate : at::empty({0}, opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gim_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
    const c10::optional<at::Tensor>& gate, bool causal, double scale, double temperature, double q_scale,
    double k_scale, double v_scale, int64_t block_rows) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && dout.dim() == 4, "q, k, v, dout must be 4D");
  const at::ScalarType dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "float32, float64 or bfloat16 only");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  dout.scalar_type() == q.scalar_type(), "q, k, v, dout must share a dtype");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && dout.is_contiguous(),
              "q, k, v, dout must be contiguous");
  TORCH_CHECK(temperature > 0 && block_rows > 0, "temperature and block_rows must be positive");
  Problem pb{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3), block_rows, causal,
             scale, temperature, q_scale, k_scale, v_scale};
  TORCH_CHECK(pb.hq % pb.hkv == 0, "query heads must be a multiple of key/value heads");
  TORCH_CHECK(!causal || pb.lq <= pb.lk, "causal attention needs Lq <= Lk here (every row sees a key)");
  TORCH_CHECK(pb.lq > 0 && pb.lk > 0, "empty sequences are not handled here");
  pb.block_rows = std::min(pb.block_rows, pb.lq);
  std::vector<at::Tensor> r = dtype == at::kFloat    ? backward_impl<float, float>(pb, dout, q, k, v, lse, gate)
                             : dtype == at::kDouble ? backward_impl<double, double>(pb, dout, q, k, v, lse, gate)
                                                    : backward_impl<bf16, float>(pb, dout, q, k, v, lse, gate);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace

TORCH_LIBRARY(fastgim_cpu, m) {
  m.def(
      "gim_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor? gate, bool causal, "
      "float scale, float temperature, float q_scale, float k_scale, float v_scale, int block_rows) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastgim_cpu, CPU, m) { m.impl("gim_attention_backward", &gim_attention_backward); }

}  // namespace fastgim_cpu
