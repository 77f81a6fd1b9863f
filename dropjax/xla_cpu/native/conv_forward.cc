// 2-D convolution, NHWC input / HWIO kernel, float32, as an XLA FFI handler
// for the CPU backend (x86-64 with AVX2 + FMA).
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
// to the next row) is accumulated in 12 AVX registers over (kh, kw, ci).
// Every output value is one sum in a fixed order: results do not depend on
// the thread count or the schedule.

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

// One output position's update: its input value at j times the 16 kernel
// values (b0, b1) into its two accumulators.
#define DROPJAX_ROW(xp, lo, hi)                   \
  do {                                            \
    const __m256 a = _mm256_broadcast_ss(xp + j); \
    lo = _mm256_fmadd_ps(a, b0, lo);              \
    hi = _mm256_fmadd_ps(a, b1, hi);              \
  } while (0)

// Accumulates one 6 x 16 tile.  `pos` are the tile's flattened output
// positions (a short image repeats its last one: same sums, same values);
// `wpk` is the packed kernel block (kh, kw * ci, 16).  The twelve
// accumulators are named variables: GCC keeps an accumulator *array* in memory
// (a store after every FMA), which halves the speed.
inline void Tile(const Geometry& g, const float* pad, const float* wpk,
                 const int64_t* pos, float* out, int64_t co0) {
  const int64_t ci = g.ci, len = g.kw * ci, row = g.wp * ci;
  const float* x[kTile];
  for (int p = 0; p < kTile; ++p)
    x[p] = pad + ((pos[p] / g.wo) * g.sh * g.wp + (pos[p] % g.wo) * g.sw) * ci;
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3], *x4 = x[4], *x5 = x[5];
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t kh = 0; kh < g.kh; ++kh) {
    const float* wr = wpk + kh * len * kBlock;
    const int64_t off = kh * row;
    for (int64_t j = off; j < off + len; ++j, wr += kBlock) {
      const __m256 b0 = _mm256_loadu_ps(wr), b1 = _mm256_loadu_ps(wr + 8);
      DROPJAX_ROW(x0, c00, c01);
      DROPJAX_ROW(x1, c10, c11);
      DROPJAX_ROW(x2, c20, c21);
      DROPJAX_ROW(x3, c30, c31);
      DROPJAX_ROW(x4, c40, c41);
      DROPJAX_ROW(x5, c50, c51);
    }
  }
  const __m256 acc[kTile][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                                {c30, c31}, {c40, c41}, {c50, c51}};
  const int64_t valid = std::min<int64_t>(kBlock, g.co - co0);
  for (int p = 0; p < kTile; ++p) {
    float* o = out + pos[p] * g.co + co0;
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

void Image(const Geometry& g, const float* x, const float* packed, float* y, float* pad) {
  std::memset(pad, 0, g.hp * g.wp * g.ci * sizeof(float));
  const int64_t cols = std::min(g.w, g.wp - g.pl);  // input columns some window reads
  for (int64_t r = 0; cols > 0 && r < g.h && r + g.pt < g.hp; ++r)
    std::memcpy(pad + ((r + g.pt) * g.wp + g.pl) * g.ci, x + r * g.w * g.ci,
                cols * g.ci * sizeof(float));
  const int64_t npos = g.ho * g.wo;
  const int64_t block = g.kh * g.kw * g.ci * kBlock;
  for (int64_t co0 = 0; co0 < g.co; co0 += kBlock) {
    const float* wpk = packed + co0 / kBlock * block;
    for (int64_t start = 0; start < npos; start += kTile) {
      // The last tile is shifted back to end at npos (it overlaps the one
      // before, recomputing identical values); an image with fewer than six
      // positions repeats its last position.
      const int64_t first = std::max<int64_t>(0, std::min(start, npos - kTile));
      int64_t pos[kTile];
      for (int p = 0; p < kTile; ++p) pos[p] = std::min(first + p, npos - 1);
      Tile(g, pad, wpk, pos, y, co0);
    }
  }
}

}  // namespace

static ffi::Error ConvForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                                  int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("conv_forward: operands must have rank 4");
  // The padded image covers every window: (ho - 1) * sh + kh rows, likewise columns.
  const Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], wd[0], wd[1], sh, sw,
                   pt, pl, (yd[1] - 1) * sh + wd[0], (yd[2] - 1) * sw + wd[1]};
  if (yd[0] != g.n || wd[2] != g.ci || wd[3] != g.co || pt < 0 || pl < 0 || sh < 1 || sw < 1)
    return ffi::Error::InvalidArgument("conv_forward: unsupported shapes");
  if (g.n == 0 || g.ho == 0 || g.wo == 0 || g.co == 0) return ffi::Error::Success();

  // Kernel packed per block of 16 output channels, zero-padded past co:
  // (ceil(co / 16), kh, kw * ci, 16), contiguous per block.
  const int64_t blocks = (g.co + kBlock - 1) / kBlock, taps = g.kh * g.kw * g.ci;
  std::vector<float> packed(blocks * taps * kBlock, 0.f);
  const float* wp = w.typed_data();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t valid = std::min<int64_t>(kBlock, g.co - b * kBlock);
    for (int64_t t = 0; t < taps; ++t)
      std::memcpy(&packed[(b * taps + t) * kBlock], wp + t * g.co + b * kBlock,
                  valid * sizeof(float));
  }
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const int64_t in_image = g.h * g.w * g.ci, out_image = g.ho * g.wo * g.co;
  auto work = [&](dropjax::WorkQueue& queue) {
    std::vector<float> pad(g.hp * g.wp * g.ci);
    for (int64_t i; (i = queue.Take()) >= 0;)
      Image(g, xp + i * in_image, packed.data(), yp + i * out_image, pad.data());
  };
  dropjax::RunOnPool(pool, g.n, pool.num_threads(), work);
  return ffi::Error::Success();
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
                                  .Attr<int64_t>("pl"));
