// 2-D convolution, NHWC input / HWIO kernel, float32, as an XLA FFI handler
// for the CPU backend (x86-64 with AVX2 + FMA; AVX-512 tiles when asked for).
//
//   y[n, oh, ow, co] = sum_{kh, kw, ci} xpad[n, oh*sh + kh, ow*sw + kw, ci] * w[kh, kw, ci, co]
// where xpad is x with `pt` zero rows on top and `pl` zero columns on the left
// (and as many at the bottom/right as the output shape implies).
//
// dropjax uses it for forward convolutions and, with the kernel flipped and
// its channel axes swapped, for input gradients (dropjax/conv.py).  It beats
// XLA:CPU's convolution for the CIFAR ResNet shapes on AVX2 machines, most of
// all for few input channels (benchmarks/README.md).
//
// How: each thread takes whole images.  An image is copied once into a
// zero-padded buffer (no bounds checks in the inner loop), the kernel is
// packed into blocks of 16 output channels, and a 6 x 16 tile of outputs (six
// consecutive positions in the flattened (oh, ow) order, so a tile may wrap
// to the next row) is accumulated in 12 AVX registers over (kh, ci, kw) -- in
// that order, input channel before kernel column, so that a row tile can
// share an input value among the kernel columns (below).  Every output value
// is one sum in a fixed order: results do not depend on the thread count or
// the schedule.
//
// With the attribute isa = 512 (an error on a CPU without AVX-512F)
// the tiles are 12 positions x 16 channels (one zmm register each) or, where
// two blocks of 16 channels are left, 8 positions x 32 channels.  Each output
// is still the same chain of fused multiply-adds over (kh, ci, kw) in the
// same order, so both instruction sets give bit-identical results.  For the
// CIFAR ResNets' shapes (3, 16, 32 or 64 input channels, stride 1 or 2, output
// rows a multiple of the tile) an AVX-512 tile covers part of one output row
// (16 positions x 16 channels or 8 x 32) with the input channels and stride
// compiled in: every broadcast operand is then at a constant displacement from
// one pointer (an indexed memory operand costs the multiply-add an extra
// micro-op on Intel cores), the same sums in the same order.  A 16-channel
// row tile of a stride-1 kernel 3 wide broadcasts each input value once for
// the three kernel columns it meets (up to three multiply-adds per broadcast
// instead of one; the 16-channel stage of a CIFAR ResNet, ~2x faster on an
// Ice Lake Xeon), still the same chain per output.
//
// The fused form (target dropjax_conv_forward_fused) applies an epilogue to
// each tile as it stores it -- the batch-norm affine map of inference, a
// residual and a ReLU:
//   y = max(conv * scale[co] + shift[co] + res[n, oh, ow, co], 0)
// (residual and ReLU optional), so the activation is written once instead of
// being read and written again by a separate elementwise pass.  Both tile
// kinds apply the same operations in the same order (one FMA, one add, one
// max): bit-identical again.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "work_queue.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 6;    // output positions per tile
constexpr int kBlock = 16;  // output channels per tile (two ymm registers)

struct Geometry {
  int64_t n, h, w, ci, ho, wo, co, kh, kw, sh, sw, pt, pl, hp, wp;
};

// What a tile does to its sums before it stores them (see the top).
struct Epilogue {
  const float* scale = nullptr;  // (blocks * 16) per output channel, zero past co;
  const float* shift = nullptr;  // nullptr: the sums are stored as they are
  const float* res = nullptr;    // this image's residual (ho, wo, co), or nullptr
  bool relu = false;
};

// One output position's update: its input value at j times the 16 kernel
// values (b0, b1) into its two accumulators.
#define DROPJAX_ROW(xp, lo, hi)                   \
  do {                                            \
    const __m256 a = _mm256_broadcast_ss(xp + j); \
    lo = _mm256_fmadd_ps(a, b0, lo);              \
    hi = _mm256_fmadd_ps(a, b1, hi);              \
  } while (0)

