// CPU kernels of the summed series of grouped convolutions: forward, grad-input, grad-weight.
//
// Work is split by (tile of whole images, chunk j of C input channels), where a chunk is one or
// more whole groups of the active group size G. Each item unfolds its C input channels once
// (im2col) and then, for every active term i, runs one batched GEMM over the C/g_i groups of
// size g_i in chunk j. The series sum happens on the fly, in the item's output tile, and no
// expanded weight is ever built.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "series_geometry.h"
#include "tiles.h"

namespace gross {
namespace cpu {
namespace {

// Columns (images x output pixels) per tile: enough for efficient GEMMs, small enough that a
// C*kh*kw x columns unfolding stays in cache.
constexpr int64_t kColumns = 512;
// Input channels per item when G is smaller: several G-blocks share one item and one GEMM call,
// whose fixed overhead otherwise dominates at small group sizes.
constexpr int64_t kChannels = 32;

struct Tiling {
  int64_t images;  // per tile
  int64_t tiles;
  int64_t C;       // input channels per chunk: a multiple of G dividing S
  int64_t tC;      // output channels per chunk
  int64_t chunks;
};

Tiling tiling(const SeriesGeometry& g) {
  Tiling t;
  t.images = std::max<int64_t>(1, std::min<int64_t>(g.N, kColumns / g.P()));
  t.tiles = (g.N + t.images - 1) / t.images;
  int64_t blocks = 1;  // largest divisor of S/G keeping the chunk within kChannels
  for (int64_t b = 1; b <= g.blocks() && b * g.G <= kChannels; ++b) {
    if (g.blocks() % b == 0) blocks = b;
  }
  t.C = blocks * g.G;
  t.tC = blocks * g.out_per_block();
  t.chunks = g.blocks() / blocks;
  return t;
}

std::vector<at::Tensor> active_cores(at::TensorList cores, const SeriesGeometry& g) {
  std::vector<at::Tensor> w;
  for (int64_t i = 0; i < g.active; ++i) w.push_back(cores[i].contiguous());
  return w;
}

// A (batch, rows, cols) tensor over raw memory whose matrices are `rows * ld` apart, no autograd.
template <typename T>
at::Tensor batch_view(const T* data, int64_t batch, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(data), {batch, rows, cols}, {rows * ld, ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Calls body(n0, images, j) for every (tile, chunk) item in parallel, below autograd.
template <typename Body>
void for_each_item(const SeriesGeometry& g, const Tiling& t, const Body& body) {
  const int64_t nb = t.chunks;
  at::parallel_for(0, t.tiles * nb, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;  // the GEMMs below run on raw buffers
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n0 = item / nb * t.images;
      body(n0, std::min(t.images, g.N - n0), item % nb);
    }
  });
}

at::Tensor forward(const at::Tensor& x, at::TensorList cores, at::IntArrayRef group_sizes, int64_t group_size,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_cpu_floating(x, cores, "series_conv_forward");
  const auto geo = make_geometry(x.sizes(), cores, group_sizes, group_size, stride, padding, dilation);
  const auto xc = x.contiguous();
  const auto w = active_cores(cores, geo);
  auto z = at::empty({geo.N, geo.T, geo.Ho, geo.Wo}, x.options());
  const auto t = tiling(geo);
  const int64_t P = geo.P(), kk = geo.kk(), tC = t.tC, C = t.C;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "series_conv_forward_cpu", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    for_each_item(geo, t, [&](int64_t n0, int64_t images, int64_t j) {
      const int64_t L = images * P;
      std::vector<scalar_t> col(C * kk * L), out(tC * L, scalar_t(0));
      im2col_tile(xp + (n0 * geo.S + j * C) * geo.H * geo.W, C, images, geo.S * geo.H * geo.W, geo,
                  col.data());
      for (int64_t i = 0; i < geo.active; ++i) {
        const int64_t gi = geo.g[i], ti = geo.out_per_group(i), K = gi * kk, nq = C / gi;
        // out[q] (ti x L) += W[q] (ti x K) @ col[q] (K x L) for every g_i-group q of chunk j
        batch_view(out.data(), nq, ti, L, L)
            .baddbmm_(batch_view(w[i].data_ptr<scalar_t>() + j * tC * K, nq, ti, K, K),
                      batch_view(col.data(), nq, K, L, L));
      }
      copy_rows(zp + (n0 * geo.T + j * tC) * P, tC, images, geo.T * P, P, out.data(), false);
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
  auto gz = grad_out.contiguous();
  const auto w = active_cores(cores, geo);
  auto gx = at::zeros(input_shape, grad_out.options());
  const auto t = tiling(geo);
  const int64_t P = geo.P(), kk = geo.kk(), tC = t.tC, C = t.C;

  AT_DISPATCH_FLOATING_TYPES(gz.scalar_type(), "series_conv_backward_input_cpu", [&] {
    scalar_t* gzp = gz.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    // An item owns whole images of one channel chunk, so its col2im never races with another's.
    for_each_item(geo, t, [&](int64_t n0, int64_t images, int64_t j) {
      const int64_t L = images * P;
      std::vector<scalar_t> col(C * kk * L, scalar_t(0)), gout(tC * L);
      copy_rows(gzp + (n0 * geo.T + j * tC) * P, tC, images, geo.T * P, P, gout.data(), true);
      for (int64_t i = 0; i < geo.active; ++i) {
        const int64_t gi = geo.g[i], ti = geo.out_per_group(i), K = gi * kk, nq = C / gi;
        // col[q] (K x L) += W[q]^T (K x ti) @ grad_out[q] (ti x L)
        batch_view(col.data(), nq, K, L, L)
            .baddbmm_(batch_view(w[i].data_ptr<scalar_t>() + j * tC * K, nq, ti, K, K).transpose(1, 2),
                      batch_view(gout.data(), nq, ti, L, L));
      }
      col2im_tile(col.data(), C, images, geo.S * geo.H * geo.W, geo,
                  gxp + (n0 * geo.S + j * C) * geo.H * geo.W);
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
  auto gz = grad_out.contiguous();
  const auto t = tiling(geo);
  const int64_t P = geo.P(), kk = geo.kk(), tC = t.tC, C = t.C;

  // One private copy of all active gradients per thread, summed at the end: the reduction over
  // images never races.
  std::vector<int64_t> offset(geo.active + 1, 0);
  for (int64_t i = 0; i < geo.active; ++i) offset[i + 1] = offset[i] + cores[i].numel();
  auto partial = at::zeros({at::get_num_threads(), offset.back()}, x.options());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "series_conv_backward_weight_cpu", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* gzp = gz.data_ptr<scalar_t>();
    scalar_t* part = partial.data_ptr<scalar_t>();
    for_each_item(geo, t, [&](int64_t n0, int64_t images, int64_t j) {
      scalar_t* mine = part + at::get_thread_num() * offset.back();
      const int64_t L = images * P;
      std::vector<scalar_t> col(C * kk * L), gout(tC * L);
      im2col_tile(xp + (n0 * geo.S + j * C) * geo.H * geo.W, C, images, geo.S * geo.H * geo.W, geo,
                  col.data());
      copy_rows(gzp + (n0 * geo.T + j * tC) * P, tC, images, geo.T * P, P, gout.data(), true);
      for (int64_t i = 0; i < geo.active; ++i) {
        const int64_t gi = geo.g[i], ti = geo.out_per_group(i), K = gi * kk, nq = C / gi;
        // dW[q] (ti x K) += grad_out[q] (ti x L) @ col[q]^T (L x K)
        batch_view(mine + offset[i] + j * tC * K, nq, ti, K, K)
            .baddbmm_(batch_view(gout.data(), nq, ti, L, L), batch_view(col.data(), nq, K, L, L).transpose(1, 2));
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
