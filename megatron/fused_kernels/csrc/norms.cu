// Fused LayerNorm / RMSNorm over the last dim of a [M, N] tensor, forward and backward.
//
// One block per row in the forward; the backward walks a block of rows per thread block and
// adds its weight / bias gradients into its own row of a [blocks, N] fp32 buffer (no atomics,
// deterministic), which the host sums. Statistics and math are fp32. The weight has x's dtype.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <c10/cuda/CUDAGuard.h>

#include <tuple>

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

template <typename scalar_t, bool RMS>
__global__ void norm_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
                                float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                int64_t N, float eps) {
  __shared__ float buf[32];
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * N;
  scalar_t* yr = y + row * N;
  float mean = 0.f;
  if (!RMS) {
    float s = 0.f;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) s += static_cast<float>(xr[j]);
    mean = block_sum(s, buf) / N;
  }
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const float c = static_cast<float>(xr[j]) - mean;
    ss += c * c;
  }
  const float rstd = rsqrtf(block_sum(ss, buf) / N + eps);
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const float xhat = (static_cast<float>(xr[j]) - mean) * rstd;
    float v;
    if (RMS) {  // round the normalised value to x's dtype first, as the reference does
      v = static_cast<float>(w[j]) * static_cast<float>(static_cast<scalar_t>(xhat));
    } else {
      v = xhat * static_cast<float>(w[j]) + (bias ? static_cast<float>(bias[j]) : 0.f);
    }
    yr[j] = static_cast<scalar_t>(v);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename scalar_t, bool RMS>
__global__ void norm_bwd_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                const scalar_t* __restrict__ w, const float* __restrict__ mean_in,
                                const float* __restrict__ rstd_in, scalar_t* __restrict__ dx,
                                float* __restrict__ dw_part, float* __restrict__ db_part,
                                int64_t M, int64_t N, int64_t rows_per_block) {
  __shared__ float buf[32];
  float* dwr = dw_part + blockIdx.x * N;
  float* dbr = db_part ? db_part + blockIdx.x * N : nullptr;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    dwr[j] = 0.f;
    if (dbr) dbr[j] = 0.f;
  }
  const int64_t start = blockIdx.x * rows_per_block;
  const int64_t end = start + rows_per_block < M ? start + rows_per_block : M;
  for (int64_t row = start; row < end; ++row) {
    const scalar_t* xr = x + row * N;
    const scalar_t* dyr = dy + row * N;
    const float mean = RMS ? 0.f : mean_in[row], rstd = rstd_in[row];
    float s1 = 0.f, s2 = 0.f;  // sum(g * xhat), sum(g) with g = dy * w
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const float g = static_cast<float>(dyr[j]) * static_cast<float>(w[j]);
      s1 += g * (static_cast<float>(xr[j]) - mean) * rstd;
      s2 += g;
    }
    const float c1 = block_sum(s1, buf) / N;
    const float c2 = RMS ? 0.f : block_sum(s2, buf) / N;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const float d = static_cast<float>(dyr[j]);
      const float xhat = (static_cast<float>(xr[j]) - mean) * rstd;
      const float g = d * static_cast<float>(w[j]);
      dx[row * N + j] = static_cast<scalar_t>((g - c1 * xhat - c2) * rstd);
      // Each thread owns its columns of this block's partial row: plain adds, no races.
      dwr[j] += d * (RMS ? static_cast<float>(static_cast<scalar_t>(xhat)) : xhat);
      if (dbr) dbr[j] += d;
    }
  }
}

}  // namespace

std::vector<at::Tensor> norm_forward_cuda(const at::Tensor& x, const at::Tensor& w,
                                          const c10::optional<at::Tensor>& bias, double eps,
                                          bool rms) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "norm: contiguous CUDA [M,N]");
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.numel() == x.size(1), "norm: bad weight");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || bias->scalar_type() == x.scalar_type(), "norm: bad bias");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), N = x.size(1);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, mean, rstd};
  // Named contiguous copies: a temporary's storage must outlive the launch that reads it.
  const at::Tensor wc = w.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_fwd", [&] {
    auto kernel = rms ? norm_fwd_kernel<scalar_t, true> : norm_fwd_kernel<scalar_t, false>;
    const scalar_t* b = has_bias ? bc.data_ptr<scalar_t>() : nullptr;
    kernel<<<M, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), b,
                                       y.data_ptr<scalar_t>(), mean.data_ptr<float>(),
                                       rstd.data_ptr<float>(), N, static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, rstd};
}

std::vector<at::Tensor> norm_backward_cuda(const at::Tensor& dy, const at::Tensor& x,
                                           const at::Tensor& w, const at::Tensor& mean,
                                           const at::Tensor& rstd, bool rms, bool has_bias) {
  TORCH_CHECK(dy.is_contiguous() && x.is_contiguous() && dy.sizes() == x.sizes(),
              "norm backward: contiguous dy and x of one shape");
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "norm backward: dy must have x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), N = x.size(1);
  // The SM count from the runtime (ATen's device-properties header pulls in cuBLAS/cuSPARSE).
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(M, 4 * sms));
  const int64_t per = (M + blocks - 1) / blocks;
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::zeros({blocks, N}, x.options().dtype(at::kFloat));
  at::Tensor db = has_bias ? at::zeros({blocks, N}, dw.options()) : at::Tensor();
  const at::Tensor wc = w.contiguous();
  if (M > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_bwd", [&] {
      auto kernel = rms ? norm_bwd_kernel<scalar_t, true> : norm_bwd_kernel<scalar_t, false>;
      kernel<<<blocks, kThreads, 0, stream>>>(
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
          mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr<scalar_t>(),
          dw.data_ptr<float>(), has_bias ? db.data_ptr<float>() : nullptr, M, N, per);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {dx, dw.sum(0), has_bias ? db.sum(0) : at::Tensor()};
}
