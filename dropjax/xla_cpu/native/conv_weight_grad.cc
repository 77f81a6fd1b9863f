// Weight gradient of a 2-D convolution, NHWC input / HWIO kernel, float32,
// as an XLA FFI handler for the CPU backend (x86-64 with AVX2 + FMA; AVX-512
// tiles when asked for).
//
//   dw[kh, kw, ci, co] = sum_{n, oh, ow} x[n, oh*sh + kh - ph, ow*sw + kw - pw, ci]
//                                        * dy[n, oh, ow, co]
// (terms whose input position lies in the zero padding are skipped).
//
// XLA:CPU has no direct kernel for this: it transposes both operands to
// channel-major layouts and runs a forward convolution.  This kernel reads
// the NHWC operands as they are: for every (kh, kw, block of 6 input
// channels, block of 16 output channels) it keeps a 6x16 tile of dw in 12
// AVX registers and streams over the output positions of a few rows of one
// image (a slice that stays in L1).  Images are split into a fixed number of
// partitions whose partial sums are added in a fixed order, so the result does
// not depend on thread scheduling (bit-for-bit reproducible runs).
//
// With the attribute isa = 512 (an error on a CPU without AVX-512F)
// the tiles are 8 input channels x 32 or 16 output channels in zmm registers
// (blocks of 8 left over, and 16-channel blocks of fewer than 4 input
// channels, keep the AVX2 tile).  A 16-channel block of a stride-1 kernel
// 3 wide (the 16-channel stage of a CIFAR ResNet) takes the three taps of a
// kernel row in one tile instead: each input value is broadcast once for the
// three taps, which read dy at three neighbouring positions, so a broadcast
// feeds three multiply-adds instead of one (the 16 -> 16 weight gradient
// ~1.6x faster on an Ice Lake Xeon; benchmarks/README.md).  Every dw value is still one chain of multiply-adds over the same
// windows in the same order, so both instruction sets give bit-identical
// results.
//
// Build: see dropjax/xla_cpu/native/__init__.py (compiled on first use with
// the system C++ compiler against the FFI headers shipped with jaxlib).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "work_queue.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunkBytes = 8192;  // dy bytes per sweep (with x: fits L1)
constexpr int kMaxChannelBlock = 6;    // 6 x 2 accumulators + 3 operands = 15 ymm
// AVX-512: 8 input channels per tile (8 x 2 accumulators + 3 operands of 32 zmm):
// a 16-channel tile then has 8 independent chains, as many as two FMA units
// with a latency of 4 need.
constexpr int kMaxChannelBlock512 = 8;

struct Geometry {
  int64_t n, h, w, ci, ho, wo, co, kh, kw, sh, sw, ph, pw;
};

// Output indices o in [0, out) whose input index o*s + k - p lies in [0, in).
inline void ValidRange(int64_t k, int64_t s, int64_t p, int64_t in, int64_t out,
                       int64_t* lo, int64_t* hi) {
  const int64_t first = p - k;
  *lo = first <= 0 ? 0 : (first + s - 1) / s;
  const int64_t last = in - 1 + p - k;
  *hi = std::min(last < 0 ? int64_t{-1} : last / s, out - 1);
}

struct Window {
  int64_t image, kh, kw, oh0, oh1, ow0, ow1;
};

// Tile<CB, V>: a (CB x 8*V) tile of dw in ymm registers (AVX2).
#define DROPJAX_TILE Tile
#define DROPJAX_TARGET
#define DROPJAX_VEC __m256
#define DROPJAX_LANES 8
#define DROPJAX_LOAD _mm256_loadu_ps
#define DROPJAX_STORE _mm256_storeu_ps
#define DROPJAX_SET1 _mm256_set1_ps
#define DROPJAX_FMADD _mm256_fmadd_ps
#include "weight_grad_tile.inc"  // undefines the DROPJAX_ parameters above

#define DROPJAX_AVX512 __attribute__((target("avx512f")))

// TileZ<CB, V>: a (CB x 16*V) tile of dw in zmm registers (AVX-512F).
#define DROPJAX_TILE TileZ
#define DROPJAX_TARGET DROPJAX_AVX512
#define DROPJAX_VEC __m512
#define DROPJAX_LANES 16
#define DROPJAX_LOAD _mm512_loadu_ps
#define DROPJAX_STORE _mm512_storeu_ps
#define DROPJAX_SET1 _mm512_set1_ps
#define DROPJAX_FMADD _mm512_fmadd_ps
#include "weight_grad_tile.inc"  // undefines the DROPJAX_ parameters above

