// CPU test library for the CUDA kernels' index helpers and a thread-by-thread emulation of their block loops.
//
// Built with plain g++ by tests/test_cuda_index.py and loaded through ctypes. The emulation calls
// the very phase functions the kernels call (series_gemm.h, series_bottleneck.h), block by block
// and thread by thread with a barrier between phases, so the GPU's indexing runs here.
#include <cmath>
#include <cstdio>
#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "ops/cuda/series_bottleneck.h"
#include "ops/cuda/series_gemm.h"

using namespace gross;

namespace {

const float kNaN = std::numeric_limits<float>::quiet_NaN();

// ------------------------------------------------------------------------------------------------
// Brute-force checks of the helpers.

struct Failures {
  int count = 0;
  char* msg;
  int cap;
  void fail(const char* what, int a, int b, int c, int d) {
    if (count++ == 0) std::snprintf(msg, cap, "%s (%d, %d, %d, %d)", what, a, b, c, d);
  }
};

void check_geometry(Failures& f) {
  for (int in = 1; in <= 12; ++in)
    for (int k = 1; k <= 5; ++k)
      for (int st = 1; st <= 3; ++st)
        for (int pad = 0; pad <= 3; ++pad)
          for (int dil = 1; dil <= 3; ++dil) {
            // An output exists where its last tap stays inside the padded input.
            int brute = 0;
            while (brute * st - pad + (k - 1) * dil <= in - 1 + pad) ++brute;
            const int out = idx::conv_out_size(in, k, st, pad, dil);
            if ((out > 0 ? out : 0) != brute) f.fail("conv_out_size", in, k, st, pad * 10 + dil);
            for (int kk = 0; kk < k; ++kk)
              for (int i = 0; i < in; ++i) {
                int found = -1;
                for (int o = 0; o < brute; ++o)
                  if (idx::input_coord(o, kk, st, pad, dil) == i) found = o;
                if (idx::output_coord(i, kk, st, pad, dil, brute) != found) f.fail("output_coord", i, kk, st, pad);
              }
          }
}

void check_series(Failures& f) {
  // Every (S, T, g) with S % g == 0 and T % (S / g) == 0, against the dense block-diagonal mask:
  // (t, cin) is on term g's diagonal when cin's group (cin / g) equals t's group (t / to).
  for (int S = 1; S <= 24; ++S)
    for (int T = 1; T <= 24; ++T)
      for (int g = 1; g <= S; ++g) {
        if (S % g || T % (S / g)) continue;
        const int to = idx::outs_per_group(S, T, g);
        if (to * (S / g) != T) f.fail("outs_per_group", S, T, g, to);
        for (int t = 0; t < T; ++t)
          for (int cin = 0; cin < S; ++cin) {
            const int want = (cin / g == t / to) ? cin % g : -1;
            if (idx::term_in_offset(t, cin, g, to) != want) f.fail("term_in_offset", S, T, g, t * 100 + cin);
          }
        // Each larger valid G that g divides: the term's block maps inside t's G-block.
        for (int G = g; G <= S; G += g) {
          if (S % G || T % (S / G) || G % g) continue;
          const int toG = idx::outs_per_group(S, T, G);
          for (int t = 0; t < T; ++t)
            for (int cl = 0; cl < g; ++cl) {
              const int cin = (t / to) * g + cl;
              const int ce = idx::term_to_eff_channel(t, cl, g, to, G, toG);
              if (ce < 0 || ce >= G || ce != cin - (t / toG) * G) f.fail("term_to_eff_channel", S, T, g, G);
              if (idx::term_in_offset(t, cin, g, to) != cl) f.fail("term roundtrip", S, T, g, t);
            }
        }
      }
}

void check_splits(Failures& f) {
  for (int64_t K = 1; K <= 700; K += 7)
    for (int splits = 1; splits <= 12; ++splits)
      for (int bk : {1, 4, 16}) {
        int64_t next = 0;
        for (int s = 0; s < splits; ++s) {
          const idx::KRange r = idx::split_range(K, splits, s, bk);
          if (r.begin != next && r.begin != K) f.fail("split_range gap", int(K), splits, s, bk);
          if (r.begin % bk && r.begin != K) f.fail("split_range align", int(K), splits, s, bk);
          if (r.end < r.begin) f.fail("split_range order", int(K), splits, s, bk);
          if (r.end > r.begin) next = r.end;
        }
        if (next != K) f.fail("split_range cover", int(K), splits, bk, int(next));
      }
  for (int64_t mn = 1; mn <= 2000; mn *= 3)
    for (int64_t K = 1; K <= 1 << 22; K *= 5) {
      const int sp = idx::choose_splits(mn, K, 16);
      if (sp < 1 || sp > 1024 || (sp > 1 && sp > idx::ceil_div(K, 16 * 8))) f.fail("choose_splits", int(mn), int(K), sp, 0);
    }
}

void check_bottleneck_tiles(Failures& f) {
  for (int S : {1, 11, 64, 224, 512, 1400})
    for (int T : {1, 18, 100, 224, 512})
      for (int k = 1; k <= 5; k += 2)
        for (int st = 1; st <= 2; ++st)
          for (int dil = 1; dil <= 2; ++dil)
            for (int Ho : {1, 3, 17}) {
              const bneck::TileShape ts = bneck::choose_tile(S, T, k, k, st, st, dil, dil, Ho, Ho + 2);
              const bool fit = bneck::fits(S, T, k, k, st, st, dil, dil);
              if (fit != (ts.th > 0)) f.fail("fits vs choose_tile", S, T, k, st);
              if (ts.th == 0) continue;
              if (bneck::smem_bytes(S, T, ts) > bneck::kSmemLimit) f.fail("tile over smem", S, T, ts.th, ts.tw);
              if (ts.th > Ho || ts.tw > Ho + 2) f.fail("tile over output", S, T, ts.th, ts.tw);
              // Halo: from the first tap of the first pixel to the last tap of the last pixel.
              const int hh = idx::input_coord(ts.th - 1, k - 1, st, 0, dil) - idx::input_coord(0, 0, st, 0, dil) + 1;
              if (ts.hh != hh) f.fail("halo", S, T, ts.hh, hh);
            }
}

// ------------------------------------------------------------------------------------------------
// Emulation of the kernels' block loops (float32, as the kernels accumulate).

idx::SeriesTerms<float> terms_of(const float* const* cores, const int* gs, int nterms, const idx::ConvGeom& s) {
  idx::SeriesTerms<float> t{};
  t.n = nterms;
  t.khw = s.kh * s.kw;
  for (int i = 0; i < nterms; ++i) {
    t.w[i] = cores[i];
    t.g[i] = gs[i];
    t.to[i] = idx::outs_per_group(s.S, s.T, gs[i]);
  }
  return t;
}

idx::ConvGeom geom_of(const int* g) {
  return idx::make_geom(g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], g[12], g[13]);
}

