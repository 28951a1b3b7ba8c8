// LayerNorm forward / backward (GIM frozen std or ordinary) as torch ops fastgim_C::layer_norm_*.
//
// Weight and bias come as float32 vectors (or None) from fastgim/ops/cuda_ext.py.
//   forward:  mean, rstd = rsqrt(mean((x - mean)^2) + eps); out = (x - mean) * rstd * w + b (fp32, one rounding)
//   backward: g = dy * w; frozen: dx = (g - mean(g)) * rstd; ordinary: dx = (g - mean(g) - xhat * mean(g * xhat))
//             * rstd; float32 partials of dweight = sum dy * xhat and dbias = sum dy, one row per warp/block-row.
#include <torch/library.h>

#include "norms_common.cuh"

namespace fastgim {
namespace {

template <typename T, int VEC, int ITEMS>
__global__ void ln_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                              T* __restrict__ out, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                              int64_t rows, int hidden, float eps) {
  __shared__ float scratch[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // only whole warps in warp-per-row mode
  const T* xr = x + row * hidden;
  float vals[ITEMS][VEC];
  float sum = 0.0f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int c = (it * blockDim.x + threadIdx.x) * VEC;
    if (c < hidden) {
      load_pack<T, VEC>(xr + c, vals[it]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum += vals[it][i];
    }
  }
  const float mean = row_sum(sum, scratch) / static_cast<float>(hidden);
  float ss = 0.0f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int c = (it * blockDim.x + threadIdx.x) * VEC;
    if (c >= hidden) continue;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      vals[it][i] -= mean;
      ss += vals[it][i] * vals[it][i];
    }
  }
  const float r = rsqrtf(row_sum(ss, scratch) / static_cast<float>(hidden) + eps);
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = r;
  }
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int c = (it * blockDim.x + threadIdx.x) * VEC;
    if (c >= hidden) continue;
    float wv[VEC];
    float bv[VEC];
    if (w != nullptr) load_pack<float, VEC>(w + c, wv);
    if (b != nullptr) load_pack<float, VEC>(b + c, bv);
    float o[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      o[i] = vals[it][i] * r;
      if (w != nullptr) o[i] *= wv[i];
      if (b != nullptr) o[i] += bv[i];
    }
    store_pack<T, VEC>(out + row * hidden + c, o);
  }
}

template <typename T, int VEC, int ITEMS>
__global__ void ln_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                              const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
                              float* __restrict__ dw_part, float* __restrict__ db_part, int64_t rows, int hidden,
                              bool frozen) {
  __shared__ float scratch[32];
  float acc_w[ITEMS][VEC];
  float acc_b[ITEMS][VEC];
  float wv[ITEMS][VEC];
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int c = (it * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc_w[it][i] = acc_b[it][i] = 0.0f;
    if (w != nullptr && c < hidden) load_pack<float, VEC>(w + c, wv[it]);
  }
  const float inv_h = 1.0f / static_cast<float>(hidden);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows; row += stride) {
    const float mu = mean[row];
    const float r = rstd[row];
    float g[ITEMS][VEC];
    float xhat[ITEMS][VEC];
    float sum_g = 0.0f;
    float sum_gx = 0.0f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int c = (it * blockDim.x + threadIdx.x) * VEC;
      if (c >= hidden) continue;
      float dyv[VEC];
      load_pack<T, VEC>(dy + row * hidden + c, dyv);
      load_pack<T, VEC>(x + row * hidden + c, xhat[it]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        xhat[it][i] = (xhat[it][i] - mu) * r;
        g[it][i] = w != nullptr ? dyv[i] * wv[it][i] : dyv[i];
        acc_w[it][i] += dyv[i] * xhat[it][i];
        acc_b[it][i] += dyv[i];
        sum_g += g[it][i];
        sum_gx += g[it][i] * xhat[it][i];
      }
    }
    const float mean_g = row_sum(sum_g, scratch) * inv_h;
    const float mean_gx = frozen ? 0.0f : row_sum(sum_gx, scratch) * inv_h;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int c = (it * blockDim.x + threadIdx.x) * VEC;
      if (c >= hidden) continue;
      float o[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = (g[it][i] - mean_g - xhat[it][i] * mean_gx) * r;
      store_pack<T, VEC>(dx + row * hidden + c, o);
    }
  }
  const int64_t part_row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int c = (it * blockDim.x + threadIdx.x) * VEC;
    if (c >= hidden) continue;
    if (dw_part != nullptr) store_pack<float, VEC>(dw_part + part_row * hidden + c, acc_w[it]);
    if (db_part != nullptr) store_pack<float, VEC>(db_part + part_row * hidden + c, acc_b[it]);
  }
}

