// Implicit-GEMM formulation of the series convolution: operand gathers and block phases (nvcc and g++).
//
// Each pass is a batched GEMM over the `groups` of the active group size G:
//   forward        C[m=pixel, n=out channel]  = sum_k A[pixel, (c, tap)] * B[(c, tap), out channel]
//   grad input     C[m=pixel, n=in channel]   = sum_k A[pixel, (t, tap)] * B[(t, tap), in channel]
//   grad weight    C[m=out channel, n=(c, tap)] = sum_k A[t, (img, pixel)] * B[(img, pixel), (c, tap)]
// The B operand of the first two is the summed weight W_eff, assembled from the active terms'
// block-diagonal pieces while a tile is loaded (never stored in global memory). A kernel is the
// sequence load_tiles -> (sync) -> mma_tile -> (sync) per K-tile, then store_tile; the CPU
// tests run the same phases thread by thread.
#pragma once

#include "ops/cuda/series_index.h"

namespace gross {
namespace gemm {

using idx::ConvGeom;
using idx::SeriesTerms;

// Block tile BM x BN, K-step BK, each thread owning TM x TN outputs. Thread `tid` owns rows
// tm + i * RT and columns tn + j * CT (tm = tid % RT fastest), so a warp's stores along M
// (pixels, contiguous in NCHW) are coalesced and its shared-memory reads broadcast. The shared
// tiles' rows are padded by PAD elements: 1 spreads column-wise writes over distinct banks; the
// tensor-core tiles use 8, as WMMA needs row strides that are multiples of 16 bytes.
template <int BM_, int BN_, int BK_, int TM_, int TN_, int PAD = 1>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_;
  static constexpr int RT = BM / TM, CT = BN / TN, THREADS = RT * CT;
  static constexpr int LDA = BM + PAD, LDB = BN + PAD;
  static constexpr int SMEM_A = BK * LDA, SMEM_B = BK * LDB;
  static_assert(BM % TM == 0 && BN % TN == 0, "tile must divide into thread tiles");
  static_assert(THREADS % BM == 0 && THREADS % BN == 0 && THREADS % BK == 0,
                "each thread loads a fixed row or column of the shared tiles");
};

// The tiles the kernels launch: N tiles 16/32/64 wide for the forward and input-gradient passes
// (the narrowest covering the columns), and an M tile of 16 or 64 output channels for the weight gradient.
using TileN16 = Tile<64, 16, 16, 4, 4>;
using TileN32 = Tile<64, 32, 16, 4, 4>;
using TileN64 = Tile<64, 64, 16, 4, 4>;
using TileW16 = Tile<16, 64, 16, 2, 4>;
using TileW64 = Tile<64, 64, 16, 4, 4>;

// Converts an accumulator value to the shared-tile element type (the CUDA file specialises it
// for the tensor-core types __half and __nv_bfloat16, whose implicit conversions torch disables).
template <typename smem_t>
struct SmemCast {
  template <typename acc_t>
  static GK_HD smem_t from(acc_t v) {
    return static_cast<smem_t>(v);
  }
};

// Row and reduction indices fit in 32 bits (the launchers refuse tensors of 2^31 elements or more),
// so the gathers divide in 32-bit arithmetic, several times cheaper than 64-bit on the GPU.

// The forward pass: A = im2col(x) gathered on the fly, B = W_eff.
template <typename scalar_t, typename acc_t>
struct ForwardProblem {
  static constexpr bool kAMFast = true;   // consecutive threads load consecutive pixels of A
  static constexpr bool kBNFast = false;  // ... and consecutive taps of a weight row of B
  const scalar_t* x;
  scalar_t* out;
  SeriesTerms<scalar_t> terms;
  ConvGeom s;
  GK_HD int64_t M() const { return static_cast<int64_t>(s.N) * s.Ho * s.Wo; }
  GK_HD int Ncol() const { return s.toG; }
  GK_HD int64_t K() const { return static_cast<int64_t>(s.G) * s.kh * s.kw; }