// The epilogue on one position's 16 sums (lo, hi) of output channels co0 ..
// co0 + valid - 1; `at` is their offset in the image's output (and residual).
inline void Finish(const Epilogue& e, int64_t co0, int64_t at, int64_t valid, __m256& lo,
                   __m256& hi) {
  lo = _mm256_fmadd_ps(lo, _mm256_loadu_ps(e.scale + co0), _mm256_loadu_ps(e.shift + co0));
  hi = _mm256_fmadd_ps(hi, _mm256_loadu_ps(e.scale + co0 + 8),
                       _mm256_loadu_ps(e.shift + co0 + 8));
  if (e.res != nullptr && valid == kBlock) {
    lo = _mm256_add_ps(lo, _mm256_loadu_ps(e.res + at));
    hi = _mm256_add_ps(hi, _mm256_loadu_ps(e.res + at + 8));
  } else if (e.res != nullptr) {
    alignas(32) float r[kBlock] = {};
    std::memcpy(r, e.res + at, valid * sizeof(float));
    lo = _mm256_add_ps(lo, _mm256_load_ps(r));
    hi = _mm256_add_ps(hi, _mm256_load_ps(r + 8));
  }
  if (e.relu) {
    lo = _mm256_max_ps(lo, _mm256_setzero_ps());
    hi = _mm256_max_ps(hi, _mm256_setzero_ps());
  }
}

// Accumulates one 6 x 16 tile.  `pos` are the tile's flattened output
// positions (a short image repeats its last one: same sums, same values);
// `wpk` is the packed kernel block (kh, ci, kw, 16).  The twelve
// accumulators are named variables: GCC keeps an accumulator *array* in memory
// (a store after every FMA), which halves the speed.
template <int KW>  // the kernel width compiled in, or 0: g.kw
inline void Tile(const Geometry& g, const Epilogue& e, const float* pad, const float* wpk,
                 const int64_t* pos, float* out, int64_t co0) {
  const int64_t ci = g.ci, kw = KW > 0 ? KW : g.kw, row = g.wp * ci;
  const float* x[kTile];
  for (int p = 0; p < kTile; ++p)
    x[p] = pad + ((pos[p] / g.wo) * g.sh * g.wp + (pos[p] % g.wo) * g.sw) * ci;
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3], *x4 = x[4], *x5 = x[5];
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float* wr = wpk;
  for (int64_t kh = 0; kh < g.kh; ++kh)
    for (int64_t c = kh * row; c < kh * row + ci; ++c)
      for (int64_t k = 0, j = c; k < kw; ++k, j += ci, wr += kBlock) {
        const __m256 b0 = _mm256_loadu_ps(wr), b1 = _mm256_loadu_ps(wr + 8);
        DROPJAX_ROW(x0, c00, c01);
        DROPJAX_ROW(x1, c10, c11);
        DROPJAX_ROW(x2, c20, c21);
        DROPJAX_ROW(x3, c30, c31);
        DROPJAX_ROW(x4, c40, c41);
        DROPJAX_ROW(x5, c50, c51);
      }
  __m256 acc[kTile][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                          {c30, c31}, {c40, c41}, {c50, c51}};
  const int64_t valid = std::min<int64_t>(kBlock, g.co - co0);
  for (int p = 0; p < kTile; ++p) {
    float* o = out + pos[p] * g.co + co0;
    if (e.scale != nullptr) Finish(e, co0, pos[p] * g.co + co0, valid, acc[p][0], acc[p][1]);
    if (valid == kBlock) {
      _mm256_storeu_ps(o, acc[p][0]);
      _mm256_storeu_ps(o + 8, acc[p][1]);
    } else {  // last, partial block of output channels
      alignas(32) float tmp[kBlock];
      _mm256_store_ps(tmp, acc[p][0]);
      _mm256_store_ps(tmp + 8, acc[p][1]);
      std::memcpy(o, tmp, valid * sizeof(float));
    }
  }
}
#undef DROPJAX_ROW

