// Fused rotary embedding (NeoX rotate-half layout, partial rotary), forward and backward.
//
// x is [B, S, H, D] with any strides (the model hands a transposed view of its projections);
// cos / sin are [B, S, R] views (stride 0 over a broadcast batch). The first R dims of each
// head are rotated, the remaining D - R are copied. The output is a new contiguous tensor.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

namespace {

// One block per (batch, position); its threads stride over the H * D values of that row, so
// the cos / sin row stays in L1 for all heads.
template <typename scalar_t, bool BACKWARD>
__global__ void rope_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                            const scalar_t* __restrict__ cos, const scalar_t* __restrict__ sin,
                            int64_t S, int64_t H, int64_t D, int64_t half, int64_t sxb,
                            int64_t sxs, int64_t sxh, int64_t sxd, int64_t scb, int64_t scs,
                            int64_t scr) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / S, s = row % S;
  const scalar_t* xr = x + b * sxb + s * sxs;
  const scalar_t* cr = cos + b * scb + s * scs;
  const scalar_t* sr = sin + b * scb + s * scs;
  scalar_t* orow = out + row * H * D;
  for (int64_t idx = threadIdx.x; idx < H * D; idx += blockDim.x) {
    const int64_t h = idx / D, d = idx % D;
    const scalar_t* xh = xr + h * sxh;
    float v;
    if (d < 2 * half) {
      const bool first = d < half;
      const int64_t i = first ? d : d - half;
      const float x1 = static_cast<float>(xh[i * sxd]);
      const float x2 = static_cast<float>(xh[(i + half) * sxd]);
      const float c = static_cast<float>(cr[d * scr]);
      if (!BACKWARD) {  // x * cos + rotate_half(x) * sin
        const float sn = static_cast<float>(sr[d * scr]);
        v = first ? x1 * c - x2 * sn : x2 * c + x1 * sn;
      } else {  // the transposed rotation: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
        v = first ? x1 * c + x2 * static_cast<float>(sr[(i + half) * scr])
                  : x2 * c - x1 * static_cast<float>(sr[i * scr]);
      }
    } else {
      v = static_cast<float>(xh[d * sxd]);  // exact for fp16 / bf16 / fp32
    }
    orow[idx] = static_cast<scalar_t>(v);
  }
}

}  // namespace

at::Tensor rope_apply_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                           bool backward) {
  TORCH_CHECK(x.is_cuda() && cos.is_cuda() && sin.is_cuda(), "rope: CUDA tensors expected");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 3 && sin.dim() == 3, "rope: x [B,S,H,D], cos [B,S,R]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rope: cos / sin must have x's dtype");
  TORCH_CHECK(cos.strides() == sin.strides() && cos.sizes() == sin.sizes(),
              "rope: cos and sin must have one layout");
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3), R = cos.size(2);
  TORCH_CHECK(R % 2 == 0 && R <= D && cos.size(0) == B && cos.size(1) == S, "rope: bad shapes");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({B, S, H, D}, x.options());
  if (out.numel() == 0) return out;
  const int threads = static_cast<int>(std::min<int64_t>(256, ((H * D + 31) / 32) * 32));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rope", [&] {
    auto launch = backward ? rope_kernel<scalar_t, true> : rope_kernel<scalar_t, false>;
    launch<<<B * S, threads, 0, stream>>>(
        x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(),
        sin.data_ptr<scalar_t>(), S, H, D, R / 2, x.stride(0), x.stride(1), x.stride(2),
        x.stride(3), cos.stride(0), cos.stride(1), cos.stride(2));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