  GK_HD acc_t a(int g, int64_t m, int64_t k) const {
    const int hw = s.Ho * s.Wo, mi = static_cast<int>(m), ki = static_cast<int>(k);
    const int n = mi / hw, p = mi % hw;
    const int khw = s.kh * s.kw, c = ki / khw, r = ki % khw;
    const int ih = idx::input_coord(p / s.Wo, r / s.kw, s.sh, s.ph, s.dh);
    const int iw = idx::input_coord(p % s.Wo, r % s.kw, s.sw, s.pw, s.dw);
    if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) return acc_t(0);
    return static_cast<acc_t>(x[((static_cast<int64_t>(n) * s.S + g * s.G + c) * s.H + ih) * s.W + iw]);
  }
  GK_HD acc_t b(int g, int64_t k, int n) const {
    const int khw = s.kh * s.kw;
    const int ki = static_cast<int>(k);
    return idx::effective_weight<acc_t>(terms, g * s.toG + n, g * s.G + ki / khw, ki % khw);
  }
  GK_HD void store(int g, int /*split*/, int64_t m, int n, acc_t v) const {
    const int hw = s.Ho * s.Wo, mi = static_cast<int>(m);
    out[(static_cast<int64_t>(mi / hw) * s.T + g * s.toG + n) * hw + mi % hw] = static_cast<scalar_t>(v);
  }
};

// The input gradient: A = the output gradient gathered through the transposed taps, B = W_eff^T.
template <typename scalar_t, typename acc_t>
struct BackwardInputProblem {
  static constexpr bool kAMFast = true;
  static constexpr bool kBNFast = true;
  const scalar_t* gz;
  scalar_t* gx;
  SeriesTerms<scalar_t> terms;
  ConvGeom s;
  GK_HD int64_t M() const { return static_cast<int64_t>(s.N) * s.H * s.W; }
  GK_HD int Ncol() const { return s.G; }
  GK_HD int64_t K() const { return static_cast<int64_t>(s.toG) * s.kh * s.kw; }

  GK_HD acc_t a(int g, int64_t m, int64_t k) const {
    const int hw = s.H * s.W, mi = static_cast<int>(m), ki = static_cast<int>(k);
    const int n = mi / hw, p = mi % hw;
    const int khw = s.kh * s.kw, tl = ki / khw, r = ki % khw;
    const int oh = idx::output_coord(p / s.W, r / s.kw, s.sh, s.ph, s.dh, s.Ho);
    const int ow = idx::output_coord(p % s.W, r % s.kw, s.sw, s.pw, s.dw, s.Wo);
    if (oh < 0 || ow < 0) return acc_t(0);
    return static_cast<acc_t>(gz[((static_cast<int64_t>(n) * s.T + g * s.toG + tl) * s.Ho + oh) * s.Wo + ow]);
  }
  GK_HD acc_t b(int g, int64_t k, int n) const {
    const int khw = s.kh * s.kw;
    const int ki = static_cast<int>(k);
    return idx::effective_weight<acc_t>(terms, g * s.toG + ki / khw, g * s.G + n, ki % khw);
  }
  GK_HD void store(int g, int /*split*/, int64_t m, int n, acc_t v) const {
    const int hw = s.H * s.W, mi = static_cast<int>(m);
    gx[(static_cast<int64_t>(mi / hw) * s.S + g * s.G + n) * hw + mi % hw] = static_cast<scalar_t>(v);
  }
};

// The weight gradient of W_eff (T, G, kh, kw), reduced over images and output pixels. Split-K
// partial sums go to a float workspace ws[split][T][G * kh * kw]; a second pass adds the splits
// in a fixed order (deterministic, no atomics) and gathers each active term's block.
template <typename scalar_t, typename acc_t>
struct BackwardWeightProblem {
  static constexpr bool kAMFast = false;  // consecutive threads load consecutive pixels (K)
  static constexpr bool kBNFast = false;
  const scalar_t* gz;
  const scalar_t* x;
  acc_t* ws;
  ConvGeom s;
  GK_HD int64_t M() const { return s.toG; }
  GK_HD int Ncol() const { return s.G * s.kh * s.kw; }
  GK_HD int64_t K() const { return static_cast<int64_t>(s.N) * s.Ho * s.Wo; }

  GK_HD acc_t a(int g, int64_t m, int64_t k) const {
    const int hw = s.Ho * s.Wo, ki = static_cast<int>(k);
    return static_cast<acc_t>(gz[(static_cast<int64_t>(ki / hw) * s.T + g * s.toG + m) * hw + ki % hw]);
  }
  GK_HD acc_t b(int g, int64_t k, int n) const {
    const int hw = s.Ho * s.Wo, ki = static_cast<int>(k);
    const int img = ki / hw, p = ki % hw;
    const int khw = s.kh * s.kw, c = n / khw, r = n % khw;
    const int ih = idx::input_coord(p / s.Wo, r / s.kw, s.sh, s.ph, s.dh);
    const int iw = idx::input_coord(p % s.Wo, r % s.kw, s.sw, s.pw, s.dw);
    if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) return acc_t(0);
    return static_cast<acc_t>(x[((static_cast<int64_t>(img) * s.S + g * s.G + c) * s.H + ih) * s.W + iw]);
  }
  GK_HD void store(int g, int split, int64_t m, int n, acc_t v) const {
    ws[(static_cast<int64_t>(split) * s.T + g * s.toG + m) * (s.G * s.kh * s.kw) + n] = v;
  }
};

