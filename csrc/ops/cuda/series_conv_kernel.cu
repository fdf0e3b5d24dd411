// CUDA kernels of the series grouped convolution (forward, input and weight gradients) and their registration.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <type_traits>
#include <torch/library.h>

#include "ops/cuda/series_gemm.h"
#include "ops/cuda/series_host.h"

namespace gross {
namespace gemm {
template <>
struct SmemCast<__half> {
  static __host__ __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <>
struct SmemCast<__nv_bfloat16> {
  static __host__ __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
}  // namespace gemm

namespace {

using idx::ConvGeom;
using idx::SeriesTerms;

constexpr int kDirectThreads = 256;
constexpr int kFinishThreads = 256;
// grid.y and grid.z are limited to 65535 blocks.
constexpr int64_t kMaxGridYZ = 65535;

// One GEMM block: grid (M tiles, N tiles, groups * splits); see series_gemm.h for the phases.
template <class Cfg, class P, typename acc_t>
__global__ void __launch_bounds__(Cfg::THREADS) gemm_kernel(P p, int groups, int splits) {
  __shared__ acc_t sA[Cfg::SMEM_A];
  __shared__ acc_t sB[Cfg::SMEM_B];
  const int tid = threadIdx.x;
  const int g = blockIdx.z % groups, split = blockIdx.z / groups;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * Cfg::BM;
  const int n0 = blockIdx.y * Cfg::BN;
  const idx::KRange kr = idx::split_range(p.K(), splits, split, Cfg::BK);
  acc_t acc[Cfg::TM][Cfg::TN];
#pragma unroll
  for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::TN; ++j) acc[i][j] = acc_t(0);
  for (int64_t k0 = kr.begin; k0 < kr.end; k0 += Cfg::BK) {
    gemm::load_tiles<Cfg>(p, sA, sB, tid, g, m0, n0, k0, kr.end);
    __syncthreads();
    gemm::mma_tile<Cfg>(sA, sB, acc, tid);
    __syncthreads();
  }
  gemm::store_tile<Cfg>(p, acc, tid, g, split, m0, n0);
}

// Tensor-core GEMM block (sm_80+; the launcher only picks it there): same grid and phases as
// gemm_kernel, with WMMA products on tc_t (__half or __nv_bfloat16) tiles and float accumulators.
template <class Cfg, class P, typename tc_t>
__global__ void __launch_bounds__(Cfg::THREADS) gemm_tc_kernel(P p, int groups, int splits) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using L = gemm::TcLayout<Cfg>;
  __shared__ __align__(32) tc_t sA[Cfg::SMEM_A];
  __shared__ __align__(32) tc_t sB[Cfg::SMEM_B];
  __shared__ __align__(32) float sC[Cfg::BM * L::LDC];
  const int tid = threadIdx.x, warp = tid / 32;
  const int g = blockIdx.z % groups, split = blockIdx.z / groups;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * Cfg::BM;
  const int n0 = blockIdx.y * Cfg::BN;
  const idx::KRange kr = idx::split_range(p.K(), splits, split, Cfg::BK);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[L::PER_WARP];
#pragma unroll
  for (int w = 0; w < L::PER_WARP; ++w) wmma::fill_fragment(c[w], 0.0f);
  for (int64_t k0 = kr.begin; k0 < kr.end; k0 += Cfg::BK) {
    gemm::load_tiles<Cfg>(p, sA, sB, tid, g, m0, n0, k0, kr.end);
    __syncthreads();
#pragma unroll
    for (int w = 0; w < L::PER_WARP; ++w) {
      int r0, c0;
      gemm::tc_subtile<Cfg>(warp, w, r0, c0);
      wmma::fragment<wmma::matrix_a, 16, 16, 16, tc_t, wmma::col_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, tc_t, wmma::row_major> b;
      wmma::load_matrix_sync(a, sA + r0, Cfg::LDA);
      wmma::load_matrix_sync(b, sB + c0, Cfg::LDB);
      wmma::mma_sync(c[w], a, b, c[w]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int w = 0; w < L::PER_WARP; ++w) {
    int r0, c0;
    gemm::tc_subtile<Cfg>(warp, w, r0, c0);
    wmma::store_matrix_sync(sC + r0 * L::LDC + c0, c[w], L::LDC, wmma::mem_row_major);
  }
  __syncthreads();
  float acc[Cfg::TM][Cfg::TN];
  gemm::gather_acc<Cfg>(sC, acc, tid);
  gemm::store_tile<Cfg>(p, acc, tid, g, split, m0, n0);
#elif defined(__CUDA_ARCH__)
  __trap();  // never launched below sm_80
#endif
}

// The tensor-core element type of a torch dtype (void: no tensor-core path).
template <typename scalar_t>
struct TcType {
  using type = void;
};
template <>
struct TcType<at::Half> {
  using type = __half;
};
template <>
struct TcType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Whether the current device has sm_80+ tensor cores for float16 / bfloat16 WMMA.
bool device_has_tc() {
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

// Launches the SIMT block Cfg, or its tensor-core twin TcCfg on tc_t tiles when `tc` is set.
template <class Cfg, class TcCfg, class P, typename acc_t, typename tc_t>
void launch_gemm_cfg(const P& p, int groups, int splits, bool tc, cudaStream_t stream) {
  static_assert(Cfg::BM == TcCfg::BM && Cfg::BN == TcCfg::BN && Cfg::BK == TcCfg::BK, "twins share the grid");
  const dim3 grid(static_cast<unsigned>(idx::ceil_div(p.M(), Cfg::BM)),
                  static_cast<unsigned>(idx::ceil_div(p.Ncol(), Cfg::BN)), static_cast<unsigned>(groups * splits));
  TORCH_CHECK(grid.y <= kMaxGridYZ && grid.z <= kMaxGridYZ, "series conv: grid too large (", grid.y, ", ", grid.z,
              ")");
  if constexpr (!std::is_void<tc_t>::value) {
    if (tc) {
      gemm_tc_kernel<TcCfg, P, tc_t><<<grid, TcCfg::THREADS, 0, stream>>>(p, groups, splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  gemm_kernel<Cfg, P, acc_t><<<grid, Cfg::THREADS, 0, stream>>>(p, groups, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Forward / input-gradient GEMM: the N tile is the narrowest of 16, 32, 64 covering the columns.
template <class P, typename acc_t, typename tc_t>
void launch_gemm(const P& p, int groups, bool tc, cudaStream_t stream) {
  const int ncol = p.Ncol();
  if (ncol <= 16)
    launch_gemm_cfg<gemm::TileN16, gemm::TcN16, P, acc_t, tc_t>(p, groups, 1, tc, stream);
  else if (ncol <= 32)
    launch_gemm_cfg<gemm::TileN32, gemm::TcN32, P, acc_t, tc_t>(p, groups, 1, tc, stream);
  else
    launch_gemm_cfg<gemm::TileN64, gemm::TcN64, P, acc_t, tc_t>(p, groups, 1, tc, stream);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kDirectThreads)
    direct_forward_kernel(const scalar_t* x, scalar_t* out, SeriesTerms<scalar_t> terms, ConvGeom s) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sW = reinterpret_cast<acc_t*>(smem_raw);
  const int n = blockIdx.z, t = blockIdx.y, p = blockIdx.x * blockDim.x + threadIdx.x;
  gemm::direct_forward_load_w(terms, s, t, sW, threadIdx.x, blockDim.x);
  __syncthreads();
  if (p < s.Ho * s.Wo)
    out[(static_cast<int64_t>(n) * s.T + t) * s.Ho * s.Wo + p] =
        static_cast<scalar_t>(gemm::direct_forward_pixel(x, s, sW, n, t, p));
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kDirectThreads)
    direct_backward_input_kernel(const scalar_t* gz, scalar_t* gx, SeriesTerms<scalar_t> terms, ConvGeom s) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sW = reinterpret_cast<acc_t*>(smem_raw);
  const int n = blockIdx.z, cin = blockIdx.y, p = blockIdx.x * blockDim.x + threadIdx.x;
  gemm::direct_backward_input_load_w(terms, s, cin, sW, threadIdx.x, blockDim.x);
  __syncthreads();
  if (p < s.H * s.W)
    gx[(static_cast<int64_t>(n) * s.S + cin) * s.H * s.W + p] =
        static_cast<scalar_t>(gemm::direct_backward_input_pixel(gz, s, sW, n, cin, p));
}

// Sums the split-K partials in a fixed order and writes one term's gradient (deterministic).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kFinishThreads)
    finish_weight_kernel(const acc_t* ws, int splits, ConvGeom s, int g, int to, scalar_t* out, int64_t numel) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[e] = static_cast<scalar_t>(gemm::term_weight_grad(ws, splits, s, g, to, e));
}

dim3 direct_grid(int pixels, int channels, int images) {
  TORCH_CHECK(channels <= kMaxGridYZ && images <= kMaxGridYZ, "series conv: too many channels or images for the grid");
  return dim3(static_cast<unsigned>(idx::ceil_div(pixels, kDirectThreads)), channels, images);
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D, got shape ", t.sizes());
}

at::Tensor forward_cuda(const at::Tensor& x_in, at::TensorList cores, at::IntArrayRef group_sizes, int64_t group_size,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_input(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const auto act = host::active_cores(x, cores, group_sizes, group_size, x.size(1));
  const ConvGeom s = host::make_geom(x.sizes(), act[0], group_size, stride, padding, dilation);
  at::Tensor out = at::empty({s.N, s.T, s.Ho, s.Wo}, x.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "series_conv_forward_cuda", [&] {
    using acc_t = typename host::Acc<scalar_t>::type;
    using tc_t = typename TcType<scalar_t>::type;
    const bool use_tc = !std::is_void<tc_t>::value && device_has_tc();
    const auto terms = host::make_terms<scalar_t>(act, s);
    if (gemm::use_direct_forward(s)) {
      const size_t smem = sizeof(acc_t) * s.G * s.kh * s.kw;
      direct_forward_kernel<scalar_t, acc_t><<<direct_grid(s.Ho * s.Wo, s.T, s.N), kDirectThreads, smem, stream>>>(
          x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), terms, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const gemm::ForwardProblem<scalar_t, acc_t> p{x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), terms, s};
      launch_gemm<decltype(p), acc_t, tc_t>(p, s.groups, use_tc, stream);
    }
  });
  return out;
}

at::Tensor backward_input_cuda(const at::Tensor& gz_in, at::TensorList cores, at::IntArrayRef group_sizes,
                               int64_t group_size, at::IntArrayRef input_shape, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_input(gz_in, "grad_out");
  const c10::cuda::CUDAGuard guard(gz_in.device());
  const at::Tensor gz = gz_in.contiguous();
  TORCH_CHECK(input_shape.size() == 4, "input_shape must have 4 entries, got ", input_shape);
  const auto act = host::active_cores(gz, cores, group_sizes, group_size, input_shape[1]);
  const ConvGeom s = host::make_geom(input_shape, act[0], group_size, stride, padding, dilation);
  TORCH_CHECK(gz.size(0) == s.N && gz.size(1) == s.T && gz.size(2) == s.Ho && gz.size(3) == s.Wo,
              "grad_out must be (", s.N, ", ", s.T, ", ", s.Ho, ", ", s.Wo, "), got ", gz.sizes());
  at::Tensor gx = at::empty(input_shape, gz.options());
  if (gx.numel() == 0) return gx;
  if (gz.numel() == 0) return gx.zero_();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gz.scalar_type(), "series_conv_backward_input_cuda", [&] {
    using acc_t = typename host::Acc<scalar_t>::type;
    using tc_t = typename TcType<scalar_t>::type;
    const bool use_tc = !std::is_void<tc_t>::value && device_has_tc();
    const auto terms = host::make_terms<scalar_t>(act, s);
    if (gemm::use_direct_backward_input(s)) {
      const size_t smem = sizeof(acc_t) * s.toG * s.kh * s.kw;
      direct_backward_input_kernel<scalar_t, acc_t>
          <<<direct_grid(s.H * s.W, s.S, s.N), kDirectThreads, smem, stream>>>(gz.data_ptr<scalar_t>(),
                                                                               gx.data_ptr<scalar_t>(), terms, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const gemm::BackwardInputProblem<scalar_t, acc_t> p{gz.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), terms,
                                                          s};
      launch_gemm<decltype(p), acc_t, tc_t>(p, s.groups, use_tc, stream);
    }
  });
  return gx;
}

// Weight-gradient GEMM with split-K into `ws`; the M tile (output channels per group) is 16 or 64.
template <class Cfg, class TcCfg, typename tc_t, typename scalar_t, typename acc_t>
at::Tensor weight_partials(const gemm::BackwardWeightProblem<scalar_t, acc_t>& proto, const at::Tensor& like,
                           int& splits, bool tc, cudaStream_t stream) {
  const ConvGeom& s = proto.s;
  splits = gemm::weight_splits<Cfg>(proto);
  const auto acc_type = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
  at::Tensor ws = at::empty({splits, s.T, s.G * s.kh * s.kw}, like.options().dtype(acc_type));
  auto p = proto;
  p.ws = ws.data_ptr<acc_t>();
  launch_gemm_cfg<Cfg, TcCfg, decltype(p), acc_t, tc_t>(p, s.groups, splits, tc, stream);
  return ws;
}

std::vector<at::Tensor> backward_weight_cuda(const at::Tensor& gz_in, const at::Tensor& x_in, at::TensorList cores,
                                             at::IntArrayRef group_sizes, int64_t group_size, at::IntArrayRef stride,
                                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_input(gz_in, "grad_out");
  check_input(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor gz = gz_in.contiguous(), x = x_in.contiguous();
  TORCH_CHECK(gz.scalar_type() == x.scalar_type(), "grad_out and x must have the same dtype");
  const auto act = host::active_cores(x, cores, group_sizes, group_size, x.size(1));
  const ConvGeom s = host::make_geom(x.sizes(), act[0], group_size, stride, padding, dilation);
  TORCH_CHECK(gz.size(0) == s.N && gz.size(1) == s.T && gz.size(2) == s.Ho && gz.size(3) == s.Wo,
              "grad_out must be (", s.N, ", ", s.T, ", ", s.Ho, ", ", s.Wo, "), got ", gz.sizes());
  std::vector<at::Tensor> grads;
  for (const auto& c : act) grads.push_back(at::empty_like(c));
  if (gz.numel() == 0) {
    for (auto& g : grads) g.zero_();
    return grads;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "series_conv_backward_weight_cuda", [&] {
    using acc_t = typename host::Acc<scalar_t>::type;
    using tc_t = typename TcType<scalar_t>::type;
    const bool use_tc = !std::is_void<tc_t>::value && device_has_tc();
    const gemm::BackwardWeightProblem<scalar_t, acc_t> proto{gz.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), nullptr,
                                                             s};
    int splits = 1;
    const at::Tensor ws = s.toG <= 16
                              ? weight_partials<gemm::TileW16, gemm::TcW16, tc_t>(proto, x, splits, use_tc, stream)
                              : weight_partials<gemm::TileW64, gemm::TcW64, tc_t>(proto, x, splits, use_tc, stream);
    for (size_t i = 0; i < act.size(); ++i) {
      const int g = static_cast<int>(act[i].size(1));
      const int64_t numel = grads[i].numel();
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(idx::ceil_div(numel, kFinishThreads), 4096));
      finish_weight_kernel<scalar_t, acc_t><<<blocks, kFinishThreads, 0, stream>>>(
          ws.data_ptr<acc_t>(), splits, s, g, idx::outs_per_group(s.S, s.T, g), grads[i].data_ptr<scalar_t>(), numel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grads;
}

}  // namespace
}  // namespace gross

TORCH_LIBRARY_IMPL(gross, CUDA, m) {
  m.impl("series_conv_forward", &gross::forward_cuda);
  m.impl("series_conv_backward_input", &gross::backward_input_cuda);
  m.impl("series_conv_backward_weight", &gross::backward_weight_cuda);
}
