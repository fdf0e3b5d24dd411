// CPU kernels of the summed series of grouped convolutions: forward, grad-input, grad-weight.
//
// Work is split by (image n, block j of the active group size G, tile of output pixels). Each
// item unfolds its G input channels once (im2col) and then, for every active term i, runs one
// small GEMM per g_i-group nested in block j, so the series sum happens on the fly and no
// expanded weight is ever built.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "series_geometry.h"
#include "tiles.h"

namespace gross {
namespace cpu {
namespace {

constexpr int64_t kTile = 256;  // output pixels per work item: keeps a G*kh*kw x kTile column in L2

struct Terms {
  std::vector<at::Tensor> w;  // contiguous active cores
};

Terms active_cores(at::TensorList cores, const SeriesGeometry& g) {
  Terms t;
  for (int64_t i = 0; i < g.active; ++i) t.w.push_back(cores[i].contiguous());
  return t;
}

int64_t tiles(const SeriesGeometry& g) { return (g.P() + kTile - 1) / kTile; }

at::Tensor forward(const at::Tensor& x, at::TensorList cores, at::IntArrayRef group_sizes, int64_t group_size,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_cpu_floating(x, cores, "series_conv_forward");
  const auto geo = make_geometry(x.sizes(), cores, group_sizes, group_size, stride, padding, dilation);
  const auto xc = x.contiguous();
  const auto terms = active_cores(cores, geo);
  auto z = at::zeros({geo.N, geo.T, geo.Ho, geo.Wo}, x.options());
  const int64_t nt = tiles(geo), nb = geo.blocks(), P = geo.P(), kk = geo.kk();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "series_conv_forward_cpu", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    at::parallel_for(0, geo.N * nb * nt, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> col(geo.G * kk * std::min(kTile, P));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / (nb * nt), j = item / nt % nb, p0 = item % nt * kTile;
        const int64_t L = std::min(kTile, P - p0);
        im2col_tile(xp + (n * geo.S + j * geo.G) * geo.H * geo.W, geo.G, geo, p0, L, col.data());
        for (int64_t i = 0; i < geo.active; ++i) {
          const int64_t gi = geo.g[i], ti = geo.out_per_group(i), K = gi * kk;
          const scalar_t* wp = terms.w[i].data_ptr<scalar_t>();
          for (int64_t q = 0; q < geo.G / gi; ++q) {
            const int64_t o0 = j * geo.out_per_block() + q * ti;
            gemm_acc<scalar_t>(ti, K, L, wp + o0 * K, K, 1, col.data() + q * K * L, L,
                               zp + (n * geo.T + o0) * P + p0, P);
          }
        }
      }
    });
  });
  return z;
}

at::Tensor backward_input(const at::Tensor& grad_out, at::TensorList cores, at::IntArrayRef group_sizes,
                          int64_t group_size, at::IntArrayRef input_shape, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_cpu_floating(grad_out, cores, "series_conv_backward_input");
  const auto geo = make_geometry(input_shape, cores, group_sizes, group_size, stride, padding, dilation);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({geo.N, geo.T, geo.Ho, geo.Wo}),
              "grad_out must have shape (", geo.N, ", ", geo.T, ", ", geo.Ho, ", ", geo.Wo, "), got ",
              grad_out.sizes());
  const auto gz = grad_out.contiguous();
  const auto terms = active_cores(cores, geo);
  auto gx = at::zeros(input_shape, grad_out.options());
  const int64_t nb = geo.blocks(), P = geo.P(), kk = geo.kk();

  AT_DISPATCH_FLOATING_TYPES(gz.scalar_type(), "series_conv_backward_input_cpu", [&] {
    const scalar_t* gzp = gz.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    // Pixel tiles of one (n, j) scatter into overlapping input pixels, so an item owns a whole
    // input block and walks its tiles in order: no two threads write the same element.
    at::parallel_for(0, geo.N * nb, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> col(geo.G * kk * std::min(kTile, P));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / nb, j = item % nb;
        for (int64_t p0 = 0; p0 < P; p0 += kTile) {
          const int64_t L = std::min(kTile, P - p0);
          std::fill(col.begin(), col.begin() + geo.G * kk * L, scalar_t(0));
          for (int64_t i = 0; i < geo.active; ++i) {
            const int64_t gi = geo.g[i], ti = geo.out_per_group(i), K = gi * kk;
            const scalar_t* wp = terms.w[i].data_ptr<scalar_t>();
            for (int64_t q = 0; q < geo.G / gi; ++q) {
              const int64_t o0 = j * geo.out_per_block() + q * ti;
              // col[K x L] += W^T (K x ti) * grad_out (ti x L)
              gemm_acc<scalar_t>(K, ti, L, wp + o0 * K, 1, K, gzp + (n * geo.T + o0) * P + p0, P,
                                 col.data() + q * K * L, L);
            }
          }
          col2im_tile(col.data(), geo.G, geo, p0, L, gxp + (n * geo.S + j * geo.G) * geo.H * geo.W);
        }
      }
    });
  });
  return gx;
}

