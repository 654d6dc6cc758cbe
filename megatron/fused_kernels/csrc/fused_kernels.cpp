// Python bindings (pybind11 through torch.utils.cpp_extension): checks, allocation and dtype
// dispatch with ATen, then the launchers of rope.cu / norms.cu. The autograd wrappers are
// Python (megatron/fused_kernels/functions.py), shared with the Triton kernels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "launch.h"

namespace {

using sepneox::DType;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat;
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fused kernels: fp32, fp16 or bf16 expected, got ", t.scalar_type());
  }
}

at::Tensor rope_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      bool backward) {
  TORCH_CHECK(x.is_cuda() && cos.is_cuda() && sin.is_cuda(), "rope: CUDA tensors expected");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 3 && sin.dim() == 3, "rope: x [B,S,H,D], cos [B,S,R]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rope: cos / sin must have x's dtype");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.strides() == sin.strides(),
              "rope: cos and sin must have one layout");
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3), R = cos.size(2);
  TORCH_CHECK(R % 2 == 0 && R <= D && cos.size(0) == B && cos.size(1) == S, "rope: bad shapes");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({B, S, H, D}, x.options());
  const int64_t sx[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t sc[3] = {cos.stride(0), cos.stride(1), cos.stride(2)};
  C10_CUDA_CHECK(sepneox::launch_rope(dtype_of(x), backward, x.data_ptr(), out.data_ptr(),
                                      cos.data_ptr(), sin.data_ptr(), B, S, H, D, R / 2, sx, sc,
                                      c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::vector<at::Tensor> norm_forward(const at::Tensor& x, const at::Tensor& w,
                                     const std::optional<at::Tensor>& bias, double eps, bool rms) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "norm: contiguous CUDA [M,N]");
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.numel() == x.size(1), "norm: bad weight");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->scalar_type() == x.scalar_type() && bias->numel() == x.size(1)),
              "norm: bad bias");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), N = x.size(1);
  // Named contiguous copies: a temporary's storage must outlive the launch that reads it.
  const at::Tensor wc = w.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(sepneox::launch_norm_forward(
      dtype_of(x), rms, x.data_ptr(), wc.data_ptr(), has_bias ? bc.data_ptr() : nullptr,
      y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), M, N,
      static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()));
  return {y, mean, rstd};
}

std::vector<at::Tensor> norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                      const at::Tensor& w, const at::Tensor& mean,
                                      const at::Tensor& rstd, bool rms, bool has_bias) {
  TORCH_CHECK(dy.is_contiguous() && x.is_contiguous() && dy.sizes() == x.sizes() && x.dim() == 2,
              "norm backward: contiguous dy and x [M,N] of one shape");
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && w.scalar_type() == x.scalar_type(),
              "norm backward: dy and weight must have x's dtype");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat,
              "norm backward: fp32 statistics expected");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), N = x.size(1);
  int sms = 0;  // from the runtime: ATen's device-properties header needs the cuBLAS headers
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(M, 4 * sms));
  const int64_t per = (M + blocks - 1) / blocks;
  const at::Tensor wc = w.contiguous();
  at::Tensor dx = at::empty({M, N}, x.options());
  at::Tensor dw = at::zeros({blocks, N}, x.options().dtype(at::kFloat));
  at::Tensor db = has_bias ? at::zeros({blocks, N}, dw.options()) : at::Tensor();
  C10_CUDA_CHECK(sepneox::launch_norm_backward(
      dtype_of(x), rms, dy.data_ptr(), x.data_ptr(), wc.data_ptr(), mean.data_ptr<float>(),
      rstd.data_ptr<float>(), dx.data_ptr(), dw.data_ptr<float>(),
      has_bias ? db.data_ptr<float>() : nullptr, M, N, blocks, per,
      c10::cuda::getCurrentCUDAStream()));
  // An undefined tensor reaches Python as None.
  return {dx, dw.sum(0), has_bias ? db.sum(0) : at::Tensor()};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SepNeoX fused rotary embedding and LayerNorm / RMSNorm (CUDA)";
  m.def("rope_apply", &rope_apply, "x [B,S,H,D], cos/sin [B,S,R] -> rotated copy", py::arg("x"),
        py::arg("cos"), py::arg("sin"), py::arg("backward"));
  m.def("norm_forward", &norm_forward, "x [M,N] -> (y, mean, rstd)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("rms"));
  m.def("norm_backward", &norm_backward, "-> (dx, dweight, dbias or None)", py::arg("dy"),
        py::arg("x"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("rms"),
        py::arg("has_bias"));
}
