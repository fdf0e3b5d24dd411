// Building blocks of the CPU series kernels: im2col / col2im of a pixel tile and small vectorisable GEMMs.
#pragma once

#include <algorithm>
#include <cstdint>

#include "series_geometry.h"

namespace gross {
namespace cpu {

// col[(c*kh + i)*kw + j][l] = x[c][ih][iw] for output pixels p0 .. p0+L-1 (0 outside the image).
// `x` points at channel 0 of C contiguous (H, W) planes; col rows have stride L.
template <typename T>
void im2col_tile(const T* x, int64_t C, const SeriesGeometry& g, int64_t p0, int64_t L, T* col) {
  const int64_t HW = g.H * g.W;
  for (int64_t c = 0; c < C; ++c) {
    const T* plane = x + c * HW;
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        T* dst = col + ((c * g.kh + i) * g.kw + j) * L;
        int64_t oh = p0 / g.Wo, ow = p0 % g.Wo;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t ih = oh * g.sh - g.ph + i * g.dh;
          const int64_t iw = ow * g.sw - g.pw + j * g.dw;
          dst[l] = (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) ? plane[ih * g.W + iw] : T(0);
          if (++ow == g.Wo) {
            ow = 0;
            ++oh;
          }
        }
      }
    }
  }
}

// The adjoint of im2col_tile: x[c][ih][iw] += col[...][l].
template <typename T>
void col2im_tile(const T* col, int64_t C, const SeriesGeometry& g, int64_t p0, int64_t L, T* x) {
  const int64_t HW = g.H * g.W;
  for (int64_t c = 0; c < C; ++c) {
    T* plane = x + c * HW;
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        const T* src = col + ((c * g.kh + i) * g.kw + j) * L;
        int64_t oh = p0 / g.Wo, ow = p0 % g.Wo;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t ih = oh * g.sh - g.ph + i * g.dh;
          const int64_t iw = ow * g.sw - g.pw + j * g.dw;
          if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
            plane[ih * g.W + iw] += src[l];
          }
          if (++ow == g.Wo) {
            ow = 0;
            ++oh;
          }
        }
      }
    }
  }
}

// C[m][p] += sum_k A[m*a_rs + k*a_cs] * B[k*ldb + p] for MR rows and NR columns, accumulators in registers.
template <typename T, int MR, int NR>
inline void gemm_block(int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t ldb, T* C,
                       int64_t ldc) {
  T acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < NR; ++p) acc[m][p] = C[m * ldc + p];
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    for (int m = 0; m < MR; ++m) {
      const T a = A[m * a_rs + k * a_cs];
      for (int p = 0; p < NR; ++p) acc[m][p] += a * b[p];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < NR; ++p) C[m * ldc + p] = acc[m][p];
}

// Edge version of gemm_block with run-time sizes (rows < MR or columns < NR).
template <typename T>
inline void gemm_edge(int64_t M, int64_t K, int64_t L, const T* A, int64_t a_rs, int64_t a_cs, const T* B,
                      int64_t ldb, T* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    T* c = C + m * ldc;
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[m * a_rs + k * a_cs];
      const T* b = B + k * ldb;
      for (int64_t p = 0; p < L; ++p) c[p] += a * b[p];
    }
  }
}

// C (M x L, row stride ldc) += A (M x K, strides a_rs, a_cs) * B (K x L, row stride ldb).
template <typename T>
void gemm_acc(int64_t M, int64_t K, int64_t L, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t ldb,
              T* C, int64_t ldc) {
  constexpr int MR = 4;
  constexpr int NR = 64 / sizeof(T);  // one 512-bit (or two 256-bit) vector per row
  int64_t m = 0;
  for (; m + MR <= M; m += MR) {
    int64_t p = 0;
    for (; p + NR <= L; p += NR) {
      gemm_block<T, MR, NR>(K, A + m * a_rs, a_rs, a_cs, B + p, ldb, C + m * ldc + p, ldc);
    }
    if (p < L) gemm_edge(MR, K, L - p, A + m * a_rs, a_rs, a_cs, B + p, ldb, C + m * ldc + p, ldc);
  }
  for (; m < M; ++m) {
    int64_t p = 0;
    for (; p + NR <= L; p += NR) {
      gemm_block<T, 1, NR>(K, A + m * a_rs, a_rs, a_cs, B + p, ldb, C + m * ldc + p, ldc);
    }
    if (p < L) gemm_edge(1, K, L - p, A + m * a_rs, a_rs, a_cs, B + p, ldb, C + m * ldc + p, ldc);
  }
}

// D[m][k] += sum_p A[m*lda + p] * B[k*ldb + p] (both operands contiguous along p), for the weight gradient.
// Fixed-width partial sums keep the reduction vectorisable without -ffast-math.
template <typename T>
void gemm_nt_acc(int64_t M, int64_t K, int64_t L, const T* A, int64_t lda, const T* B, int64_t ldb, T* D,
                 int64_t ldd) {
  constexpr int V = 64 / sizeof(T);
  constexpr int MR = 4;
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    const int64_t mr = std::min<int64_t>(MR, M - m0);
    for (int64_t k = 0; k < K; ++k) {
      const T* b = B + k * ldb;
      T part[MR][V] = {};
      int64_t p = 0;
      if (mr == MR) {
        for (; p + V <= L; p += V)
          for (int m = 0; m < MR; ++m)
            for (int v = 0; v < V; ++v) part[m][v] += A[(m0 + m) * lda + p + v] * b[p + v];
      }
      for (int64_t m = 0; m < mr; ++m) {
        T sum = 0;
        for (int v = 0; v < V; ++v) sum += part[m][v];
        for (int64_t q = p; q < L; ++q) sum += A[(m0 + m) * lda + q] * b[q];
        D[(m0 + m) * ldd + k] += sum;
      }
    }
  }
}

}  // namespace cpu
}  // namespace gross