// Every block of the launch grid (M tiles, N tiles, groups * splits), in turn: calls
// block(g, split, m0, n0, kr) with the block's group, K split, tile origin and K range.
template <class Cfg, class P, class Block>
void for_each_block(const P& p, int groups, int splits, Block block) {
  const int64_t mt = idx::ceil_div(p.M(), Cfg::BM), nt = idx::ceil_div(p.Ncol(), Cfg::BN);
  for (int z = 0; z < groups * splits; ++z)
    for (int64_t bx = 0; bx < mt; ++bx)
      for (int64_t by = 0; by < nt; ++by) {
        const int g = z % groups, split = z / groups;
        block(g, split, bx * Cfg::BM, static_cast<int>(by) * Cfg::BN,
              idx::split_range(p.K(), splits, split, Cfg::BK));
      }
}

// THREADS threads per block, phases separated by barriers. Shared tiles are poisoned with NaN
// before every load so an entry the load phase skips shows up.
template <class Cfg, class P>
void emulate_gemm(const P& p, int groups, int splits) {
  std::vector<float> sA(Cfg::SMEM_A), sB(Cfg::SMEM_B);
  std::unique_ptr<float[][Cfg::TM][Cfg::TN]> acc(new float[Cfg::THREADS][Cfg::TM][Cfg::TN]);
  for_each_block<Cfg>(p, groups, splits, [&](int g, int split, int64_t m0, int n0, idx::KRange kr) {
    std::memset(acc.get(), 0, sizeof(float) * Cfg::THREADS * Cfg::TM * Cfg::TN);
    for (int64_t k0 = kr.begin; k0 < kr.end; k0 += Cfg::BK) {
      for (int i = 0; i < Cfg::BK; ++i) {
        for (int j = 0; j < Cfg::BM; ++j) sA[i * Cfg::LDA + j] = kNaN;
        for (int j = 0; j < Cfg::BN; ++j) sB[i * Cfg::LDB + j] = kNaN;
      }
      for (int tid = 0; tid < Cfg::THREADS; ++tid)
        gemm::load_tiles<Cfg>(p, sA.data(), sB.data(), tid, g, m0, n0, k0, kr.end);
      for (int tid = 0; tid < Cfg::THREADS; ++tid) gemm::mma_tile<Cfg>(sA.data(), sB.data(), acc[tid], tid);
    }
    for (int tid = 0; tid < Cfg::THREADS; ++tid) gemm::store_tile<Cfg>(p, acc[tid], tid, g, split, m0, n0);
  });
}

