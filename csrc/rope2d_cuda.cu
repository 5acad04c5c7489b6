// CUDA kernel of the 2-D RoPE (see rope2d.cpp for the layout): one thread per (token row, rotated channel pair).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

template <typename scalar_t>
__global__ void rope2d_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                              const int64_t* __restrict__ pos, const float* __restrict__ cos_t,
                              const float* __restrict__ sin_t, int64_t rows, int64_t H, int64_t N, int64_t D,
                              float sign) {
  const int64_t half_pairs = D / 2;  // pairs per row: D/4 for the row half + D/4 for the column half
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= rows * half_pairs) return;
  const int64_t row = idx / half_pairs, k = idx % half_pairs;
  const int64_t q = D / 4, s = k / q, c = k % q;
  const int64_t n = row % N, b = row / (H * N);
  const int64_t p = pos[(b * N + n) * 2 + s];
  const int64_t i1 = row * D + s * (D / 2) + c, i2 = i1 + q;
  const float a = static_cast<float>(x[i1]), bb = static_cast<float>(x[i2]);
  const float cs = cos_t[p * q + c], sv = sign * sin_t[p * q + c];
  out[i1] = static_cast<scalar_t>(a * cs - bb * sv);
  out[i2] = static_cast<scalar_t>(bb * cs + a * sv);
}

at::Tensor rope2d_cuda(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& cos,
                          const at::Tensor& sin, double sign) {
  const at::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  const auto B = x.size(0), H = x.size(1), N = x.size(2), D = x.size(3);
  const int64_t rows = B * H * N, total = rows * (D / 2);
  if (total == 0) return out;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "rope2d_cuda", [&] {
    rope2d_kernel<scalar_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(), cos.data_ptr<float>(),
        sin.data_ptr<float>(), rows, H, N, D, static_cast<float>(sign));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