const float* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<const float*>(t->data_ptr()) : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  double eps, int64_t stream_id) {
  check_matrix(x, "x");
  const int64_t rows = x.size(0), hidden = x.size(1);
  check_vector(weight, hidden, "weight (float32)");
  check_vector(bias, hidden, "bias (float32)");
  c10::DeviceGuard guard(x.device());
  auto out = at::empty_like(x);
  auto mean = at::empty({rows}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0 || hidden == 0) return {out, mean, rstd};
  const RowPlan plan = plan_rows(hidden, static_cast<int>(x.element_size()), aligned16(x) && aligned16(out));
  const dim3 block(plan.threads, plan.rows_per_block);
  const dim3 grid(static_cast<unsigned>((rows + plan.rows_per_block - 1) / plan.rows_per_block));
  const cudaStream_t stream = as_stream(stream_id);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_plan<T>(plan, [&](auto vec_c, auto items_c) {
      constexpr int V = decltype(vec_c)::value;
      constexpr int I = decltype(items_c)::value;
      ln_fwd_kernel<T, V, I><<<grid, block, 0, stream>>>(
          static_cast<const T*>(x.data_ptr()), opt_ptr(weight), opt_ptr(bias), static_cast<T*>(out.data_ptr()),
          static_cast<float*>(mean.data_ptr()), static_cast<float*>(rstd.data_ptr()), rows,
          static_cast<int>(hidden), static_cast<float>(eps));
      check_cuda(cudaGetLastError(), "layer_norm kernel launch");
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rstd, bool frozen, bool want_dweight, bool want_dbias, int64_t stream_id) {
  check_matrix(x, "x");
  check_matrix(dy, "dy");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "fastgim_C: dy must match x in shape and dtype");
  const int64_t rows = x.size(0), hidden = x.size(1);
  check_vector(weight, hidden, "weight (float32)");
  check_vector(mean, rows, "mean");
  check_vector(rstd, rows, "rstd");
  c10::DeviceGuard guard(x.device());
  auto dx = at::empty_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  if (rows == 0 || hidden == 0) {
    return {dx, want_dweight ? at::zeros({1, hidden}, f32) : at::empty({0}, f32),
            want_dbias ? at::zeros({1, hidden}, f32) : at::empty({0}, f32)};
  }
  const RowPlan plan = plan_rows(hidden, static_cast<int>(x.element_size()),
                                 aligned16(x) && aligned16(dy) && aligned16(dx));
  const int blocks = backward_blocks(rows, plan.rows_per_block);
  const int64_t part_rows = static_cast<int64_t>(blocks) * plan.rows_per_block;
  auto dw_part = want_dweight ? at::empty({part_rows, hidden}, f32) : at::empty({0}, f32);
  auto db_part = want_dbias ? at::empty({part_rows, hidden}, f32) : at::empty({0}, f32);
  const dim3 block(plan.threads, plan.rows_per_block);
  const cudaStream_t stream = as_stream(stream_id);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_plan<T>(plan, [&](auto vec_c, auto items_c) {
      constexpr int V = decltype(vec_c)::value;
      constexpr int I = decltype(items_c)::value;
      ln_bwd_kernel<T, V, I><<<blocks, block, 0, stream>>>(
          static_cast<const T*>(dy.data_ptr()), static_cast<const T*>(x.data_ptr()), opt_ptr(weight),
          static_cast<const float*>(mean.data_ptr()), static_cast<const float*>(rstd.data_ptr()),
          static_cast<T*>(dx.data_ptr()), want_dweight ? static_cast<float*>(dw_part.data_ptr()) : nullptr,
          want_dbias ? static_cast<float*>(db_part.data_ptr()) : nullptr, rows, static_cast<int>(hidden), frozen);
      check_cuda(cudaGetLastError(), "layer_norm kernel launch");
    });
  });
  return {dx, dw_part, db_part};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgim_C, CUDA, m) {
  m.impl("layer_norm_forward", &layer_norm_forward);
  m.impl("layer_norm_backward", &layer_norm_backward);
}

}  // namespace fastgim
