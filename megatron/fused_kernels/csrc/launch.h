// Kernel launchers shared by the .cu files and the bindings. Plain pointers and CUDA runtime
// types only: nvcc never parses torch's headers (most of the build time), and the bindings
// (fused_kernels.cpp) do every check, allocation and dtype dispatch with ATen.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sepneox {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// x [B, S, H, D] with strides sx*; cos / sin [B, S, R] with strides sc* (sc_b may be 0);
// out contiguous [B, S, H, D]. Rotates the first 2 * half dims, copies the rest.
cudaError_t launch_rope(DType dtype, bool backward, const void* x, void* out, const void* cos,
                        const void* sin, int64_t B, int64_t S, int64_t H, int64_t D,
                        int64_t half, const int64_t* sx, const int64_t* sc, cudaStream_t stream);

// Rows of x [M, N] (contiguous): y, and fp32 mean / rstd per row (mean 0 for RMSNorm).
cudaError_t launch_norm_forward(DType dtype, bool rms, const void* x, const void* w,
                                const void* bias, void* y, float* mean, float* rstd, int64_t M,
                                int64_t N, float eps, cudaStream_t stream);

// dx [M, N], and per-block fp32 partial sums dw_part / db_part [blocks, N] (db_part may be
// null), each block walking rows_per_block rows.
cudaError_t launch_norm_backward(DType dtype, bool rms, const void* dy, const void* x,
                                 const void* w, const float* mean, const float* rstd, void* dx,
                                 float* dw_part, float* db_part, int64_t M, int64_t N,
                                 int64_t blocks, int64_t rows_per_block, cudaStream_t stream);

}  // namespace sepneox
