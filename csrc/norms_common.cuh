// Shared pieces of the fastgim norm kernels: 16-byte vector packs, row reductions, launch planning.
//
// Layout: a contiguous (rows, hidden) matrix. A row is held in registers: each thread owns ITEMS
// packs of VEC elements (VEC * sizeof(T) == 16 bytes when the row is 16-byte aligned, else VEC == 1).
// Small rows (at most 32 packs) run one warp per row with 4 rows per block; larger rows run one block
// per row. All arithmetic and statistics are fp32.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

namespace fastgim {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* ptr, float (&out)[N]) {
  Pack<T, N> p = *reinterpret_cast<const Pack<T, N>*>(ptr);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<float>(p.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* ptr, const float (&in)[N]) {
  Pack<T, N> p;
#pragma unroll
  for (int i = 0; i < N; ++i) p.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(ptr) = p;
}

// Rounds to T and back: the value the model sees after `.to(x.dtype)`.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the threads of one row: the warp (blockDim.x == 32) or the whole block (blockDim.y == 1).
// Every thread of the row gets the result. `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float row_sum(float v, float* scratch) {
  v = warp_sum(v);
  if (blockDim.x <= 32) return v;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

struct RowPlan {
  int vec;             // elements per pack
  int threads;         // threads per row (blockDim.x)
  int items;           // packs per thread (a power of two, at most kMaxItems)
  int rows_per_block;  // blockDim.y
};

constexpr int kMaxItems = 16;

inline bool aligned16(const at::Tensor& t) {
  return !t.defined() || t.numel() == 0 || reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

inline RowPlan plan_rows(int64_t hidden, int elem_size, bool aligned) {
  int vec = 16 / elem_size;
  if (!aligned || hidden % vec != 0) vec = 1;
  const int64_t packs = (hidden + vec - 1) / vec;
  RowPlan plan{vec, 32, 1, 4};
  if (packs > 32) {
    const int64_t want = (packs + 3) / 4;  // aim at 4 packs per thread
    plan.threads = static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(128, (want + 31) / 32 * 32)));
    plan.rows_per_block = 1;
  }
  const int64_t items = (packs + plan.threads - 1) / plan.threads;
  while (plan.items < items) plan.items *= 2;
  TORCH_CHECK(plan.items <= kMaxItems, "fastgim_C norms: hidden size ", hidden,
              " is too large for the register-resident CUDA kernels (at most ", 1024 * kMaxItems * vec,
              " here); use FASTGIM_NORM_BACKEND=triton or torch");
  return plan;
}

inline void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastgim_C: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), "fastgim_C: ", name,
              " must be a contiguous (rows, hidden) matrix, got ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "fastgim_C: ", name,
              " must be float32, float16 or bfloat16, got ", dt);
}

inline void check_vector(const c10::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == n &&
                  t->is_contiguous(),
              "fastgim_C: ", name, " must be a contiguous float32 CUDA vector of length ", n);
}

inline void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastgim_C: ", what, " failed: ", cudaGetErrorString(err));
}

// The caller (fastgim/ops/cuda_ext.py) passes torch.cuda.current_stream().cuda_stream, so that these
// sources need no CUDA-specific torch headers (absent from CPU wheels, against which CI compiles).
inline cudaStream_t as_stream(int64_t stream) {
  return reinterpret_cast<cudaStream_t>(static_cast<std::uintptr_t>(stream));
}

inline int backward_blocks(int64_t rows, int rows_per_block) {
  int device = 0;
  int sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  const int64_t needed = (rows + rows_per_block - 1) / rows_per_block;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, static_cast<int64_t>(sms) * 4)));
}

// Calls f.template operator()<T>() for the dtype of t (float, half, bfloat16).
template <typename F>
void dispatch_dtype(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "fastgim_C: unsupported dtype ", dt);
  }
}

// Calls f(std::integral_constant<int, VEC>{}, std::integral_constant<int, ITEMS>{}).
template <int VEC, typename F>
void dispatch_items(int items, F&& f) {
  switch (items) {
    case 1: f(std::integral_constant<int, VEC>{}, std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, VEC>{}, std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, VEC>{}, std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, VEC>{}, std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, VEC>{}, std::integral_constant<int, 16>{}); break;
    default: TORCH_CHECK(false, "fastgim_C: bad items per thread ", items);
  }
}

template <typename T, typename F>
void dispatch_plan(const RowPlan& plan, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  if (plan.vec == kVec) {
    dispatch_items<kVec>(plan.items, f);
  } else {
    dispatch_items<1>(plan.items, f);
  }
}

}  // namespace fastgim
