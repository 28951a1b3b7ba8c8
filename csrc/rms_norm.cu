// RMSNorm forward / backward (GIM frozen statistic or ordinary) as torch ops fastgim_C::rms_norm_*.
//
// The Python side (fastgim/ops/cuda_ext.py) passes the effective weight already as float32, rounded the
// way the model family rounds it (w + offset in the weight dtype, or offset + w.float() for Gemma), and
// `round_normed` = true for the Llama casting order (n is rounded to x's dtype before the weight multiply).
//   forward:  rstd = rsqrt(mean(x^2) + eps); out = w_eff * n  (n = x * rstd)
//   backward: g = dy * w_eff; frozen: dx = g * rstd; ordinary: dx = (g - n * mean(g * n)) * rstd;
//             dweight partials (float32, one row per warp/block-row; when wanted) = sum over its rows of
//             dy * n.
#include <torch/library.h>

#include "norms_common.cuh"

namespace fastgim {
namespace {

template <typename T, int VEC, int ITEMS>
__global__ void rms_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ out,
                               float* __restrict__ rstd_out, int64_t rows, int hidden, float eps,
                               bool round_normed) {
  __shared__ float scratch[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // only whole warps in warp-per-row mode
  const T* xr = x + row * hidden;
  T* outr = out + row * hidden;
  float vals[ITEMS][VEC];
  float ss = 0.0f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int c = (it * blockDim.x + threadIdx.x) * VEC;
    if (c < hidden) {
      load_pack<T, VEC>(xr + c, vals[it]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) ss += vals[it][i] * vals[it][i];
    }
  }
  ss = row_sum(ss, scratch);
  const float r = rsqrtf(ss / static_cast<float>(hidden) + eps);
  if (threadIdx.x == 0) rstd_out[row] = r;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int c = (it * blockDim.x + threadIdx.x) * VEC;
    if (c >= hidden) continue;
    float o[VEC];
    float wv[VEC];
    if (w != nullptr) load_pack<float, VEC>(w + c, wv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float n = vals[it][i] * r;
      if (round_normed) n = round_to<T>(n);
      o[i] = w != nullptr ? wv[i] * n : n;
    }
    store_pack<T, VEC>(outr + c, o);
  }
}