// The tile positions starting at `start` (see Image).
inline void TilePositions(int64_t start, int64_t npos, int tile, int64_t* pos) {
  const int64_t first = std::max<int64_t>(0, std::min<int64_t>(start, npos - tile));
  for (int p = 0; p < tile; ++p) pos[p] = std::min(first + p, npos - 1);
}

// The image copied into the zero-padded buffer every window reads.
// `pad` is zeroed once, when allocated: every image writes the same interior
// region, so the border stays zero and is never cleared again.
inline void CopyPadded(const Geometry& g, const float* x, float* pad) {
  const int64_t cols = std::min(g.w, g.wp - g.pl);  // input columns some window reads
  for (int64_t r = 0; cols > 0 && r < g.h && r + g.pt < g.hp; ++r)
    std::memcpy(pad + ((r + g.pt) * g.wp + g.pl) * g.ci, x + r * g.w * g.ci,
                cols * g.ci * sizeof(float));
}

void Image(const Geometry& g, const Epilogue& e, const float* x, const float* packed, float* y,
           float* pad) {
  CopyPadded(g, x, pad);
  const int64_t npos = g.ho * g.wo;
  const int64_t block = g.kh * g.kw * g.ci * kBlock;
  for (int64_t co0 = 0; co0 < g.co; co0 += kBlock) {
    const float* wpk = packed + co0 / kBlock * block;
    for (int64_t start = 0; start < npos; start += kTile) {
      // The last tile is shifted back to end at npos (it overlaps the one
      // before, recomputing identical values); an image with fewer than six
      // positions repeats its last position.
      int64_t pos[kTile];
      TilePositions(start, npos, kTile, pos);
      if (g.kw == 3) {
        Tile<3>(g, e, pad, wpk, pos, y, co0);
      } else {
        Tile<0>(g, e, pad, wpk, pos, y, co0);
      }
    }
  }
}

// ---- AVX-512 tiles ---------------------------------------------------------
// Compiled for AVX-512F by the target attribute only (the library is built
// for AVX2): called only when the caller asked for isa = 512.
#define DROPJAX_AVX512 __attribute__((target("avx512f")))

// Input pointers of a tile's positions (see Tile).
#define DROPJAX_POINTERS(n)                                                      \
  const float* x[n];                                                             \
  for (int p = 0; p < n; ++p)                                                    \
    x[p] = pad + ((pos[p] / g.wo) * g.sh * g.wp + (pos[p] % g.wo) * g.sw) * ci;

// One position's update by the broadcast input value at j.
#define DROPJAX_Z1(xp, c) c = _mm512_fmadd_ps(_mm512_set1_ps(xp[j]), b0, c)
#define DROPJAX_Z2(xp, lo, hi)                   \
  do {                                           \
    const __m512 a = _mm512_set1_ps(xp[j]);      \
    lo = _mm512_fmadd_ps(a, b0, lo);             \
    hi = _mm512_fmadd_ps(a, b1, hi);             \
  } while (0)

// Stores one position's 16 sums, after the epilogue (the same operations as
// Finish, so the same values).
DROPJAX_AVX512 inline void Store512(const Geometry& g, const Epilogue& e, float* out,
                                    const int64_t* pos, int p, int64_t co0, __m512 v) {
  const int64_t at = pos[p] * g.co + co0;
  const int64_t valid = std::min<int64_t>(kBlock, g.co - co0);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
  if (e.scale != nullptr) {
    v = _mm512_fmadd_ps(v, _mm512_loadu_ps(e.scale + co0), _mm512_loadu_ps(e.shift + co0));
    if (e.res != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, e.res + at));
    if (e.relu) v = _mm512_max_ps(v, _mm512_setzero_ps());
  }
  if (valid == kBlock) {
    _mm512_storeu_ps(out + at, v);
  } else {
    _mm512_mask_storeu_ps(out + at, mask, v);
  }
}

constexpr int kRowTaps = 3;  // kernel width whose taps a 16-channel row tile shares
constexpr int kTileZ1 = 12;  // positions of a 16-channel AVX-512 tile
constexpr int kTileZ2 = 8;   // positions of a 32-channel AVX-512 tile

