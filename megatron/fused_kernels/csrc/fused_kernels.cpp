// Python bindings (pybind11 through torch.utils.cpp_extension) of the fused kernels.
// The autograd wrappers are Python (megatron/fused_kernels/functions.py), shared with Triton.
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

at::Tensor rope_apply_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                           bool backward);
std::vector<at::Tensor> norm_forward_cuda(const at::Tensor& x, const at::Tensor& w,
                                          const c10::optional<at::Tensor>& bias, double eps,
                                          bool rms);
std::vector<at::Tensor> norm_backward_cuda(const at::Tensor& dy, const at::Tensor& x,
                                           const at::Tensor& w, const at::Tensor& mean,
                                           const at::Tensor& rstd, bool rms, bool has_bias);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SepNeoX fused rotary embedding and LayerNorm / RMSNorm (CUDA)";
  m.def("rope_apply", &rope_apply_cuda, "x [B,S,H,D], cos/sin [B,S,R] -> rotated copy",
        py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("backward"));
  m.def("norm_forward", &norm_forward_cuda, "x [M,N] -> (y, mean, rstd)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("rms"));
  m.def("norm_backward", &norm_backward_cuda, "-> (dx, dweight, dbias or None)", py::arg("dy"),
        py::arg("x"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("rms"),
        py::arg("has_bias"));
}