// The tensor-core block: the same load / gather / store phases, with each warp's WMMA products
// emulated by their definition (A column-major at sA + r0 with stride LDA, B row-major at sB + c0
// with stride LDB, accumulators stored row-major into sC + r0 * LDC + c0 with stride LDC).
template <class Cfg, class P>
void emulate_gemm_tc(const P& p, int groups, int splits) {
  using L = gemm::TcLayout<Cfg>;
  constexpr int F = gemm::kFrag;
  std::vector<float> sA(Cfg::SMEM_A), sB(Cfg::SMEM_B), sC(Cfg::BM * L::LDC);
  std::vector<float> frag(L::WARPS * L::PER_WARP * F * F);
  for_each_block<Cfg>(p, groups, splits, [&](int g, int split, int64_t m0, int n0, idx::KRange kr) {
    std::fill(frag.begin(), frag.end(), 0.0f);
    for (int64_t k0 = kr.begin; k0 < kr.end; k0 += Cfg::BK) {
      std::fill(sA.begin(), sA.end(), kNaN);
      std::fill(sB.begin(), sB.end(), kNaN);
      for (int tid = 0; tid < Cfg::THREADS; ++tid)
        gemm::load_tiles<Cfg>(p, sA.data(), sB.data(), tid, g, m0, n0, k0, kr.end);
      for (int warp = 0; warp < L::WARPS; ++warp)
        for (int w = 0; w < L::PER_WARP; ++w) {
          int r0, c0;
          gemm::tc_subtile<Cfg>(warp, w, r0, c0);
          float* c = frag.data() + (warp * L::PER_WARP + w) * F * F;
          for (int r = 0; r < F; ++r)
            for (int cc = 0; cc < F; ++cc)
              for (int k = 0; k < F; ++k)
                c[r * F + cc] += sA[r0 + r + k * Cfg::LDA] * sB[c0 + k * Cfg::LDB + cc];
        }
    }
    std::fill(sC.begin(), sC.end(), kNaN);
    for (int warp = 0; warp < L::WARPS; ++warp)
      for (int w = 0; w < L::PER_WARP; ++w) {
        int r0, c0;
        gemm::tc_subtile<Cfg>(warp, w, r0, c0);
        const float* c = frag.data() + (warp * L::PER_WARP + w) * F * F;
        for (int r = 0; r < F; ++r)
          for (int cc = 0; cc < F; ++cc) sC[(r0 + r) * L::LDC + c0 + cc] = c[r * F + cc];
      }
    for (int tid = 0; tid < Cfg::THREADS; ++tid) {
      float acc[Cfg::TM][Cfg::TN];
      gemm::gather_acc<Cfg>(sC.data(), acc, tid);
      gemm::store_tile<Cfg>(p, acc, tid, g, split, m0, n0);
    }
  });
}