template <int CB>
void ChannelBlock(const Geometry& g, const float* x, const float* dy, float* dw,
                  const Window& win, int64_t ci0) {
  int64_t co0 = 0;
  for (; co0 + 16 <= g.co; co0 += 16) Tile<CB, 2>(g, x, dy, dw, win, ci0, co0);
  for (; co0 + 8 <= g.co; co0 += 8) Tile<CB, 1>(g, x, dy, dw, win, ci0, co0);
}

// The tap tiles: the three taps kw = 0, 1, 2 of kernel row kh, stride 1, a block
// of 16 output channels.  Input column iw feeds tap kw at output column
// ow = iw + pw - kw; TapColumns are the input columns of a row where each tap
// is valid, and [all0, all1] where all three are.
constexpr int kTaps = 3;

struct TapColumns {
  int64_t first, last, all0, all1;  // input columns: any tap valid; all three valid
  int64_t lo[kTaps], hi[kTaps];     // input columns where tap kw is valid
};

inline TapColumns TapColumnsOf(const Geometry& g) {
  TapColumns t{g.w, -1, 0, g.w - 1, {}, {}};
  for (int kw = 0; kw < kTaps; ++kw) {
    int64_t ow0, ow1;
    ValidRange(kw, 1, g.pw, g.w, g.wo, &ow0, &ow1);
    t.lo[kw] = ow0 + kw - g.pw;
    t.hi[kw] = ow1 + kw - g.pw;
    t.all0 = std::max(t.all0, t.lo[kw]);
    t.all1 = std::min(t.all1, t.hi[kw]);
    if (ow0 <= ow1) {
      t.first = std::min(t.first, t.lo[kw]);
      t.last = std::max(t.last, t.hi[kw]);
    }
  }
  return t;
}

// One input column: x (CB channels) times dy of each tap Tk that is valid there.
template <int CB, bool T0, bool T1, bool T2>
DROPJAX_AVX512 __attribute__((always_inline)) inline void TapStep(
    __m512 (&acc)[kTaps][CB], const float* xp, const float* dyrow, int64_t ow_mid,
    int64_t co) {
  __m512 d0, d1, d2;  // dy at ow_mid + 1 - kw
  if constexpr (T0) d0 = _mm512_loadu_ps(dyrow + (ow_mid + 1) * co);
  if constexpr (T1) d1 = _mm512_loadu_ps(dyrow + ow_mid * co);
  if constexpr (T2) d2 = _mm512_loadu_ps(dyrow + (ow_mid - 1) * co);
  for (int c = 0; c < CB; ++c) {
    const __m512 b = _mm512_set1_ps(xp[c]);
    if constexpr (T0) acc[0][c] = _mm512_fmadd_ps(b, d0, acc[0][c]);
    if constexpr (T1) acc[1][c] = _mm512_fmadd_ps(b, d1, acc[1][c]);
    if constexpr (T2) acc[2][c] = _mm512_fmadd_ps(b, d2, acc[2][c]);
  }
}

