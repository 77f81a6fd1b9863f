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
// channels, keep the AVX2 tile).  Every dw value is still one
// chain of multiply-adds over the same windows in the same order, so both
// instruction sets give bit-identical results.
//
// Build: see dropjax/native/__init__.py (compiled on first use with the
// system C++ compiler against the FFI headers shipped with jaxlib).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
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

template <int CB>
DROPJAX_AVX512 void ChannelBlock512(const Geometry& g, const float* x, const float* dy,
                                    float* dw, const Window& win, int64_t ci0) {
  int64_t co0 = 0;
  for (; co0 + 32 <= g.co; co0 += 32) TileZ<CB, 2>(g, x, dy, dw, win, ci0, co0);
  // A 16-channel block: CB zmm accumulators; under 4 (the stem's 3 input
  // channels) too few chains to hide the FMA latency, where the AVX2 tile has 2 CB.
  if constexpr (CB >= 4) {
    for (; co0 + 16 <= g.co; co0 += 16) TileZ<CB, 1>(g, x, dy, dw, win, ci0, co0);
  } else {
    for (; co0 + 16 <= g.co; co0 += 16) Tile<CB, 2>(g, x, dy, dw, win, ci0, co0);
  }
  for (; co0 + 8 <= g.co; co0 += 8) Tile<CB, 1>(g, x, dy, dw, win, ci0, co0);
}
#undef DROPJAX_AVX512

// One window's channel blocks (CB = 6 for AVX2, 8 for AVX-512, and a last,
// smaller one) with the tiles of ChannelBlock (AVX2) or ChannelBlock512 (AVX-512).
template <bool kAvx512, int CB>
void ChannelBlockOf(const Geometry& g, const float* x, const float* dy, float* dw,
                    const Window& win, int64_t ci0) {
  if constexpr (kAvx512) {
    ChannelBlock512<CB>(g, x, dy, dw, win, ci0);
  } else {
    ChannelBlock<CB>(g, x, dy, dw, win, ci0);
  }
}

template <bool kAvx512>
void AccumulateImage(const Geometry& g, const float* x, const float* dy, float* dw,
                     int64_t image) {
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
        constexpr int kBlock = kAvx512 ? kMaxChannelBlock512 : kMaxChannelBlock;
        int64_t ci0 = 0;
        for (; ci0 + kBlock <= g.ci; ci0 += kBlock)
          ChannelBlockOf<kAvx512, kBlock>(g, x, dy, dw, win, ci0);
        switch (g.ci - ci0) {
          case 7: ChannelBlockOf<kAvx512, 7>(g, x, dy, dw, win, ci0); break;
          case 6: ChannelBlockOf<kAvx512, 6>(g, x, dy, dw, win, ci0); break;
          case 5: ChannelBlockOf<kAvx512, 5>(g, x, dy, dw, win, ci0); break;
          case 4: ChannelBlockOf<kAvx512, 4>(g, x, dy, dw, win, ci0); break;
          case 3: ChannelBlockOf<kAvx512, 3>(g, x, dy, dw, win, ci0); break;
          case 2: ChannelBlockOf<kAvx512, 2>(g, x, dy, dw, win, ci0); break;
          case 1: ChannelBlockOf<kAvx512, 1>(g, x, dy, dw, win, ci0); break;
          default: break;
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