// Split-K count of the weight-gradient GEMM with tile Cfg (grid.z = groups * splits <= 65535).
template <class Cfg, typename scalar_t, typename acc_t>
GK_HD int weight_splits(const BackwardWeightProblem<scalar_t, acc_t>& p) {
  const int64_t blocks_mn = idx::ceil_div(p.M(), Cfg::BM) * idx::ceil_div(p.Ncol(), Cfg::BN) * p.s.groups;
  const int sp = idx::choose_splits(blocks_mn, p.K(), Cfg::BK);
  return sp * static_cast<int64_t>(p.s.groups) > 65535 ? static_cast<int>(65535 / p.s.groups) : sp;
}

// Gradient of element e of a term with group size g (to outputs per group), shaped (T, g, kh, kw):
// the sum over splits of the matching W_eff gradient entry.
template <typename acc_t>
GK_HD acc_t term_weight_grad(const acc_t* ws, int splits, const ConvGeom& s, int g, int to, int64_t e) {
  const int khw = s.kh * s.kw;
  const int r = static_cast<int>(e % khw), cl = static_cast<int>((e / khw) % g);
  const int t = static_cast<int>(e / (static_cast<int64_t>(khw) * g));
  const int ce = idx::term_to_eff_channel(t, cl, g, to, s.G, s.toG);
  const int64_t stride = static_cast<int64_t>(s.T) * s.G * khw;
  const acc_t* p = ws + (static_cast<int64_t>(t) * s.G + ce) * khw + r;
  acc_t v = acc_t(0);
  for (int sp = 0; sp < splits; ++sp) v += p[sp * stride];
  return v;
}

// Phase 1 of a K-step: thread `tid` fills its share of the A tile (sA[k][m]) and B tile
// (sB[k][n]) for K indices [k0, k0 + BK) clipped to kend; out-of-range entries are zero. Along
// each tile's fast index (chosen by the problem for coalescing) a thread keeps one fixed position
// and strides over the other index, so the arithmetic of that position (e.g. a pixel's image and
// coordinates) is the same in every K-step and the compiler hoists it out of the K loop.
template <class Cfg, class P, typename smem_t>
GK_HD void load_tiles(const P& p, smem_t* sA, smem_t* sB, int tid, int g, int64_t m0, int n0, int64_t k0,
                      int64_t kend) {
  const smem_t zero = SmemCast<smem_t>::from(0.0f);
  const int64_t M = p.M();
  const int Ncol = p.Ncol();
  if (P::kAMFast) {
    const int mm = tid % Cfg::BM;
    const int64_t m = m0 + mm;
    for (int kk = tid / Cfg::BM; kk < Cfg::BK; kk += Cfg::THREADS / Cfg::BM)
      sA[kk * Cfg::LDA + mm] = (m < M && k0 + kk < kend) ? SmemCast<smem_t>::from(p.a(g, m, k0 + kk)) : zero;
  } else {
    const int kk = tid % Cfg::BK;
    const int64_t k = k0 + kk;
    for (int mm = tid / Cfg::BK; mm < Cfg::BM; mm += Cfg::THREADS / Cfg::BK)
      sA[kk * Cfg::LDA + mm] = (m0 + mm < M && k < kend) ? SmemCast<smem_t>::from(p.a(g, m0 + mm, k)) : zero;
  }
  if (P::kBNFast) {
    const int nn = tid % Cfg::BN, n = n0 + nn;
    for (int kk = tid / Cfg::BN; kk < Cfg::BK; kk += Cfg::THREADS / Cfg::BN)
      sB[kk * Cfg::LDB + nn] = (n < Ncol && k0 + kk < kend) ? SmemCast<smem_t>::from(p.b(g, k0 + kk, n)) : zero;
  } else {
    const int kk = tid % Cfg::BK;
    const int64_t k = k0 + kk;
    for (int nn = tid / Cfg::BK; nn < Cfg::BN; nn += Cfg::THREADS / Cfg::BK)
      sB[kk * Cfg::LDB + nn] = (n0 + nn < Ncol && k < kend) ? SmemCast<smem_t>::from(p.b(g, k, n0 + nn)) : zero;
  }
}