// 12 positions x 16 channels, accumulated in 12 zmm registers.
template <int KW>  // as Tile's
DROPJAX_AVX512 inline void TileZ1(const Geometry& g, const Epilogue& e, const float* pad,
                                  const float* wpk,
                                  const int64_t* pos, float* out, int64_t co0) {
  const int64_t ci = g.ci, kw = KW > 0 ? KW : g.kw, row = g.wp * ci;
  DROPJAX_POINTERS(kTileZ1)
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3], *x4 = x[4], *x5 = x[5],
              *x6 = x[6], *x7 = x[7], *x8 = x[8], *x9 = x[9], *x10 = x[10], *x11 = x[11];
  __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0,
         c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
  const float* wr = wpk;
  for (int64_t kh = 0; kh < g.kh; ++kh)
    for (int64_t c = kh * row; c < kh * row + ci; ++c)
      for (int64_t k = 0, j = c; k < kw; ++k, j += ci, wr += kBlock) {
        const __m512 b0 = _mm512_loadu_ps(wr);
        DROPJAX_Z1(x0, c0); DROPJAX_Z1(x1, c1); DROPJAX_Z1(x2, c2); DROPJAX_Z1(x3, c3);
        DROPJAX_Z1(x4, c4); DROPJAX_Z1(x5, c5); DROPJAX_Z1(x6, c6); DROPJAX_Z1(x7, c7);
        DROPJAX_Z1(x8, c8); DROPJAX_Z1(x9, c9); DROPJAX_Z1(x10, c10); DROPJAX_Z1(x11, c11);
      }
  const __m512 acc[kTileZ1] = {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11};
  for (int p = 0; p < kTileZ1; ++p) Store512(g, e, out, pos, p, co0, acc[p]);
}

// 8 positions x 32 channels (the packed blocks at co0 and co0 + 16), in 16
// zmm registers: two weight loads serve 16 multiply-adds.
template <int KW>  // as Tile's
DROPJAX_AVX512 inline void TileZ2(const Geometry& g, const Epilogue& e, const float* pad,
                                  const float* wpk_lo,
                                  const float* wpk_hi, const int64_t* pos, float* out,
                                  int64_t co0) {
  const int64_t ci = g.ci, kw = KW > 0 ? KW : g.kw, row = g.wp * ci;
  DROPJAX_POINTERS(kTileZ2)
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3], *x4 = x[4], *x5 = x[5],
              *x6 = x[6], *x7 = x[7];
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00,
         c61 = c00, c70 = c00, c71 = c00;
  const float *wl = wpk_lo, *wh = wpk_hi;
  for (int64_t kh = 0; kh < g.kh; ++kh)
    for (int64_t c = kh * row; c < kh * row + ci; ++c)
      for (int64_t k = 0, j = c; k < kw; ++k, j += ci, wl += kBlock, wh += kBlock) {
        const __m512 b0 = _mm512_loadu_ps(wl), b1 = _mm512_loadu_ps(wh);
        DROPJAX_Z2(x0, c00, c01); DROPJAX_Z2(x1, c10, c11); DROPJAX_Z2(x2, c20, c21);
        DROPJAX_Z2(x3, c30, c31); DROPJAX_Z2(x4, c40, c41); DROPJAX_Z2(x5, c50, c51);
        DROPJAX_Z2(x6, c60, c61); DROPJAX_Z2(x7, c70, c71);
      }
  const __m512 lo[kTileZ2] = {c00, c10, c20, c30, c40, c50, c60, c70};
  const __m512 hi[kTileZ2] = {c01, c11, c21, c31, c41, c51, c61, c71};
  for (int p = 0; p < kTileZ2; ++p) {
    Store512(g, e, out, pos, p, co0, lo[p]);
    Store512(g, e, out, pos, p, co0 + kBlock, hi[p]);
  }
}
#undef DROPJAX_Z1
#undef DROPJAX_Z2
#undef DROPJAX_POINTERS

