// Fused bottleneck (1x1 A -> series core -> 1x1 C + bias): tile geometry and block phases (nvcc and g++).
//
// One block computes a TH x TW tile of output pixels of one image for every output channel. It
// (1) computes u = A x on the tile's input halo for all S channels into shared memory (zero in
// the padding, since u has no bias), (2) the series core z on the tile for all T channels into
// shared memory, (3) y = C z + bias to global memory. Halos of neighbouring tiles are recomputed.
#pragma once

#include "ops/cuda/series_index.h"

namespace gross {
namespace bneck {

using idx::ConvGeom;
using idx::SeriesTerms;

// Shared memory a block may use (the default limit on every GPU, so no opt-in is needed).
constexpr int64_t kSmemLimit = 48 * 1024;
// Accumulator bytes per shared element (the fused kernel accumulates in float).
constexpr int64_t kAccBytes = 4;

struct TileShape {
  int th, tw;  // output tile
  int hh, hw;  // input halo it reads
};

GK_HD TileShape tile_shape(int th, int tw, int kh, int kw, int sh, int sw, int dh, int dw) {
  return TileShape{th, tw, (th - 1) * sh + (kh - 1) * dh + 1, (tw - 1) * sw + (kw - 1) * dw + 1};
}

// Shared-memory bytes of a block with tile `ts`: u on the halo (S channels) and z on the tile (T channels).
GK_HD int64_t smem_bytes(int S, int T, const TileShape& ts) {
  return kAccBytes * (static_cast<int64_t>(S) * ts.hh * ts.hw + static_cast<int64_t>(T) * ts.th * ts.tw);
}

// Largest tile (by area, from a fixed candidate list) whose shared memory fits the limit, clipped
// to the output size; th == 0 when even a 1x1 tile does not fit (the kernel refuses the shape).
GK_HD TileShape choose_tile(int S, int T, int kh, int kw, int sh, int sw, int dh, int dw, int Ho, int Wo) {
  const int cand[][2] = {{8, 8}, {8, 4}, {4, 8}, {4, 4}, {4, 2}, {2, 4}, {2, 2}, {2, 1}, {1, 2}, {1, 1}};
  for (const auto& c : cand) {
    const int th = c[0] < Ho ? c[0] : Ho, tw = c[1] < Wo ? c[1] : Wo;
    const TileShape ts = tile_shape(th, tw, kh, kw, sh, sw, dh, dw);
    if (smem_bytes(S, T, ts) <= kSmemLimit) return ts;
  }
  return TileShape{0, 0, 0, 0};
}

// The public fit rule (mirrored by the op `gross::series_bottleneck_fits`): a 1x1 output tile fits.
GK_HD bool fits(int S, int T, int kh, int kw, int sh, int sw, int dh, int dw) {
  return smem_bytes(S, T, tile_shape(1, 1, kh, kw, sh, sw, dh, dw)) <= kSmemLimit;
}

// Everything a block reads; A is (S, Cin), C is (Cout, T), bias may be null.
template <typename scalar_t>
struct Args {
  const scalar_t* x;
  const scalar_t* A;
  SeriesTerms<scalar_t> terms;
  const scalar_t* C;
  const scalar_t* bias;
  scalar_t* y;
  ConvGeom s;  // the core's geometry (S -> T)
  int Cin, Cout;
  TileShape ts;
  int tiles_w;  // tiles per output row
};

// Top-left output pixel of tile `tile`.
GK_HD void tile_origin(const TileShape& ts, int tiles_w, int tile, int& oh0, int& ow0) {
  oh0 = (tile / tiles_w) * ts.th;
  ow0 = (tile % tiles_w) * ts.tw;
}

// Phase 1: u[s][q] over the halo of tile (n, tile).
template <typename scalar_t, typename acc_t>
GK_HD void stage_u(const Args<scalar_t>& a, acc_t* u, int n, int tile, int tid, int nthreads) {
  const ConvGeom& s = a.s;
  int oh0, ow0;
  tile_origin(a.ts, a.tiles_w, tile, oh0, ow0);
  const int ih0 = oh0 * s.sh - s.ph, iw0 = ow0 * s.sw - s.pw, area = a.ts.hh * a.ts.hw;
  const int64_t plane = static_cast<int64_t>(s.H) * s.W;
  for (int e = tid; e < s.S * area; e += nthreads) {
    const int c = e / area, q = e % area;
    const int ih = ih0 + q / a.ts.hw, iw = iw0 + q % a.ts.hw;
    acc_t v = acc_t(0);
    if (ih >= 0 && ih < s.H && iw >= 0 && iw < s.W) {
      const scalar_t* xp = a.x + static_cast<int64_t>(n) * a.Cin * plane + ih * s.W + iw;
      const scalar_t* ap = a.A + static_cast<int64_t>(c) * a.Cin;
      for (int ci = 0; ci < a.Cin; ++ci) v += static_cast<acc_t>(ap[ci]) * static_cast<acc_t>(xp[ci * plane]);
    }
    u[e] = v;
  }
}

// Phase 2: z[t][q] = the series core at tile pixel q (zero outside the output). Each term adds its
// own block-diagonal piece, so a pixel costs sum_i g_i * kh * kw multiply-adds, not G * kh * kw per term.
template <typename scalar_t, typename acc_t>
GK_HD void stage_z(const Args<scalar_t>& a, const acc_t* u, acc_t* z, int tile, int tid, int nthreads) {
  const ConvGeom& s = a.s;
  int oh0, ow0;
  tile_origin(a.ts, a.tiles_w, tile, oh0, ow0);
  const int area = a.ts.th * a.ts.tw, harea = a.ts.hh * a.ts.hw, khw = s.kh * s.kw;
  for (int e = tid; e < s.T * area; e += nthreads) {
    const int t = e / area, q = e % area, qh = q / a.ts.tw, qw = q % a.ts.tw;
    acc_t v = acc_t(0);
    if (oh0 + qh < s.Ho && ow0 + qw < s.Wo) {
      const acc_t* uq = u + qh * s.sh * a.ts.hw + qw * s.sw;
      for (int term = 0; term < a.terms.n; ++term) {
        const int g = a.terms.g[term], cin0 = (t / a.terms.to[term]) * g;
        const scalar_t* w = a.terms.w[term] + static_cast<int64_t>(t) * g * khw;
        for (int c = 0; c < g; ++c) {
          const acc_t* up = uq + (cin0 + c) * harea;
          for (int i = 0; i < s.kh; ++i)
            for (int j = 0; j < s.kw; ++j)
              v += static_cast<acc_t>(w[(c * s.kh + i) * s.kw + j]) * up[i * s.dh * a.ts.hw + j * s.dw];
        }
      }
    }
    z[e] = v;
  }
}

// Phase 3: y[n, co, pixel] = bias[co] + sum_t C[co, t] z[t][q] for the tile's in-range pixels.
template <typename scalar_t, typename acc_t>
GK_HD void stage_y(const Args<scalar_t>& a, const acc_t* z, int n, int tile, int tid, int nthreads) {
  const ConvGeom& s = a.s;
  int oh0, ow0;
  tile_origin(a.ts, a.tiles_w, tile, oh0, ow0);
  const int area = a.ts.th * a.ts.tw;
  for (int e = tid; e < a.Cout * area; e += nthreads) {
    const int co = e / area, q = e % area, oh = oh0 + q / a.ts.tw, ow = ow0 + q % a.ts.tw;
    if (oh >= s.Ho || ow >= s.Wo) continue;
    acc_t v = a.bias ? static_cast<acc_t>(a.bias[co]) : acc_t(0);
    const scalar_t* cp = a.C + static_cast<int64_t>(co) * s.T;
    for (int t = 0; t < s.T; ++t) v += static_cast<acc_t>(cp[t]) * z[t * area + q];
    a.y[((static_cast<int64_t>(n) * a.Cout + co) * s.Ho + oh) * s.Wo + ow] = static_cast<scalar_t>(v);
  }
}

}  // namespace bneck
}  // namespace gross
