// CPU copy of a 4-D tensor between NCHW and channels-last (NHWC): one transpose per image.
//
// ATen's copy_ runs this permutation through its generic strided loop, which on the paper's
// layers (32 channels, 16x16 images) costs several times a plain copy of the same bytes; the
// CPU `auto` path converts activations and gradients on every call, so that cost shows up in
// every training step. Each image is a (rows x cols) matrix to transpose: (C x HW) one way,
// (HW x C) the other. Work items are strips of 4 destination rows; a strip walks every source
// row, reading 4 neighbouring values from each (which stay in cache for the next strip) and
// writing its 4 destination rows sequentially. float uses 4x4 SSE transposes where available.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace gross {
namespace cpu {
namespace {

constexpr int64_t kStrip = 4;

// dst (cols x rows) rows [j0, j1) from src (rows x cols) columns [j0, j1), rows [i0, rows).
template <typename T>
void transpose_scalar(const T* src, T* dst, int64_t rows, int64_t cols, int64_t i0, int64_t j0,
                      int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t i = i0; i < rows; ++i) {
      dst[j * rows + i] = src[i * cols + j];
    }
  }
}

template <typename T>
void transpose_strip(const T* src, T* dst, int64_t rows, int64_t cols, int64_t j0, int64_t j1) {
  transpose_scalar(src, dst, rows, cols, 0, j0, j1);
}

#if defined(__SSE2__)
template <>
void transpose_strip<float>(const float* src, float* dst, int64_t rows, int64_t cols, int64_t j0,
                            int64_t j1) {
  if (j1 - j0 < 4) {
    transpose_scalar(src, dst, rows, cols, 0, j0, j1);
    return;
  }
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    __m128 r0 = _mm_loadu_ps(src + i * cols + j0);
    __m128 r1 = _mm_loadu_ps(src + (i + 1) * cols + j0);
    __m128 r2 = _mm_loadu_ps(src + (i + 2) * cols + j0);
    __m128 r3 = _mm_loadu_ps(src + (i + 3) * cols + j0);
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
    _mm_storeu_ps(dst + j0 * rows + i, r0);
    _mm_storeu_ps(dst + (j0 + 1) * rows + i, r1);
    _mm_storeu_ps(dst + (j0 + 2) * rows + i, r2);
    _mm_storeu_ps(dst + (j0 + 3) * rows + i, r3);
  }
  transpose_scalar(src, dst, rows, cols, i, j0, j1);
}
#endif

template <typename T>
void transpose_images(const T* src, T* dst, int64_t images, int64_t rows, int64_t cols) {
  const int64_t strips = (cols + kStrip - 1) / kStrip;
  // About 16K elements per task keeps the scheduling overhead small on small images.
  const int64_t grain = std::max<int64_t>(1, (16 * 1024) / std::max<int64_t>(1, rows * kStrip));
  at::parallel_for(0, images * strips, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t image = t / strips, j0 = (t % strips) * kStrip;
      const int64_t offset = image * rows * cols;
      transpose_strip(src + offset, dst + offset, rows, cols, j0, std::min(cols, j0 + kStrip));
    }
  });
}

// A copy of x (N, C, H, W) in the memory format `channels_last` selects; x must be dense in the
// other one (the Python caller routes every other case to ATen's copy).
at::Tensor relayout(const at::Tensor& x, bool channels_last) {
  TORCH_CHECK(x.dim() == 4, "relayout: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  const auto target = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto source = channels_last ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(x.is_contiguous(source), "relayout: x must be dense in the ",
              channels_last ? "NCHW" : "channels-last", " layout to convert it");
  auto out = at::empty(x.sizes(), x.options().memory_format(target));
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const int64_t rows = channels_last ? C : HW, cols = channels_last ? HW : C;
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, x.scalar_type(), "relayout", [&] {
    transpose_images(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), N, rows, cols);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gross, CPU, m) { m.impl("relayout", &relayout); }

}  // namespace cpu
}  // namespace gross