// P positions of one output row (ow0 .. ow0 + P - 1) x B blocks of 16 channels
// (the packed blocks at co0, co0 + 16, ...), the input's channel count CI and
// the column stride SW known at compile time: every position's input lies at a
// constant distance from one pointer, so each multiply-add reads its broadcast
// operand at base + displacement (no index register).  Each output is the same
// chain of FMAs as in TileZ1 / TileZ2.
template <int P, int B, int CI, int SW>
DROPJAX_AVX512 inline void TileRow(const Geometry& g, const Epilogue& e, const float* pad,
                                   const float* wpk, int64_t block, int64_t oh, int64_t ow0,
                                   float* out, int64_t co0) {
  constexpr int64_t step = SW * CI;
  const int64_t row = g.wp * CI;
  const float* base = pad + (oh * g.sh * g.wp + ow0 * SW) * CI;
  __m512 acc[B][P];
#pragma GCC unroll 32
  for (int b = 0; b < B; ++b)
#pragma GCC unroll 32
    for (int p = 0; p < P; ++p) acc[b][p] = _mm512_setzero_ps();
  const float* w = wpk;
  for (int64_t kh = 0; kh < g.kh; ++kh) {
    for (int c = 0; c < CI; ++c) {
      const float* xc = base + kh * row + c;
      if constexpr (SW == 1 && B == 1) {
        if (g.kw == kRowTaps) {
          // The three taps at once: input column q (q = p + kw) is broadcast once
          // for the outputs p = q - kw it feeds, each with its tap's kernel vector;
          // every output still sums kw = 0, 1, 2 in turn.
          const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + kBlock),
                       w2 = _mm512_loadu_ps(w + 2 * kBlock);
#pragma GCC unroll 40
          for (int q = 0; q < P + kRowTaps - 1; ++q) {
            const __m512 a = _mm512_set1_ps(xc[q * CI]);
            if (q < P) acc[0][q] = _mm512_fmadd_ps(a, w0, acc[0][q]);
            if (q >= 1 && q < P + 1) acc[0][q - 1] = _mm512_fmadd_ps(a, w1, acc[0][q - 1]);
            if (q >= 2) acc[0][q - 2] = _mm512_fmadd_ps(a, w2, acc[0][q - 2]);
          }
          w += kRowTaps * kBlock;
          continue;
        }
      }
      for (int64_t kw = 0; kw < g.kw; ++kw, w += kBlock) {
        const float* xj = xc + kw * CI;
        __m512 wv[B];
#pragma GCC unroll 4
        for (int b = 0; b < B; ++b) wv[b] = _mm512_loadu_ps(w + b * block);
#pragma GCC unroll 32
        for (int p = 0; p < P; ++p) {
          const __m512 a = _mm512_set1_ps(xj[p * step]);
#pragma GCC unroll 4
          for (int b = 0; b < B; ++b) acc[b][p] = _mm512_fmadd_ps(a, wv[b], acc[b][p]);
        }
      }
    }
  }
  int64_t pos[P];
  for (int p = 0; p < P; ++p) pos[p] = oh * g.wo + ow0 + p;
#pragma GCC unroll 32
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) Store512(g, e, out, pos, p, co0 + b * kBlock, acc[b][p]);
}

// The B blocks of 16 channels at co0 by row tiles where the shape has one
// (TileRow); returns false where it does not.
template <int P, int B, int CI, int SW>
DROPJAX_AVX512 inline bool RowTiles(const Geometry& g, const Epilogue& e, const float* pad,
                                    const float* wpk, int64_t block, float* y, int64_t co0) {
  if (g.ci != CI || g.sw != SW || g.wo % P != 0) return false;
  for (int64_t oh = 0; oh < g.ho; ++oh)
    for (int64_t ow0 = 0; ow0 < g.wo; ow0 += P)
      TileRow<P, B, CI, SW>(g, e, pad, wpk, block, oh, ow0, y, co0);
  return true;
}