// A (3 taps x CB x 16) tile of dw at (win.kh, ci0, co0) over the window's rows.
template <int CB>
DROPJAX_AVX512 void TapTile(const Geometry& g, const float* x, const float* dy, float* dw,
                            const Window& win, const TapColumns& t, int64_t ci0,
                            int64_t co0) {
  __m512 acc[kTaps][CB];
  float* out = dw + (win.kh * kTaps * g.ci + ci0) * g.co + co0;
  for (int k = 0; k < kTaps; ++k)
    for (int c = 0; c < CB; ++c) acc[k][c] = _mm512_loadu_ps(out + (k * g.ci + c) * g.co);
  for (int64_t oh = win.oh0; oh <= win.oh1; ++oh) {
    const int64_t ih = oh * g.sh + win.kh - g.ph;
    const float* xrow = x + ((win.image * g.h + ih) * g.w) * g.ci + ci0;
    const float* dyrow = dy + ((win.image * g.ho + oh) * g.wo) * g.co + co0;
    for (int64_t iw = t.first; iw <= t.last; ++iw) {
      const float* xp = xrow + iw * g.ci;
      const int64_t ow_mid = iw + g.pw - 1;
      if (iw == t.all0 && t.all0 <= t.all1) {  // where every tap is valid, in one run
        for (; iw <= t.all1; ++iw, xp += g.ci)
          TapStep<CB, true, true, true>(acc, xp, dyrow, iw + g.pw - 1, g.co);
        --iw;
        continue;
      }
      int mask = 0;
      for (int k = 0; k < kTaps; ++k) mask |= (t.lo[k] <= iw && iw <= t.hi[k]) << k;
      switch (mask) {
        case 1: TapStep<CB, true, false, false>(acc, xp, dyrow, ow_mid, g.co); break;
        case 2: TapStep<CB, false, true, false>(acc, xp, dyrow, ow_mid, g.co); break;
        case 3: TapStep<CB, true, true, false>(acc, xp, dyrow, ow_mid, g.co); break;
        case 4: TapStep<CB, false, false, true>(acc, xp, dyrow, ow_mid, g.co); break;
        case 5: TapStep<CB, true, false, true>(acc, xp, dyrow, ow_mid, g.co); break;
        case 6: TapStep<CB, false, true, true>(acc, xp, dyrow, ow_mid, g.co); break;
        case 7: TapStep<CB, true, true, true>(acc, xp, dyrow, ow_mid, g.co); break;
        default: break;
      }
    }
  }
  for (int k = 0; k < kTaps; ++k)
    for (int c = 0; c < CB; ++c) _mm512_storeu_ps(out + (k * g.ci + c) * g.co, acc[k][c]);
}

// Whether the 16-channel block at co = 32 * (co / 32) is the tap tiles'.
inline bool UsesTapTiles(const Geometry& g) {
  return g.sw == 1 && g.kw == kTaps && g.co % 32 >= 16;
}

template <int CB>
DROPJAX_AVX512 void ChannelBlock512(const Geometry& g, const float* x, const float* dy,
                                    float* dw, const Window& win, int64_t ci0) {
  int64_t co0 = 0;
  for (; co0 + 32 <= g.co; co0 += 32) TileZ<CB, 2>(g, x, dy, dw, win, ci0, co0);
  if (UsesTapTiles(g)) {
    co0 += 16;  // TapTile's
  } else if constexpr (CB >= 4) {
    // A 16-channel block: CB zmm accumulators; under 4 (the stem's 3 input
    // channels) too few chains to hide the FMA latency, where the AVX2 tile has 2 CB.
    for (; co0 + 16 <= g.co; co0 += 16) TileZ<CB, 1>(g, x, dy, dw, win, ci0, co0);
  } else {
    for (; co0 + 16 <= g.co; co0 += 16) Tile<CB, 2>(g, x, dy, dw, win, ci0, co0);
  }
  for (; co0 + 8 <= g.co; co0 += 8) Tile<CB, 1>(g, x, dy, dw, win, ci0, co0);
}
#undef DROPJAX_AVX512

// f(std::integral_constant<int, CB>(), ci0) for each block of kBlock input channels
// and a last, smaller one.
template <int kBlock, class F>
void ForChannelBlocks(int64_t ci, F&& f) {
  int64_t ci0 = 0;
  for (; ci0 + kBlock <= ci; ci0 += kBlock) f(std::integral_constant<int, kBlock>(), ci0);
  switch (ci - ci0) {
    case 7: f(std::integral_constant<int, 7>(), ci0); break;
    case 6: f(std::integral_constant<int, 6>(), ci0); break;
    case 5: f(std::integral_constant<int, 5>(), ci0); break;
    case 4: f(std::integral_constant<int, 4>(), ci0); break;
    case 3: f(std::integral_constant<int, 3>(), ci0); break;
    case 2: f(std::integral_constant<int, 2>(), ci0); break;
    case 1: f(std::integral_constant<int, 1>(), ci0); break;
    default: break;
  }
}