// Variant: 0 = direct path, 1/2/3 = GEMM with TileN16/32/64, 4/5/6 = tensor-core TcN16/32/64.
template <class P>
int run_gemm_variant(const P& p, int groups, int variant) {
  switch (variant) {
    case 1: emulate_gemm<gemm::TileN16>(p, groups, 1); return 0;
    case 2: emulate_gemm<gemm::TileN32>(p, groups, 1); return 0;
    case 3: emulate_gemm<gemm::TileN64>(p, groups, 1); return 0;
    case 4: emulate_gemm_tc<gemm::TcN16>(p, groups, 1); return 0;
    case 5: emulate_gemm_tc<gemm::TcN32>(p, groups, 1); return 0;
    case 6: emulate_gemm_tc<gemm::TcN64>(p, groups, 1); return 0;
    default: return 1;
  }
}

}  // namespace

extern "C" {

// Runs every brute-force check; returns the number of failures and the first one in msg.
int gk_check_index(char* msg, int cap) {
  Failures f;
  f.msg = msg;
  f.cap = cap;
  msg[0] = '\0';
  check_geometry(f);
  check_series(f);
  check_splits(f);
  check_bottleneck_tiles(f);
  return f.count;
}

// The fused bottleneck's fit rule, for comparison with the registered op.
int gk_bottleneck_fits(int S, int T, int kh, int kw, int sh, int sw, int dh, int dw) {
  return bneck::fits(S, T, kh, kw, sh, sw, dh, dw) ? 1 : 0;
}

// geom: N, S, H, W, T, kh, kw, sh, sw, ph, pw, dh, dw, G. cores: the active terms only.
int gk_emulate_forward(const float* x, const float* const* cores, const int* gs, int nterms, const int* geom,
                       int variant, float* out) {
  const idx::ConvGeom s = geom_of(geom);
  const auto terms = terms_of(cores, gs, nterms, s);
  if (variant == 0) {
    const int nthreads = 64;  // any block size: the loops stride by it
    std::vector<float> sW(s.G * s.kh * s.kw, kNaN);
    for (int n = 0; n < s.N; ++n)
      for (int t = 0; t < s.T; ++t) {
        for (int tid = 0; tid < nthreads; ++tid) gemm::direct_forward_load_w(terms, s, t, sW.data(), tid, nthreads);
        for (int p = 0; p < s.Ho * s.Wo; ++p)
          out[(static_cast<int64_t>(n) * s.T + t) * s.Ho * s.Wo + p] = gemm::direct_forward_pixel(x, s, sW.data(), n, t, p);
      }
    return 0;
  }
  const gemm::ForwardProblem<float, float> p{x, out, terms, s};
  return run_gemm_variant(p, s.groups, variant);
}

int gk_emulate_backward_input(const float* gz, const float* const* cores, const int* gs, int nterms, const int* geom,
                              int variant, float* gx) {
  const idx::ConvGeom s = geom_of(geom);
  const auto terms = terms_of(cores, gs, nterms, s);
  if (variant == 0) {
    const int nthreads = 64;
    std::vector<float> sW(s.toG * s.kh * s.kw, kNaN);
    for (int n = 0; n < s.N; ++n)
      for (int cin = 0; cin < s.S; ++cin) {
        for (int tid = 0; tid < nthreads; ++tid)
          gemm::direct_backward_input_load_w(terms, s, cin, sW.data(), tid, nthreads);
        for (int p = 0; p < s.H * s.W; ++p)
          gx[(static_cast<int64_t>(n) * s.S + cin) * s.H * s.W + p] =
              gemm::direct_backward_input_pixel(gz, s, sW.data(), n, cin, p);
      }
    return 0;
  }
  const gemm::BackwardInputProblem<float, float> p{gz, gx, terms, s};
  return run_gemm_variant(p, s.groups, variant);
}

// variant 0 = TileW16, 1 = TileW64, 2 = TcW16, 3 = TcW64; splits <= 0 picks them as the launcher does. grads[i] is
// term i's gradient (T, gs[i], kh, kw). Returns the number of splits used.
int gk_emulate_backward_weight(const float* gz, const float* x, const int* gs, int nterms, const int* geom, int variant,
                               int splits, float* const* grads) {
  const idx::ConvGeom s = geom_of(geom);
  gemm::BackwardWeightProblem<float, float> p{gz, x, nullptr, s};
  if (splits <= 0)
    splits = variant % 2 == 0 ? gemm::weight_splits<gemm::TileW16>(p) : gemm::weight_splits<gemm::TileW64>(p);
  std::vector<float> ws(static_cast<size_t>(splits) * s.T * s.G * s.kh * s.kw, kNaN);
  p.ws = ws.data();
  switch (variant) {
    case 0: emulate_gemm<gemm::TileW16>(p, s.groups, splits); break;
    case 1: emulate_gemm<gemm::TileW64>(p, s.groups, splits); break;
    case 2: emulate_gemm_tc<gemm::TcW16>(p, s.groups, splits); break;
    default: emulate_gemm_tc<gemm::TcW64>(p, s.groups, splits); break;
  }
  for (int i = 0; i < nterms; ++i) {
    const int to = idx::outs_per_group(s.S, s.T, gs[i]);
    const int64_t numel = static_cast<int64_t>(s.T) * gs[i] * s.kh * s.kw;
    for (int64_t e = 0; e < numel; ++e) grads[i][e] = gemm::term_weight_grad(ws.data(), splits, s, gs[i], to, e);
  }
  return splits;
}

// geom describes the core (S = A's rows); th/tw force a tile (0 = choose as the launcher does).
// Returns 1 when the shape does not fit.
int gk_emulate_bottleneck(const float* x, const float* A, const float* const* cores, const int* gs, int nterms,
                          const float* C, const float* bias, const int* geom, int Cin, int Cout, int th, int tw,
                          float* y) {
  bneck::Args<float> a{};
  a.s = geom_of(geom);
  const idx::ConvGeom& s = a.s;
  a.x = x;
  a.A = A;
  a.terms = terms_of(cores, gs, nterms, s);
  a.C = C;
  a.bias = bias;
  a.y = y;
  a.Cin = Cin;
  a.Cout = Cout;
  a.ts = th > 0 ? bneck::tile_shape(th, tw, s.kh, s.kw, s.sh, s.sw, s.dh, s.dw)
                : bneck::choose_tile(s.S, s.T, s.kh, s.kw, s.sh, s.sw, s.dh, s.dw, s.Ho, s.Wo);
  if (a.ts.th == 0) return 1;
  a.tiles_w = static_cast<int>(idx::ceil_div(s.Wo, a.ts.tw));
  const int tiles = static_cast<int>(idx::ceil_div(s.Ho, a.ts.th)) * a.tiles_w;
  const int nthreads = 96;
  std::vector<float> u(static_cast<size_t>(s.S) * a.ts.hh * a.ts.hw), z(static_cast<size_t>(s.T) * a.ts.th * a.ts.tw);
  for (int n = 0; n < s.N; ++n)
    for (int tile = 0; tile < tiles; ++tile) {
      std::fill(u.begin(), u.end(), kNaN);
      std::fill(z.begin(), z.end(), kNaN);
      for (int tid = 0; tid < nthreads; ++tid) bneck::stage_u(a, u.data(), n, tile, tid, nthreads);
      for (int tid = 0; tid < nthreads; ++tid) bneck::stage_z(a, u.data(), z.data(), tile, tid, nthreads);
      for (int tid = 0; tid < nthreads; ++tid) bneck::stage_y(a, z.data(), n, tile, tid, nthreads);
    }
  return 0;
}

}  // extern "C"