// Image with AVX-512 tiles: pairs of 16-channel blocks, a last odd block
// alone; by row tiles for the CIFAR ResNets' shapes (input channels 3, 16, 32,
// 64; strides 1 and 2), else by TileZ2 / TileZ1.
DROPJAX_AVX512 void Image512(const Geometry& g, const Epilogue& e, const float* x,
                             const float* packed, float* y, float* pad) {
  CopyPadded(g, x, pad);
  const int64_t npos = g.ho * g.wo;
  const int64_t block = g.kh * g.kw * g.ci * kBlock;
  int64_t pos[kTileZ1];
  int64_t co0 = 0;
  for (; co0 + 2 * kBlock <= g.co; co0 += 2 * kBlock) {
    const float* wpk = packed + co0 / kBlock * block;
    if (RowTiles<8, 2, 32, 1>(g, e, pad, wpk, block, y, co0) ||
        RowTiles<8, 2, 64, 1>(g, e, pad, wpk, block, y, co0) ||
        RowTiles<8, 2, 16, 1>(g, e, pad, wpk, block, y, co0) ||
        RowTiles<8, 2, 16, 2>(g, e, pad, wpk, block, y, co0) ||
        RowTiles<8, 2, 32, 2>(g, e, pad, wpk, block, y, co0))
      continue;
    for (int64_t start = 0; start < npos; start += kTileZ2) {
      TilePositions(start, npos, kTileZ2, pos);
      if (g.kw == 3) {
        TileZ2<3>(g, e, pad, wpk, wpk + block, pos, y, co0);
      } else {
        TileZ2<0>(g, e, pad, wpk, wpk + block, pos, y, co0);
      }
    }
  }
  for (; co0 < g.co; co0 += kBlock) {
    const float* wpk = packed + co0 / kBlock * block;
    if (RowTiles<16, 1, 16, 1>(g, e, pad, wpk, block, y, co0) ||
        RowTiles<16, 1, 32, 1>(g, e, pad, wpk, block, y, co0) ||
        RowTiles<16, 1, 64, 1>(g, e, pad, wpk, block, y, co0) ||
        RowTiles<16, 1, 3, 1>(g, e, pad, wpk, block, y, co0))
      continue;
    for (int64_t start = 0; start < npos; start += kTileZ1) {
      TilePositions(start, npos, kTileZ1, pos);
      if (g.kw == 3) {
        TileZ1<3>(g, e, pad, wpk, pos, y, co0);
      } else {
        TileZ1<0>(g, e, pad, wpk, pos, y, co0);
      }
    }
  }
}
#undef DROPJAX_AVX512

}  // namespace