// One image's contribution to dw, in slices of rows; per slice and kernel row, the
// tiles of ChannelBlock (AVX2) or ChannelBlock512 and TapTile (AVX-512) over
// blocks of CB = 6 (AVX2) or 8 (AVX-512) input channels and a last, smaller one.
template <bool kAvx512>
void AccumulateImage(const Geometry& g, const float* x, const float* dy, float* dw,
                     int64_t image) {
  constexpr int kBlock = kAvx512 ? kMaxChannelBlock512 : kMaxChannelBlock;
  const bool tap_tiles = UsesTapTiles(g);
  const TapColumns taps = TapColumnsOf(g);
  const int64_t rows = std::max<int64_t>(1, kChunkBytes / (g.wo * g.co * 4));
  for (int64_t r0 = 0; r0 < g.ho; r0 += rows) {
    const int64_t r1 = std::min(g.ho, r0 + rows) - 1;
    for (int64_t kh = 0; kh < g.kh; ++kh) {
      Window win{image, kh, 0, 0, 0, 0, 0};
      ValidRange(kh, g.sh, g.ph, g.h, g.ho, &win.oh0, &win.oh1);
      win.oh0 = std::max(win.oh0, r0);
      win.oh1 = std::min(win.oh1, r1);
      if (win.oh0 > win.oh1) continue;
      for (int64_t kw = 0; kw < g.kw; ++kw) {
        win.kw = kw;
        ValidRange(kw, g.sw, g.pw, g.w, g.wo, &win.ow0, &win.ow1);
        if (win.ow0 > win.ow1) continue;
        ForChannelBlocks<kBlock>(g.ci, [&](auto cb, int64_t ci0) {
          if constexpr (kAvx512) {
            ChannelBlock512<decltype(cb)::value>(g, x, dy, dw, win, ci0);
          } else {
            ChannelBlock<decltype(cb)::value>(g, x, dy, dw, win, ci0);
          }
        });
      }
      if constexpr (kAvx512) {
        if (tap_tiles) {
          ForChannelBlocks<kBlock>(g.ci, [&](auto cb, int64_t ci0) {
            TapTile<decltype(cb)::value>(g, x, dy, dw, win, taps, ci0, g.co / 32 * 32);
          });
        }
      }
    }
  }
}

}  // namespace

static ffi::Error ConvWeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                     ffi::Buffer<ffi::F32> dy,
                                     ffi::ResultBuffer<ffi::F32> dw, int64_t sh,
                                     int64_t sw, int64_t ph, int64_t pw, int64_t isa) {
  const auto xd = x.dimensions(), dd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || dd.size() != 4 || wd.size() != 4)
    return ffi::Error::InvalidArgument("conv_weight_grad: operands must have rank 4");
  const Geometry g{xd[0], xd[1], xd[2], xd[3], dd[1], dd[2], dd[3],
                   wd[0], wd[1], sh,    sw,    ph,    pw};
  if (dd[0] != g.n || wd[2] != g.ci || wd[3] != g.co || g.co % 8 != 0 || sh < 1 || sw < 1)
    return ffi::Error::InvalidArgument("conv_weight_grad: unsupported shapes");
  if (isa != 2 && isa != 512)
    return ffi::Error::InvalidArgument("conv_weight_grad: isa must be 2 (AVX2) or 512 (AVX-512)");
  if (isa == 512 && !__builtin_cpu_supports("avx512f"))
    return ffi::Error::InvalidArgument("conv_weight_grad: isa = 512 on a CPU without AVX-512F");
  const int64_t wsize = g.kh * g.kw * g.ci * g.co;
  float* out = dw->typed_data();
  std::memset(out, 0, wsize * sizeof(float));
  if (g.n == 0 || g.ho == 0 || g.wo == 0) return ffi::Error::Success();

  const int64_t parts = std::min<int64_t>(g.n, std::max<int64_t>(1, pool.num_threads()));
  std::vector<float> partial((parts - 1) * wsize, 0.f);
  const float* xp = x.typed_data();
  const float* dp = dy.typed_data();
  auto work = [&, parts](dropjax::WorkQueue& queue) {
    for (int64_t p; (p = queue.Take()) >= 0;) {
      float* acc = p == 0 ? out : partial.data() + (p - 1) * wsize;
      for (int64_t i = p * g.n / parts; i < (p + 1) * g.n / parts; ++i) {
        if (isa == 512) {
          AccumulateImage<true>(g, xp, dp, acc, i);
        } else {
          AccumulateImage<false>(g, xp, dp, acc, i);
        }
      }
    }
  };
  dropjax::RunOnPool(pool, parts, parts, work);
  for (int64_t p = 1; p < parts; ++p) {  // fixed order: reproducible sums
    const float* src = partial.data() + (p - 1) * wsize;
    for (int64_t i = 0; i < wsize; ++i) out[i] += src[i];
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DropjaxConvWeightGrad, ConvWeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw")
                                  .Attr<int64_t>("isa"));
