// Fused CUDA bottleneck forward (1x1 A -> series core -> 1x1 C + bias in one launch) and its fit rule op.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/cuda/series_bottleneck.h"
#include "ops/cuda/series_host.h"

namespace gross {
namespace {

constexpr int kThreads = 256;

// One block per (output tile, image); shared memory holds u (S x halo) then z (T x tile).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) bottleneck_kernel(bneck::Args<scalar_t> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* u = reinterpret_cast<float*>(smem_raw);
  float* z = u + a.s.S * a.ts.hh * a.ts.hw;
  const int tile = blockIdx.x, n = blockIdx.y;
  bneck::stage_u<scalar_t, float>(a, u, n, tile, threadIdx.x, blockDim.x);
  __syncthreads();
  bneck::stage_z<scalar_t, float>(a, u, z, tile, threadIdx.x, blockDim.x);
  __syncthreads();
  bneck::stage_y<scalar_t, float>(a, z, n, tile, threadIdx.x, blockDim.x);
}

// A 1x1 weight (O, I, 1, 1) as a contiguous (O, I) matrix.
at::Tensor pointwise(const at::Tensor& w, const char* name, const at::Tensor& like) {
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1, name, " must be (out, in, 1, 1), got ", w.sizes());
  TORCH_CHECK(w.device() == like.device() && w.scalar_type() == like.scalar_type(), name,
              " must match x's device and dtype");
  return w.contiguous();
}

at::Tensor bottleneck_forward_cuda(const at::Tensor& x_in, const at::Tensor& A_in, at::TensorList cores,
                                   const at::Tensor& C_in, const std::optional<at::Tensor>& bias_in,
                                   at::IntArrayRef group_sizes, int64_t group_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() == 4, "x must be a 4-D CUDA tensor");
  TORCH_CHECK(x_in.scalar_type() != at::kDouble,
              "series_bottleneck_forward (CUDA): float64 is not fused; use the unfused path");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor A = pointwise(A_in, "A", x), C = pointwise(C_in, "C", x);
  TORCH_CHECK(A.size(1) == x.size(1), "A must take x's ", x.size(1), " channels, got ", A.size(1));
  const int64_t S = A.size(0);
  const auto act = host::active_cores(x, cores, group_sizes, group_size, S);
  const idx::ConvGeom s =
      host::make_geom({x.size(0), S, x.size(2), x.size(3)}, act[0], group_size, stride, padding, dilation);
  TORCH_CHECK(C.size(1) == s.T, "C must take the cores' ", s.T, " channels, got ", C.size(1));
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C.size(0), "bias must be (", C.size(0), ",), got ", bias.sizes());
    TORCH_CHECK(bias.device() == x.device() && bias.scalar_type() == x.scalar_type(),
                "bias must match x's device and dtype");
  }
  const bneck::TileShape ts = bneck::choose_tile(s.S, s.T, s.kh, s.kw, s.sh, s.sw, s.dh, s.dw, s.Ho, s.Wo);
  TORCH_CHECK(ts.th > 0,
              "series_bottleneck_forward (CUDA): S and T do not fit in shared memory for this kernel "
              "(gross::series_bottleneck_fits is false); use the unfused path");
  at::Tensor y = at::empty({s.N, C.size(0), s.Ho, s.Wo}, x.options());
  if (y.numel() == 0) return y;
  const int tiles_w = static_cast<int>(idx::ceil_div(s.Wo, ts.tw));
  const int64_t tiles = idx::ceil_div(s.Ho, ts.th) * tiles_w;
  TORCH_CHECK(s.N <= 65535, "series_bottleneck_forward (CUDA): at most 65535 images");
  const size_t smem = static_cast<size_t>(bneck::smem_bytes(s.S, s.T, ts));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "series_bottleneck_forward_cuda", [&] {
    bneck::Args<scalar_t> a{};
    a.x = x.data_ptr<scalar_t>();
    a.A = A.data_ptr<scalar_t>();
    a.terms = host::make_terms<scalar_t>(act, s);
    a.C = C.data_ptr<scalar_t>();
    a.bias = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    a.y = y.data_ptr<scalar_t>();
    a.s = s;
    a.Cin = static_cast<int>(x.size(1));
    a.Cout = static_cast<int>(C.size(0));
    a.ts = ts;
    a.tiles_w = tiles_w;
    bottleneck_kernel<scalar_t><<<dim3(static_cast<unsigned>(tiles), s.N), kThreads, smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// Host rule for the dispatcher: whether the fused kernel accepts these widths and core geometry.
bool bottleneck_fits(int64_t S, int64_t T, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                     at::IntArrayRef dilation) {
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && dilation.size() == 2,
              "kernel_size, stride and dilation must have 2 entries each");
  return bneck::fits(static_cast<int>(S), static_cast<int>(T), static_cast<int>(kernel_size[0]),
                     static_cast<int>(kernel_size[1]), static_cast<int>(stride[0]), static_cast<int>(stride[1]),
                     static_cast<int>(dilation[0]), static_cast<int>(dilation[1]));
}

}  // namespace
}  // namespace gross

TORCH_LIBRARY_FRAGMENT(gross, m) {
  // True when series_bottleneck_forward's CUDA kernel takes this shape (float32 accumulators of
  // S x halo + T values within 48 KiB of shared memory for a 1x1 output tile; float64 is never fused).
  m.def("series_bottleneck_fits(int S, int T, int[] kernel_size, int[] stride, int[] dilation) -> bool",
        &gross::bottleneck_fits);
}

TORCH_LIBRARY_IMPL(gross, CUDA, m) { m.impl("series_bottleneck_forward", &gross::bottleneck_forward_cuda); }
