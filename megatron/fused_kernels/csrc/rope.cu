// Fused rotary embedding (NeoX rotate-half layout, partial rotary), forward and backward.
//
// x is [B, S, H, D] with any strides (the model hands a transposed view of its projections);
// cos / sin are [B, S, R] views (stride 0 over a broadcast batch). The first R dims of each
// head are rotated, the remaining D - R are copied. The output is a new contiguous tensor.
#include "convert.h"
#include "launch.h"

namespace sepneox {
namespace {

// One block per (batch, position); its threads stride over the H * D values of that row, so
// the cos / sin row stays in L1 for all heads.
template <typename T, bool BACKWARD>
__global__ void rope_kernel(const T* __restrict__ x, T* __restrict__ out,
                            const T* __restrict__ cos, const T* __restrict__ sin, int64_t S,
                            int64_t H, int64_t D, int64_t half, int64_t sxb, int64_t sxs,
                            int64_t sxh, int64_t sxd, int64_t scb, int64_t scs, int64_t scr) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / S, s = row % S;
  const T* xr = x + b * sxb + s * sxs;
  const T* cr = cos + b * scb + s * scs;
  const T* sr = sin + b * scb + s * scs;
  T* orow = out + row * H * D;
  for (int64_t idx = threadIdx.x; idx < H * D; idx += blockDim.x) {
    const int64_t h = idx / D, d = idx % D;
    const T* xh = xr + h * sxh;
    if (d >= 2 * half) {
      orow[idx] = xh[d * sxd];  // partial rotary: copied unchanged
      continue;
    }
    const bool first = d < half;
    const int64_t i = first ? d : d - half;
    const float x1 = to_float(xh[i * sxd]), x2 = to_float(xh[(i + half) * sxd]);
    const float c = to_float(cr[d * scr]);
    float v;
    if (!BACKWARD) {  // x * cos + rotate_half(x) * sin
      const float sn = to_float(sr[d * scr]);
      v = first ? x1 * c - x2 * sn : x2 * c + x1 * sn;
    } else {  // the transposed rotation: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
      v = first ? x1 * c + x2 * to_float(sr[(i + half) * scr])
                : x2 * c - x1 * to_float(sr[i * scr]);
    }
    orow[idx] = from_float<T>(v);
  }
}

template <typename T>
void launch(bool backward, const void* x, void* out, const void* cos, const void* sin,
            int64_t B, int64_t S, int64_t H, int64_t D, int64_t half, const int64_t* sx,
            const int64_t* sc, cudaStream_t stream) {
  const int64_t width = ((H * D + 31) / 32) * 32;
  const int threads = static_cast<int>(width < 256 ? width : 256);
  auto kernel = backward ? rope_kernel<T, true> : rope_kernel<T, false>;
  kernel<<<B * S, threads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(out),
                                        static_cast<const T*>(cos), static_cast<const T*>(sin),
                                        S, H, D, half, sx[0], sx[1], sx[2], sx[3], sc[0], sc[1],
                                        sc[2]);
}

}  // namespace

cudaError_t launch_rope(DType dtype, bool backward, const void* x, void* out, const void* cos,
                        const void* sin, int64_t B, int64_t S, int64_t H, int64_t D,
                        int64_t half, const int64_t* sx, const int64_t* sc, cudaStream_t stream) {
  if (B * S == 0 || H * D == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat:
      launch<float>(backward, x, out, cos, sin, B, S, H, D, half, sx, sc, stream);
      break;
    case DType::kHalf:
      launch<__half>(backward, x, out, cos, sin, B, S, H, D, half, sx, sc, stream);
      break;
    case DType::kBFloat16:
      launch<__nv_bfloat16>(backward, x, out, cos, sin, B, S, H, D, half, sx, sc, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace sepneox
