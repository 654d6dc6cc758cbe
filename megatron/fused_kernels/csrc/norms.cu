// Fused LayerNorm / RMSNorm over the last dim of a [M, N] tensor, forward and backward.
//
// One block per row in the forward; the backward walks a block of rows per thread block and
// adds its weight / bias gradients into its own row of a [blocks, N] fp32 buffer (no atomics,
// deterministic), which the host sums. Statistics and math are fp32. The weight has x's dtype.
#include "convert.h"
#include "launch.h"

namespace sepneox {
namespace {

constexpr int kThreads = 256;

// Sum over the block; every thread gets the result. `buf` holds one float per warp.
__device__ float block_sum(float v, float* buf) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? buf[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    if (lane == 0) buf[0] = v;
  }
  __syncthreads();
  const float total = buf[0];
  __syncthreads();  // buf is reused by the next reduction
  return total;
}

template <typename T, bool RMS>
__global__ void norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                const T* __restrict__ bias, T* __restrict__ y,
                                float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                int64_t N, float eps) {
  __shared__ float buf[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * N;
  T* yr = y + row * N;
  float mean = 0.f;
  if (!RMS) {
    float s = 0.f;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) s += to_float(xr[j]);
    mean = block_sum(s, buf) / N;
  }
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const float c = to_float(xr[j]) - mean;
    ss += c * c;
  }
  const float rstd = rsqrtf(block_sum(ss, buf) / N + eps);
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const float xhat = (to_float(xr[j]) - mean) * rstd;
    float v;
    if (RMS) {  // round the normalised value to x's dtype first, as the reference does
      v = to_float(w[j]) * round_to<T>(xhat);
    } else {
      v = xhat * to_float(w[j]) + (bias ? to_float(bias[j]) : 0.f);
    }
    yr[j] = from_float<T>(v);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename T, bool RMS>
__global__ void norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                const T* __restrict__ w, const float* __restrict__ mean_in,
                                const float* __restrict__ rstd_in, T* __restrict__ dx,
                                float* __restrict__ dw_part, float* __restrict__ db_part,
                                int64_t M, int64_t N, int64_t rows_per_block) {
  __shared__ float buf[32];
  // Each thread owns columns j = threadIdx.x + k * blockDim.x of this block's partial rows.
  float* dwr = dw_part + blockIdx.x * N;
  float* dbr = db_part ? db_part + blockIdx.x * N : nullptr;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    dwr[j] = 0.f;
    if (dbr) dbr[j] = 0.f;
  }
  const int64_t start = blockIdx.x * rows_per_block;
  const int64_t end = start + rows_per_block < M ? start + rows_per_block : M;
  for (int64_t row = start; row < end; ++row) {
    const T* xr = x + row * N;
    const T* dyr = dy + row * N;
    const float mean = RMS ? 0.f : mean_in[row], rstd = rstd_in[row];
    float s1 = 0.f, s2 = 0.f;  // sum(g * xhat), sum(g) with g = dy * w
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const float g = to_float(dyr[j]) * to_float(w[j]);
      s1 += g * (to_float(xr[j]) - mean) * rstd;
      s2 += g;
    }
    const float c1 = block_sum(s1, buf) / N;
    const float c2 = RMS ? 0.f : block_sum(s2, buf) / N;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const float d = to_float(dyr[j]);
      const float xhat = (to_float(xr[j]) - mean) * rstd;
      dx[row * N + j] = from_float<T>((d * to_float(w[j]) - c1 * xhat - c2) * rstd);
      dwr[j] += d * (RMS ? round_to<T>(xhat) : xhat);
      if (dbr) dbr[j] += d;
    }
  }
}

template <typename T>
void forward(bool rms, const void* x, const void* w, const void* bias, void* y, float* mean,
             float* rstd, int64_t M, int64_t N, float eps, cudaStream_t stream) {
  auto kernel = rms ? norm_fwd_kernel<T, true> : norm_fwd_kernel<T, false>;
  kernel<<<M, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(w),
                                     static_cast<const T*>(bias), static_cast<T*>(y), mean, rstd,
                                     N, eps);
}

template <typename T>
void backward(bool rms, const void* dy, const void* x, const void* w, const float* mean,
              const float* rstd, void* dx, float* dw_part, float* db_part, int64_t M, int64_t N,
              int64_t blocks, int64_t per, cudaStream_t stream) {
  auto kernel = rms ? norm_bwd_kernel<T, true> : norm_bwd_kernel<T, false>;
  kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(dy), static_cast<const T*>(x),
                                          static_cast<const T*>(w), mean, rstd,
                                          static_cast<T*>(dx), dw_part, db_part, M, N, per);
}

}  // namespace

cudaError_t launch_norm_forward(DType dtype, bool rms, const void* x, const void* w,
                                const void* bias, void* y, float* mean, float* rstd, int64_t M,
                                int64_t N, float eps, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat:
      forward<float>(rms, x, w, bias, y, mean, rstd, M, N, eps, stream);
      break;
    case DType::kHalf:
      forward<__half>(rms, x, w, bias, y, mean, rstd, M, N, eps, stream);
      break;
    case DType::kBFloat16:
      forward<__nv_bfloat16>(rms, x, w, bias, y, mean, rstd, M, N, eps, stream);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_norm_backward(DType dtype, bool rms, const void* dy, const void* x,
                                 const void* w, const float* mean, const float* rstd, void* dx,
                                 float* dw_part, float* db_part, int64_t M, int64_t N,
                                 int64_t blocks, int64_t rows_per_block, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat:
      backward<float>(rms, dy, x, w, mean, rstd, dx, dw_part, db_part, M, N, blocks,
                      rows_per_block, stream);
      break;
    case DType::kHalf:
      backward<__half>(rms, dy, x, w, mean, rstd, dx, dw_part, db_part, M, N, blocks,
                       rows_per_block, stream);
      break;
    case DType::kBFloat16:
      backward<__nv_bfloat16>(rms, dy, x, w, mean, rstd, dx, dw_part, db_part, M, N, blocks,
                              rows_per_block, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace sepneox