std::vector<at::Tensor> backward_weight(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList cores,
                                        at::IntArrayRef group_sizes, int64_t group_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_cpu_floating(x, cores, "series_conv_backward_weight");
  check_cpu_floating(x, {grad_out}, "series_conv_backward_weight");
  const auto geo = make_geometry(x.sizes(), cores, group_sizes, group_size, stride, padding, dilation);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({geo.N, geo.T, geo.Ho, geo.Wo}),
              "grad_out must have shape (", geo.N, ", ", geo.T, ", ", geo.Ho, ", ", geo.Wo, "), got ",
              grad_out.sizes());
  const auto xc = x.contiguous();
  const auto gz = grad_out.contiguous();
  const int64_t nt = tiles(geo), nb = geo.blocks(), P = geo.P(), kk = geo.kk();

  // One private copy of all active gradients per thread, summed at the end: the reduction over
  // images and pixels never races.
  std::vector<int64_t> offset(geo.active + 1, 0);
  for (int64_t i = 0; i < geo.active; ++i) offset[i + 1] = offset[i] + cores[i].numel();
  const int64_t threads = at::get_num_threads();
  auto partial = at::zeros({threads, offset.back()}, x.options());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "series_conv_backward_weight_cpu", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* gzp = gz.data_ptr<scalar_t>();
    scalar_t* part = partial.data_ptr<scalar_t>();
    at::parallel_for(0, geo.N * nb * nt, 1, [&](int64_t begin, int64_t end) {
      scalar_t* mine = part + at::get_thread_num() * offset.back();
      std::vector<scalar_t> col(geo.G * kk * std::min(kTile, P));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / (nb * nt), j = item / nt % nb, p0 = item % nt * kTile;
        const int64_t L = std::min(kTile, P - p0);
        im2col_tile(xp + (n * geo.S + j * geo.G) * geo.H * geo.W, geo.G, geo, p0, L, col.data());
        for (int64_t i = 0; i < geo.active; ++i) {
          const int64_t gi = geo.g[i], ti = geo.out_per_group(i), K = gi * kk;
          for (int64_t q = 0; q < geo.G / gi; ++q) {
            const int64_t o0 = j * geo.out_per_block() + q * ti;
            // dW[o0 .. o0+ti, :] += grad_out (ti x L) * col^T (L x K)
            gemm_nt_acc<scalar_t>(ti, K, L, gzp + (n * geo.T + o0) * P + p0, P, col.data() + q * K * L, L,
                                  mine + offset[i] + o0 * K, K);
          }
        }
      }
    });
  });
  const auto total = partial.sum(0);
  std::vector<at::Tensor> grads;
  for (int64_t i = 0; i < geo.active; ++i) {
    grads.push_back(total.slice(0, offset[i], offset[i + 1]).view(cores[i].sizes()).clone());
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(gross, CPU, m) {
  m.impl("series_conv_forward", &forward);
  m.impl("series_conv_backward_input", &backward_input);
  m.impl("series_conv_backward_weight", &backward_weight);
}

}  // namespace cpu
}  // namespace gross
