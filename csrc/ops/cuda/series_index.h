// Index arithmetic shared by the CUDA kernels and their CPU tests (compiles with nvcc and g++).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GK_HD __host__ __device__ __forceinline__
// Fully unrolled fixed-trip loops keep per-thread accumulator arrays in registers.
#define GK_UNROLL _Pragma("unroll")
#else
#define GK_HD inline
#define GK_UNROLL
#endif

namespace gross {
namespace idx {

// ---------------------------------------------------------------------------------------------
// Convolution geometry along one spatial axis.

// Output length of a convolution; 0 when the (dilated) kernel does not fit the padded input.
GK_HD int conv_out_size(int in, int k, int stride, int pad, int dil) {
  const int span = in + 2 * pad - dil * (k - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;  // C division truncates toward zero: guard negatives
}

// Input coordinate read by output coordinate `o` at kernel tap `kk` (may fall in the padding).
GK_HD int input_coord(int o, int kk, int stride, int pad, int dil) {
  return o * stride - pad + kk * dil;
}

// The output coordinate that reads input `i` through tap `kk`, or -1 when there is none
// (the position falls between strided outputs or outside [0, out)).
GK_HD int output_coord(int i, int kk, int stride, int pad, int dil, int out) {
  const int num = i + pad - kk * dil;
  if (num < 0 || num % stride != 0) return -1;
  const int o = num / stride;
  return o < out ? o : -1;
}

// ---------------------------------------------------------------------------------------------
// The series' block-diagonal structure. With S input and T output channels, a term of group
// size g has S / g groups and T * g / S output channels per group.

// Output channels per group at group size g.
GK_HD int outs_per_group(int S, int T, int g) { return T / (S / g); }

// Where input channel `cin` sits inside output channel `t`'s group of a term with group size g
// (to = outs_per_group), or -1 when the term's weight is zero there (off its block diagonal).
GK_HD int term_in_offset(int t, int cin, int g, int to) {
  const int off = cin - (t / to) * g;
  return (off >= 0 && off < g) ? off : -1;
}

// Input channel (local to the active G-group of output channel t) that a term's local input
// channel `cl` maps to. Valid because each g_i divides G, so the term's group nests in t's G-group.
GK_HD int term_to_eff_channel(int t, int cl, int g, int to, int G, int toG) {
  return (t / to) * g + cl - (t / toG) * G;
}

// Maximum number of series terms a kernel accepts (the paper uses at most 4).
constexpr int kMaxTerms = 8;

// The active terms' weights, each (T, g_i, kh, kw) contiguous, passed by value to kernels.
template <typename scalar_t>
struct SeriesTerms {
  const scalar_t* w[kMaxTerms];
  int g[kMaxTerms];   // group size of each term
  int to[kMaxTerms];  // output channels per group of each term
  int n;              // number of active terms
  int khw;            // kh * kw
};

// Effective (summed) weight W_eff[t, cin, r] of the active terms at tap r (r = i * kw + j).
template <typename acc_t, typename scalar_t>
GK_HD acc_t effective_weight(const SeriesTerms<scalar_t>& s, int t, int cin, int r) {
  acc_t v = acc_t(0);
  for (int i = 0; i < s.n; ++i) {
    const int off = term_in_offset(t, cin, s.g[i], s.to[i]);
    if (off >= 0) v += static_cast<acc_t>(s.w[i][(static_cast<int64_t>(t) * s.g[i] + off) * s.khw + r]);
  }
  return v;
}

// Shapes of one series convolution at the active group size G (all NCHW, contiguous).
struct ConvGeom {
  int N, S, H, W;     // input
  int T, Ho, Wo;      // output
  int kh, kw, sh, sw, ph, pw, dh, dw;
  int G, groups, toG;  // active group size, S / G groups, T / groups outputs per group
};

// Fills the derived fields (output size, groups, outputs per group) from the raw shapes; the
// caller checks validity (positive output, S % G == 0, T % (S / G) == 0).
GK_HD ConvGeom make_geom(int N, int S, int H, int W, int T, int kh, int kw, int sh, int sw, int ph, int pw, int dh,
                         int dw, int G) {
  ConvGeom s{N, S, H, W, T, 0, 0, kh, kw, sh, sw, ph, pw, dh, dw, G, 0, 0};
  s.Ho = conv_out_size(H, kh, sh, ph, dh);
  s.Wo = conv_out_size(W, kw, sw, pw, dw);
  s.groups = S / G;
  s.toG = T / s.groups;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Work decomposition.

GK_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Split-K: the half-open range [begin, end) of the reduction dimension K handled by split `s`
// of `splits`, in chunks aligned to `bk` so tiles never straddle two splits.
struct KRange {
  int64_t begin, end;
};
GK_HD KRange split_range(int64_t K, int splits, int s, int bk) {
  const int64_t chunk = ceil_div(ceil_div(K, splits), bk) * bk;
  const int64_t b = chunk * s;
  const int64_t e = b + chunk;
  return KRange{b < K ? b : K, e < K ? e : K};
}

// Number of K-splits for the weight-gradient reduction: enough blocks to fill the GPU
// (about `target` blocks in all) while keeping at least `min_tiles` K-tiles per split.
GK_HD int choose_splits(int64_t blocks_mn, int64_t K, int bk, int64_t target = 512, int min_tiles = 8) {
  int64_t want = ceil_div(target, blocks_mn);
  const int64_t most = ceil_div(K, static_cast<int64_t>(bk) * min_tiles);
  if (want > most) want = most;
  if (want > 1024) want = 1024;
  return want < 1 ? 1 : static_cast<int>(want);
}

}  // namespace idx
}  // namespace gross