// The convolution with epilogue `e` (its res pointer: the whole residual,
// (n, ho, wo, co), or nullptr), shared by both targets.
static ffi::Error Convolve(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x,
                           ffi::Buffer<ffi::F32>& w, ffi::ResultBuffer<ffi::F32>& y, int64_t sh,
                           int64_t sw, int64_t pt, int64_t pl, int64_t isa, const Epilogue& e) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("conv_forward: operands must have rank 4");
  // The padded image covers every window: (ho - 1) * sh + kh rows, likewise columns.
  const Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], wd[0], wd[1], sh, sw,
                   pt, pl, (yd[1] - 1) * sh + wd[0], (yd[2] - 1) * sw + wd[1]};
  if (yd[0] != g.n || wd[2] != g.ci || wd[3] != g.co || pt < 0 || pl < 0 || sh < 1 || sw < 1)
    return ffi::Error::InvalidArgument("conv_forward: unsupported shapes");
  if (isa != 2 && isa != 512)
    return ffi::Error::InvalidArgument("conv_forward: isa must be 2 (AVX2) or 512 (AVX-512)");
  if (isa == 512 && !__builtin_cpu_supports("avx512f"))
    return ffi::Error::InvalidArgument("conv_forward: isa = 512 on a CPU without AVX-512F");
  if (g.n == 0 || g.ho == 0 || g.wo == 0 || g.co == 0) return ffi::Error::Success();

  // Kernel packed per block of 16 output channels, zero-padded past co, in the
  // order the tiles sum: (ceil(co / 16), kh, ci, kw, 16), contiguous per block.
  const int64_t blocks = (g.co + kBlock - 1) / kBlock, taps = g.kh * g.kw * g.ci;
  std::vector<float> packed(blocks * taps * kBlock, 0.f);
  const float* wp = w.typed_data();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t valid = std::min<int64_t>(kBlock, g.co - b * kBlock);
    for (int64_t kh = 0; kh < g.kh; ++kh)
      for (int64_t kw = 0; kw < g.kw; ++kw)
        for (int64_t c = 0; c < g.ci; ++c) {
          const int64_t hwio = (kh * g.kw + kw) * g.ci + c;  // w's tap (HWIO)
          const int64_t t = (kh * g.ci + c) * g.kw + kw;     // the tiles' order
          std::memcpy(&packed[(b * taps + t) * kBlock], wp + hwio * g.co + b * kBlock,
                      valid * sizeof(float));
        }
  }
  // The epilogue's scale and shift, zero-padded to whole blocks (full loads).
  std::vector<float> scale, shift;
  Epilogue image_e = e;
  if (e.scale != nullptr) {
    scale.assign(blocks * kBlock, 0.f);
    shift.assign(blocks * kBlock, 0.f);
    std::memcpy(scale.data(), e.scale, g.co * sizeof(float));
    std::memcpy(shift.data(), e.shift, g.co * sizeof(float));
    image_e.scale = scale.data();
    image_e.shift = shift.data();
  }
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const int64_t in_image = g.h * g.w * g.ci, out_image = g.ho * g.wo * g.co;
  auto work = [&](dropjax::WorkQueue& queue) {
    std::vector<float> pad(g.hp * g.wp * g.ci, 0.f);  // zero borders for every image
    Epilogue ie = image_e;
    for (int64_t i; (i = queue.Take()) >= 0;) {
      if (e.res != nullptr) ie.res = e.res + i * out_image;
      if (isa == 512) {
        Image512(g, ie, xp + i * in_image, packed.data(), yp + i * out_image, pad.data());
      } else {
        Image(g, ie, xp + i * in_image, packed.data(), yp + i * out_image, pad.data());
      }
    }
  };
  dropjax::RunOnPool(pool, g.n, pool.num_threads(), work);
  return ffi::Error::Success();
}

static ffi::Error ConvForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                                  int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                                  int64_t isa) {
  return Convolve(pool, x, w, y, sh, sw, pt, pl, isa, Epilogue{});
}

// y = max(conv(x, w) * scale + shift + res, 0): scale and shift (co,); res
// y's shape, or empty for none; the max only if relu = 1.
static ffi::Error ConvForwardFusedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                       ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> scale,
                                       ffi::Buffer<ffi::F32> shift, ffi::Buffer<ffi::F32> res,
                                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw,
                                       int64_t pt, int64_t pl, int64_t isa, int64_t relu) {
  const auto wd = w.dimensions();
  if (wd.size() != 4 || scale.element_count() != static_cast<size_t>(wd[3]) ||
      shift.element_count() != static_cast<size_t>(wd[3]))
    return ffi::Error::InvalidArgument("conv_forward_fused: scale and shift need one value "
                                       "per output channel");
  if (res.element_count() != 0 && res.element_count() != y->element_count())
    return ffi::Error::InvalidArgument("conv_forward_fused: the residual must have the "
                                       "output's shape (or be empty)");
  if (relu != 0 && relu != 1)
    return ffi::Error::InvalidArgument("conv_forward_fused: relu must be 0 or 1");
  Epilogue e;
  e.scale = scale.typed_data();
  e.shift = shift.typed_data();
  e.res = res.element_count() != 0 ? res.typed_data() : nullptr;
  e.relu = relu == 1;
  return Convolve(pool, x, w, y, sh, sw, pt, pl, isa, e);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DropjaxConvForward, ConvForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DropjaxConvForwardFused, ConvForwardFusedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("relu"));