// Phase 2: thread `tid` accumulates its TM x TN outputs over the BK rows of the shared tiles.
template <class Cfg, typename acc_t>
GK_HD void mma_tile(const acc_t* sA, const acc_t* sB, acc_t (&acc)[Cfg::TM][Cfg::TN], int tid) {
  const int tm = tid % Cfg::RT, tn = tid / Cfg::RT;
  GK_UNROLL
  for (int kk = 0; kk < Cfg::BK; ++kk) {
    acc_t av[Cfg::TM], bv[Cfg::TN];
    GK_UNROLL
    for (int i = 0; i < Cfg::TM; ++i) av[i] = sA[kk * Cfg::LDA + tm + i * Cfg::RT];
    GK_UNROLL
    for (int j = 0; j < Cfg::TN; ++j) bv[j] = sB[kk * Cfg::LDB + tn + j * Cfg::CT];
    GK_UNROLL
    for (int i = 0; i < Cfg::TM; ++i)
      GK_UNROLL
      for (int j = 0; j < Cfg::TN; ++j) acc[i][j] += av[i] * bv[j];
  }
}

// Phase 3: thread `tid` writes its in-range outputs.
template <class Cfg, class P, typename acc_t>
GK_HD void store_tile(const P& p, const acc_t (&acc)[Cfg::TM][Cfg::TN], int tid, int g, int split, int64_t m0,
                      int n0) {
  const int tm = tid % Cfg::RT, tn = tid / Cfg::RT;
  const int64_t M = p.M();
  const int Ncol = p.Ncol();
  GK_UNROLL
  for (int i = 0; i < Cfg::TM; ++i) {
    const int64_t m = m0 + tm + i * Cfg::RT;
    if (m >= M) continue;
    GK_UNROLL
    for (int j = 0; j < Cfg::TN; ++j) {
      const int n = n0 + tn + j * Cfg::CT;
      if (n < Ncol) p.store(g, split, m, n, acc[i][j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core variant (float16 / bfloat16 inputs, float32 accumulation, sm_80+): the same load and
// store phases around WMMA 16x16x16 products. The shared A tile (element (m, k) at k * LDA + m) is
// a column-major M x BK matrix, B (element (k, n) at k * LDB + n) a row-major BK x N matrix; each
// warp owns PER_WARP of the 16 x 16 output sub-tiles, and the accumulators go through a shared
// float tile sC (row-major, stride LDC) back to the per-thread layout of store_tile.

using TcN16 = Tile<64, 16, 16, 4, 4, 8>;
using TcN32 = Tile<64, 32, 16, 4, 4, 8>;
using TcN64 = Tile<64, 64, 16, 4, 4, 8>;
using TcW16 = Tile<16, 64, 16, 2, 4, 8>;
using TcW64 = Tile<64, 64, 16, 4, 4, 8>;

constexpr int kFrag = 16;

template <class Cfg>
struct TcLayout {
  static constexpr int ROWS = Cfg::BM / kFrag;  // sub-tiles along M
  static constexpr int SUBS = ROWS * (Cfg::BN / kFrag);
  static constexpr int WARPS = Cfg::THREADS / 32;
  static constexpr int PER_WARP = SUBS / WARPS;
  static constexpr int LDC = Cfg::BN + 4;
  static_assert(Cfg::BK == kFrag && Cfg::BM % kFrag == 0 && Cfg::BN % kFrag == 0, "WMMA tiles are 16x16x16");
  static_assert(Cfg::THREADS % 32 == 0 && SUBS % WARPS == 0 && PER_WARP >= 1, "sub-tiles must split over warps");
  static_assert(Cfg::LDA % 8 == 0 && Cfg::LDB % 8 == 0 && LDC % 4 == 0, "WMMA row strides");
};

// Top-left corner (r0, c0) of the `which`-th sub-tile of warp `warp`.
template <class Cfg>
GK_HD void tc_subtile(int warp, int which, int& r0, int& c0) {
  const int sub = warp * TcLayout<Cfg>::PER_WARP + which;
  r0 = (sub % TcLayout<Cfg>::ROWS) * kFrag;
  c0 = (sub / TcLayout<Cfg>::ROWS) * kFrag;
}

// Thread `tid`'s outputs in store_tile's layout, read from the shared accumulator tile.
template <class Cfg, typename acc_t>
GK_HD void gather_acc(const float* sC, acc_t (&acc)[Cfg::TM][Cfg::TN], int tid) {
  const int tm = tid % Cfg::RT, tn = tid / Cfg::RT;
  GK_UNROLL
  for (int i = 0; i < Cfg::TM; ++i)
    GK_UNROLL
    for (int j = 0; j < Cfg::TN; ++j)
      acc[i][j] = sC[(tm + i * Cfg::RT) * TcLayout<Cfg>::LDC + tn + j * Cfg::CT];
}

// ---------------------------------------------------------------------------------------------
// Direct path for small G (depthwise-like): one thread per output (or input-gradient) pixel, the
// block's weight column assembled once into shared memory.

// Forward: block (n, t) fills sW[c * khw + r] = W_eff[t, group(t) * G + c, r].
template <typename scalar_t, typename acc_t>
GK_HD void direct_forward_load_w(const SeriesTerms<scalar_t>& terms, const ConvGeom& s, int t, acc_t* sW, int tid,
                                 int nthreads) {
  const int khw = s.kh * s.kw, cin0 = (t / s.toG) * s.G;
  for (int e = tid; e < s.G * khw; e += nthreads)
    sW[e] = idx::effective_weight<acc_t>(terms, t, cin0 + e / khw, e % khw);
}

// Forward value of output pixel p of plane (n, t).
template <typename scalar_t, typename acc_t>
GK_HD acc_t direct_forward_pixel(const scalar_t* x, const ConvGeom& s, const acc_t* sW, int n, int t, int p) {
  const int oh = p / s.Wo, ow = p % s.Wo, cin0 = (t / s.toG) * s.G;
  acc_t v = acc_t(0);
  for (int c = 0; c < s.G; ++c) {
    const scalar_t* xp = x + (static_cast<int64_t>(n) * s.S + cin0 + c) * s.H * s.W;
    for (int i = 0; i < s.kh; ++i) {
      const int ih = idx::input_coord(oh, i, s.sh, s.ph, s.dh);
      if (ih < 0 || ih >= s.H) continue;
      for (int j = 0; j < s.kw; ++j) {
        const int iw = idx::input_coord(ow, j, s.sw, s.pw, s.dw);
        if (iw < 0 || iw >= s.W) continue;
        v += sW[(c * s.kh + i) * s.kw + j] * static_cast<acc_t>(xp[ih * s.W + iw]);
      }
    }
  }
  return v;
}

// Input gradient: block (n, cin) fills sW[tl * khw + r] = W_eff[group(cin) * toG + tl, cin, r].
template <typename scalar_t, typename acc_t>
GK_HD void direct_backward_input_load_w(const SeriesTerms<scalar_t>& terms, const ConvGeom& s, int cin, acc_t* sW,
                                        int tid, int nthreads) {
  const int khw = s.kh * s.kw, t0 = (cin / s.G) * s.toG;
  for (int e = tid; e < s.toG * khw; e += nthreads)
    sW[e] = idx::effective_weight<acc_t>(terms, t0 + e / khw, cin, e % khw);
}

// Input-gradient value of input pixel p of plane (n, cin).
template <typename scalar_t, typename acc_t>
GK_HD acc_t direct_backward_input_pixel(const scalar_t* gz, const ConvGeom& s, const acc_t* sW, int n, int cin,
                                        int p) {
  const int ih = p / s.W, iw = p % s.W, t0 = (cin / s.G) * s.toG;
  acc_t v = acc_t(0);
  for (int i = 0; i < s.kh; ++i) {
    const int oh = idx::output_coord(ih, i, s.sh, s.ph, s.dh, s.Ho);
    if (oh < 0) continue;
    for (int j = 0; j < s.kw; ++j) {
      const int ow = idx::output_coord(iw, j, s.sw, s.pw, s.dw, s.Wo);
      if (ow < 0) continue;
      const scalar_t* gp = gz + (static_cast<int64_t>(n) * s.T + t0) * s.Ho * s.Wo + oh * s.Wo + ow;
      for (int tl = 0; tl < s.toG; ++tl)
        v += sW[(tl * s.kh + i) * s.kw + j] * static_cast<acc_t>(gp[static_cast<int64_t>(tl) * s.Ho * s.Wo]);
    }
  }
  return v;
}

// Largest weight column (elements) the direct path keeps in shared memory.
constexpr int kDirectMaxW = 4096;

// Whether the direct path serves the forward / input-gradient pass: small groups, where a GEMM
// tile would be mostly padding, and a weight column that fits in shared memory.
GK_HD bool use_direct_forward(const ConvGeom& s) { return s.G <= 4 && s.G * s.kh * s.kw <= kDirectMaxW; }
GK_HD bool use_direct_backward_input(const ConvGeom& s) {
  return s.G <= 4 && s.toG * s.kh * s.kw <= kDirectMaxW;
}

}  // namespace gemm
}  // namespace gross
