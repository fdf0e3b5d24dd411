// Unfolding of a tile of whole images for the CPU series kernels: im2col, its adjoint, and row gathers.
//
// A tile holds `images` consecutive images; its column index is l = image * P + pixel, with
// P = Ho * Wo output pixels, so a tile has L = images * P columns.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "series_geometry.h"

namespace gross {
namespace cpu {

// Output columns [lo, hi) whose input column ow*sw - pw + j*dw lies inside the image, for kernel column j.
inline void inside_columns(const SeriesGeometry& g, int64_t j, int64_t& lo, int64_t& hi) {
  const int64_t shift = j * g.dw - g.pw;  // iw = ow * sw + shift
  lo = shift >= 0 ? 0 : (-shift + g.sw - 1) / g.sw;
  hi = g.W - 1 - shift < 0 ? 0 : std::min(g.Wo, (g.W - 1 - shift) / g.sw + 1);
  lo = std::min(lo, hi);
}

// col[(c*kh + i)*kw + j][l] = x[n][c][ih][iw] (0 outside the image) for C channels starting at
// `x` (image 0, first channel of the block); images are `image_stride` elements apart.
template <typename T>
void im2col_tile(const T* x, int64_t C, int64_t images, int64_t image_stride, const SeriesGeometry& g, T* col) {
  const int64_t HW = g.H * g.W, L = images * g.P();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        T* dst = col + ((c * g.kh + i) * g.kw + j) * L;
        int64_t lo, hi;
        inside_columns(g, j, lo, hi);
        const int64_t shift = j * g.dw - g.pw;
        for (int64_t n = 0; n < images; ++n) {
          const T* plane = x + n * image_stride + c * HW;
          for (int64_t oh = 0; oh < g.Ho; ++oh, dst += g.Wo) {
            const int64_t ih = oh * g.sh - g.ph + i * g.dh;
            if (ih < 0 || ih >= g.H) {
              std::fill(dst, dst + g.Wo, T(0));
              continue;
            }
            const T* row = plane + ih * g.W;
            std::fill(dst, dst + lo, T(0));
            for (int64_t ow = lo; ow < hi; ++ow) dst[ow] = row[ow * g.sw + shift];
            std::fill(dst + hi, dst + g.Wo, T(0));
          }
        }
      }
    }
  }
}

// The adjoint of im2col_tile: x[n][c][ih][iw] += col[...][l].
template <typename T>
void col2im_tile(const T* col, int64_t C, int64_t images, int64_t image_stride, const SeriesGeometry& g, T* x) {
  const int64_t HW = g.H * g.W, L = images * g.P();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        const T* src = col + ((c * g.kh + i) * g.kw + j) * L;
        int64_t lo, hi;
        inside_columns(g, j, lo, hi);
        const int64_t shift = j * g.dw - g.pw;
        for (int64_t n = 0; n < images; ++n) {
          T* plane = x + n * image_stride + c * HW;
          for (int64_t oh = 0; oh < g.Ho; ++oh, src += g.Wo) {
            const int64_t ih = oh * g.sh - g.ph + i * g.dh;
            if (ih < 0 || ih >= g.H) continue;
            T* row = plane + ih * g.W;
            for (int64_t ow = lo; ow < hi; ++ow) row[ow * g.sw + shift] += src[ow];
          }
        }
      }
    }
  }
}

// Copies `rows` channel planes of `images` images between (N, C, P) storage and a (rows, images*P)
// tile: to_tile=true gathers, false scatters.
template <typename T>
void copy_rows(T* nchw, int64_t rows, int64_t images, int64_t image_stride, int64_t P, T* tile, bool to_tile) {
  const int64_t L = images * P;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t n = 0; n < images; ++n) {
      T* a = nchw + n * image_stride + r * P;
      T* b = tile + r * L + n * P;
      if (to_tile) {
        std::memcpy(b, a, P * sizeof(T));
      } else {
        std::memcpy(a, b, P * sizeof(T));
      }
    }
  }
}

}  // namespace cpu
}  // namespace gross
