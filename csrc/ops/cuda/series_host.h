// Host-side helpers shared by the CUDA launchers: argument checks, geometry and term tables.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

#include "ops/cuda/series_index.h"

namespace gross {
namespace host {

// float for half/bfloat16/float inputs, double for double.
template <typename scalar_t>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// Number of active terms (a prefix of `cores`: g_i <= group_size).
inline int count_active(at::IntArrayRef group_sizes, int64_t group_size) {
  int n = 0;
  while (n < static_cast<int>(group_sizes.size()) && group_sizes[n] <= group_size) ++n;
  return n;
}

// Checks the kernel-side invariants the validator upstream already promises (cheap, and they
// guard the raw pointer arithmetic), and returns the contiguous active cores.
inline std::vector<at::Tensor> active_cores(const at::Tensor& like, at::TensorList cores, at::IntArrayRef group_sizes,
                                            int64_t group_size, int64_t S) {
  TORCH_CHECK(cores.size() == group_sizes.size(), "cores and group_sizes must have the same length, got ",
              cores.size(), " and ", group_sizes.size());
  const int n = count_active(group_sizes, group_size);
  TORCH_CHECK(n >= 1 && group_sizes[n - 1] == group_size, "group_size ", group_size,
              " must be one of group_sizes ", group_sizes);
  TORCH_CHECK(n <= idx::kMaxTerms, "the CUDA kernels take at most ", idx::kMaxTerms, " active terms, got ", n);
  TORCH_CHECK(S % group_size == 0, "group_size ", group_size, " must divide the ", S, " input channels");
  std::vector<at::Tensor> out;
  for (int i = 0; i < n; ++i) {
    const at::Tensor& c = cores[i];
    TORCH_CHECK(c.dim() == 4 && c.size(1) == group_sizes[i], "cores[", i, "] must be (T, ", group_sizes[i],
                ", kh, kw), got ", c.sizes());
    TORCH_CHECK(c.device() == like.device() && c.scalar_type() == like.scalar_type(), "cores[", i,
                "] must match the input's device and dtype");
    TORCH_CHECK(c.size(0) == cores[0].size(0) && c.size(2) == cores[0].size(2) && c.size(3) == cores[0].size(3),
                "cores[", i, "] must share T, kh, kw with cores[0]");
    out.push_back(c.contiguous());
  }
  return out;
}

// Geometry of the series convolution at the active group size.
inline idx::ConvGeom make_geom(at::IntArrayRef in_shape, const at::Tensor& core0, int64_t group_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(in_shape.size() == 4, "input must be 4-D (N, S, H, W), got shape ", in_shape);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding and dilation must have 2 entries each");
  idx::ConvGeom s{};
  s.N = static_cast<int>(in_shape[0]);
  s.S = static_cast<int>(in_shape[1]);
  s.H = static_cast<int>(in_shape[2]);
  s.W = static_cast<int>(in_shape[3]);
  s.T = static_cast<int>(core0.size(0));
  s.kh = static_cast<int>(core0.size(2));
  s.kw = static_cast<int>(core0.size(3));
  s.sh = static_cast<int>(stride[0]);
  s.sw = static_cast<int>(stride[1]);
  s.ph = static_cast<int>(padding[0]);
  s.pw = static_cast<int>(padding[1]);
  s.dh = static_cast<int>(dilation[0]);
  s.dw = static_cast<int>(dilation[1]);
  TORCH_CHECK(s.sh >= 1 && s.sw >= 1 && s.dh >= 1 && s.dw >= 1 && s.ph >= 0 && s.pw >= 0,
              "stride and dilation must be >= 1 and padding >= 0");
  s.Ho = idx::conv_out_size(s.H, s.kh, s.sh, s.ph, s.dh);
  s.Wo = idx::conv_out_size(s.W, s.kw, s.sw, s.pw, s.dw);
  TORCH_CHECK(s.Ho > 0 && s.Wo > 0, "the dilated kernel does not fit the padded input");
  s.G = static_cast<int>(group_size);
  s.groups = s.S / s.G;
  TORCH_CHECK(s.T % s.groups == 0, "T = ", s.T, " must be divisible by S / group_size = ", s.groups);
  s.toG = s.T / s.groups;
  TORCH_CHECK(static_cast<int64_t>(s.N) * s.S * s.H * s.W < (int64_t(1) << 31) &&
                  static_cast<int64_t>(s.N) * s.T * s.Ho * s.Wo < (int64_t(1) << 31),
              "tensors over 2^31 elements are not supported by the CUDA kernels");
  return s;
}

// Term table for the kernels (pointers into the contiguous active cores).
template <typename scalar_t>
idx::SeriesTerms<scalar_t> make_terms(const std::vector<at::Tensor>& cores, const idx::ConvGeom& s) {
  idx::SeriesTerms<scalar_t> t{};
  t.n = static_cast<int>(cores.size());
  t.khw = s.kh * s.kw;
  for (int i = 0; i < t.n; ++i) {
    t.w[i] = cores[i].data_ptr<scalar_t>();
    t.g[i] = static_cast<int>(cores[i].size(1));
    t.to[i] = idx::outs_per_group(s.S, s.T, t.g[i]);
  }
  return t;
}

}  // namespace host
}  // namespace gross