template <typename T, int VEC, int ITEMS>
__global__ void rms_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                               const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ dw_part,
                               int64_t rows, int hidden, bool round_normed, bool frozen) {
  __shared__ float scratch[32];
  float acc[ITEMS][VEC];
  float wv[ITEMS][VEC];
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int c = (it * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[it][i] = 0.0f;
    if (w != nullptr && c < hidden) load_pack<float, VEC>(w + c, wv[it]);
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows; row += stride) {
    const float r = rstd[row];
    float g[ITEMS][VEC];
    float n[ITEMS][VEC];
    float dot = 0.0f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int c = (it * blockDim.x + threadIdx.x) * VEC;
      if (c >= hidden) continue;
      float dyv[VEC];
      load_pack<T, VEC>(dy + row * hidden + c, dyv);
      load_pack<T, VEC>(x + row * hidden + c, n[it]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        n[it][i] *= r;
        g[it][i] = w != nullptr ? dyv[i] * wv[it][i] : dyv[i];
        if (dw_part != nullptr) acc[it][i] += dyv[i] * (round_normed ? round_to<T>(n[it][i]) : n[it][i]);
        dot += g[it][i] * n[it][i];
      }
    }
    if (!frozen) dot = row_sum(dot, scratch) / static_cast<float>(hidden);
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int c = (it * blockDim.x + threadIdx.x) * VEC;
      if (c >= hidden) continue;
      float o[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = frozen ? g[it][i] * r : (g[it][i] - n[it][i] * dot) * r;
      store_pack<T, VEC>(dx + row * hidden + c, o);
    }
  }
  if (dw_part == nullptr) return;
  float* part = dw_part + (static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * hidden;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int c = (it * blockDim.x + threadIdx.x) * VEC;
    if (c < hidden) store_pack<float, VEC>(part + c, acc[it]);
  }
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                    double eps, bool round_normed,
                                                    int64_t stream_id) {
  check_matrix(x, "x");
  const int64_t rows = x.size(0), hidden = x.size(1);
  check_vector(weight, hidden, "weight (effective, float32)");
  c10::DeviceGuard guard(x.device());
  auto out = at::empty_like(x);
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0 || hidden == 0) return {out, rstd};
  const RowPlan plan = plan_rows(hidden, static_cast<int>(x.element_size()), aligned16(x) && aligned16(out));
  const float* w = weight.has_value() ? static_cast<float*>(weight->data_ptr()) : nullptr;
  const dim3 block(plan.threads, plan.rows_per_block);
  const dim3 grid(static_cast<unsigned>((rows + plan.rows_per_block - 1) / plan.rows_per_block));
  const cudaStream_t stream = as_stream(stream_id);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_plan<T>(plan, [&](auto vec_c, auto items_c) {
      constexpr int V = decltype(vec_c)::value;
      constexpr int I = decltype(items_c)::value;
      rms_fwd_kernel<T, V, I><<<grid, block, 0, stream>>>(
          static_cast<const T*>(x.data_ptr()), w, static_cast<T*>(out.data_ptr()),
          static_cast<float*>(rstd.data_ptr()), rows, static_cast<int>(hidden), static_cast<float>(eps),
          round_normed);
      check_cuda(cudaGetLastError(), "rms_norm kernel launch");
    });
  });
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                     const std::optional<at::Tensor>& weight,
                                                     const at::Tensor& rstd, bool round_normed, bool frozen,
                                                     bool want_dweight, int64_t stream_id) {
  check_matrix(x, "x");
  check_matrix(dy, "dy");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "fastgim_C: dy must match x in shape and dtype");
  const int64_t rows = x.size(0), hidden = x.size(1);
  check_vector(weight, hidden, "weight (effective, float32)");
  check_vector(rstd, rows, "rstd");
  c10::DeviceGuard guard(x.device());
  auto dx = at::empty_like(x);
  const bool has_w = weight.has_value() && want_dweight;
  if (rows == 0 || hidden == 0) {
    const auto f32 = x.options().dtype(at::kFloat);
    return {dx, has_w ? at::zeros({1, hidden}, f32) : at::empty({0}, f32)};
  }
  const RowPlan plan = plan_rows(hidden, static_cast<int>(x.element_size()),
                                 aligned16(x) && aligned16(dy) && aligned16(dx));
  const int blocks = backward_blocks(rows, plan.rows_per_block);
  auto dw_part = has_w ? at::empty({static_cast<int64_t>(blocks) * plan.rows_per_block, hidden},
                                   x.options().dtype(at::kFloat))
                       : at::empty({0}, x.options().dtype(at::kFloat));
  const float* w = weight.has_value() ? static_cast<float*>(weight->data_ptr()) : nullptr;
  const dim3 block(plan.threads, plan.rows_per_block);
  const cudaStream_t stream = as_stream(stream_id);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_plan<T>(plan, [&](auto vec_c, auto items_c) {
      constexpr int V = decltype(vec_c)::value;
      constexpr int I = decltype(items_c)::value;
      rms_bwd_kernel<T, V, I><<<blocks, block, 0, stream>>>(
          static_cast<const T*>(dy.data_ptr()), static_cast<const T*>(x.data_ptr()), w,
          static_cast<const float*>(rstd.data_ptr()), static_cast<T*>(dx.data_ptr()),
          has_w ? static_cast<float*>(dw_part.data_ptr()) : nullptr, rows, static_cast<int>(hidden),
          round_normed, frozen);
      check_cuda(cudaGetLastError(), "rms_norm kernel launch");
    });
  });
  return {dx, dw_part};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgim_C, CUDA, m) {
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
}

}  // namespace fastgim
