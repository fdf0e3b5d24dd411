// Shapes of one series-conv call, checked once for every CPU kernel (cheap TORCH_CHECKs for direct callers).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace gross {
namespace cpu {

struct SeriesGeometry {
  int64_t N, S, H, W;        // input
  int64_t T, kh, kw;         // cores
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t Ho, Wo;            // output
  int64_t G;                 // active group size
  int64_t active;            // number of active terms (a prefix of the series)
  std::vector<int64_t> g;    // group sizes of the active terms

  int64_t kk() const { return kh * kw; }
  int64_t P() const { return Ho * Wo; }
  int64_t blocks() const { return S / G; }            // groups at the active size
  int64_t out_per_block() const { return T / blocks(); }
  int64_t out_per_group(int64_t i) const { return T * g[i] / S; }
};

// Validates cores/group sizes/conv parameters against an input of shape (N, S, H, W).
SeriesGeometry make_geometry(at::IntArrayRef input_shape, at::TensorList cores, at::IntArrayRef group_sizes,
                             int64_t group_size, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation);

// Checks that every tensor is a CPU float/double tensor of `ref`'s dtype.
void check_cpu_floating(const at::Tensor& ref, at::TensorList others, const char* op);

}  // namespace cpu
}  // namespace gross
