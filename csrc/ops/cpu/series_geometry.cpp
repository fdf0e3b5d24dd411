// Argument checks and derived shapes shared by the CPU series kernels.
#include "series_geometry.h"

namespace gross {
namespace cpu {

namespace {

void check_pair(at::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK(v.size() == 2, name, " must have 2 elements, got ", v.size());
  TORCH_CHECK(v[0] >= min_value && v[1] >= min_value, name, " must be >= ", min_value, ", got ", v);
}

}  // namespace

SeriesGeometry make_geometry(at::IntArrayRef input_shape, at::TensorList cores, at::IntArrayRef group_sizes,
                             int64_t group_size, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  TORCH_CHECK(input_shape.size() == 4, "x must be 4-D (N, S, H, W), got shape ", input_shape);
  TORCH_CHECK(!cores.empty(), "cores must not be empty");
  TORCH_CHECK(cores.size() == group_sizes.size(), "cores (", cores.size(), ") and group_sizes (",
              group_sizes.size(), ") must have the same length");
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);

  SeriesGeometry geo;
  geo.N = input_shape[0];
  geo.S = input_shape[1];
  geo.H = input_shape[2];
  geo.W = input_shape[3];
  TORCH_CHECK(cores[0].dim() == 4, "cores[0] must be 4-D (T, g, kh, kw)");
  geo.T = cores[0].size(0);
  geo.kh = cores[0].size(2);
  geo.kw = cores[0].size(3);
  geo.sh = stride[0], geo.sw = stride[1];
  geo.ph = padding[0], geo.pw = padding[1];
  geo.dh = dilation[0], geo.dw = dilation[1];
  geo.G = group_size;

  bool found = false;
  for (size_t i = 0; i < group_sizes.size(); ++i) {
    const int64_t g = group_sizes[i];
    TORCH_CHECK(g > 0 && geo.S % g == 0, "group_sizes[", i, "]=", g, " must be positive and divide S=", geo.S);
    TORCH_CHECK(geo.T % (geo.S / g) == 0, "S/group_sizes[", i, "]=", geo.S / g, " must divide T=", geo.T);
    if (i > 0) {
      TORCH_CHECK(g > group_sizes[i - 1] && g % group_sizes[i - 1] == 0,
                  "group_sizes must be strictly increasing with each dividing the next, got ", group_sizes);
    }
    const auto& c = cores[i];
    TORCH_CHECK(c.dim() == 4 && c.size(0) == geo.T && c.size(1) == g && c.size(2) == geo.kh && c.size(3) == geo.kw,
                "cores[", i, "] must have shape (", geo.T, ", ", g, ", ", geo.kh, ", ", geo.kw, "), got ",
                c.sizes());
    if (g <= group_size) {
      geo.g.push_back(g);
    }
    found = found || g == group_size;
  }
  TORCH_CHECK(found, "group_size=", group_size, " must be one of group_sizes ", group_sizes);
  geo.active = static_cast<int64_t>(geo.g.size());

  geo.Ho = (geo.H + 2 * geo.ph - geo.dh * (geo.kh - 1) - 1) / geo.sh + 1;
  geo.Wo = (geo.W + 2 * geo.pw - geo.dw * (geo.kw - 1) - 1) / geo.sw + 1;
  TORCH_CHECK(geo.Ho > 0 && geo.Wo > 0, "output size would be non-positive (", geo.Ho, " x ", geo.Wo,
              ") for input ", input_shape);
  return geo;
}

void check_cpu_floating(const at::Tensor& ref, at::TensorList others, const char* op) {
  TORCH_CHECK(ref.device().is_cpu(), op, ": tensors must be on the CPU");
  TORCH_CHECK(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble, op,
              ": dtype must be float32 or float64, got ", ref.scalar_type());
  for (const auto& t : others) {
    TORCH_CHECK(t.device().is_cpu(), op, ": tensors must be on the CPU");
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": all tensors must have dtype ", ref.scalar_type(),
                ", got ", t.scalar_type());
  }
}

}  // namespace cpu
}  // namespace gross
