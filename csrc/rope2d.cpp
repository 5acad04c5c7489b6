// 2-D rotary position embedding (DUSt3R's RoPE2D) for tokens (B, heads, N, D) and integer positions (B, N, 2).
// The head dimension is split in two halves rotated by the row and the column position; within a half of size d,
// channel c (< d/2) pairs with channel c + d/2 (rotate-half form). cos/sin tables (L, d/2) are precomputed by the
// caller so the CPU and CUDA kernels and the PyTorch path share exactly the same angles. sign = -1 applies the
// inverse rotation (the backward pass).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#ifdef WITH_CUDA
at::Tensor rope2d_cuda(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& cos, const at::Tensor& sin,
                       double sign);
#endif

template <typename scalar_t>
static void rope2d_cpu_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                              const int64_t* __restrict__ pos, const float* __restrict__ cos_t,
                              const float* __restrict__ sin_t, int64_t B, int64_t H, int64_t N, int64_t D,
                              float sign) {
  const int64_t d = D / 2, q = d / 2;
  at::parallel_for(0, B * H * N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row % N, b = row / (H * N);
      const int64_t* p = pos + (b * N + n) * 2;
      const scalar_t* xr = x + row * D;
      scalar_t* orow = out + row * D;
      for (int s = 0; s < 2; ++s) {
        const float* c = cos_t + p[s] * q;
        const float* sn = sin_t + p[s] * q;
        const scalar_t* x1 = xr + s * d;
        const scalar_t* x2 = x1 + q;
        scalar_t* o1 = orow + s * d;
        scalar_t* o2 = o1 + q;
        for (int64_t k = 0; k < q; ++k) {
          const float a = static_cast<float>(x1[k]), bb = static_cast<float>(x2[k]);
          const float cs = c[k], sv = sign * sn[k];
          o1[k] = static_cast<scalar_t>(a * cs - bb * sv);
          o2[k] = static_cast<scalar_t>(bb * cs + a * sv);
        }
      }
    }
  });
}

static void check_inputs(const torch::Tensor& x, const torch::Tensor& pos, const torch::Tensor& cos,
                         const torch::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4, "rope2d: tokens must be (B, heads, N, D)");
  TORCH_CHECK(x.size(3) % 4 == 0, "rope2d: head dimension must be divisible by 4");
  TORCH_CHECK(pos.dim() == 3 && pos.size(0) == x.size(0) && pos.size(1) == x.size(2) && pos.size(2) == 2,
              "rope2d: positions must be (B, N, 2)");
  TORCH_CHECK(pos.scalar_type() == torch::kLong, "rope2d: positions must be int64");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat,
              "rope2d: tables must be float32");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == x.size(3) / 4 && sin.sizes() == cos.sizes(),
              "rope2d: tables must be (L, D/4)");
}

torch::Tensor rope2d(torch::Tensor x, torch::Tensor pos, torch::Tensor cos, torch::Tensor sin, double sign) {
  check_inputs(x, pos, cos, sin);
  x = x.contiguous();
  pos = pos.contiguous();
  cos = cos.contiguous();
  sin = sin.contiguous();
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    return rope2d_cuda(x, pos, cos, sin, sign);
#else
    TORCH_CHECK(false, "rope2d: extension built without CUDA");
#endif
  }
  auto out = torch::empty_like(x);
  const auto B = x.size(0), H = x.size(1), N = x.size(2), D = x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "rope2d_cpu", [&] {
    rope2d_cpu_kernel<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(),
                                cos.data_ptr<float>(), sin.data_ptr<float>(), B, H, N, D, static_cast<float>(sign));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rope2d", &rope2d, "2-D RoPE (tokens, positions, cos, sin, sign)");
  m.attr("with_cuda") =
#ifdef WITH_CUDA
      true;
#else
      false;
#endif
}
