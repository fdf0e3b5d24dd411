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
    TORCH_CHECK(S % group_sizes[i] == 0 && c.size(0) % (S / group_sizes[i]) == 0, "group size ", group_sizes[i],
                " must divide S = ", S, " and S / g must divide T = ", c.size(0));
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
  for (int i = 0; i < 2; ++i)
    TORCH_CHECK(stride[i] >= 1 && dilation[i] >= 1 && padding[i] >= 0,
                "stride and dilation must be >= 1 and padding >= 0");
  TORCH_CHECK(group_size >= 1 && in_shape[1] % group_size == 0, "group_size ", group_size, " must divide S = ",
              in_shape[1]);
  auto i32 = [](int64_t v) { return static_cast<int>(v); };
  const idx::ConvGeom s = idx::make_geom(
      i32(in_shape[0]), i32(in_shape[1]), i32(in_shape[2]), i32(in_shape[3]), i32(core0.size(0)), i32(core0.size(2)),
      i32(core0.size(3)), i32(stride[0]), i32(stride[1]), i32(padding[0]), i32(padding[1]), i32(dilation[0]),
      i32(dilation[1]), i32(group_size));
  TORCH_CHECK(s.Ho > 0 && s.Wo > 0, "the dilated kernel does not fit the padded input");
  TORCH_CHECK(s.T % s.groups == 0, "T = ", s.T, " must be divisible by S / group_size = ", s.groups);
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
