// Training-mode batch norm over float32 arrays (..., C), as XLA FFI handlers
// for the CPU backend:
//
// * DropjaxChannelMoments: sum x and sum x^2, the statistics, in one pass;
// * DropjaxNormAct: h = max(x * a + b + residual, 0) (a, b per channel; the
//   residual optional), the normalization with the block's residual and ReLU;
// * DropjaxNormActGrad: its backward pass: g = dh where h > 0, with sum g and
//   sum g * x (the gradients of b and a), in one pass.
//
// XLA:CPU rewrites a long reduction into a tree of reduce-windows, which
// cannot fuse their producer, so sum(x * x) first writes x * x to memory and
// reads it back (benchmarks/README.md).  Here each part of the rows is summed
// in float32 over blocks of 64 rows, the block sums are added in float64, and
// the parts are combined in a fixed order: one read of x, results that do not
// depend on the thread schedule, and no float32 drift over long sums.  Composed
// from XLA's ops the backward pass writes g, writes g * x, and reads both back
// for the sums (11 passes over an activation with the next elementwise loop,
// against 7 here and there; benchmarks/README.md).  XLA's loop for the forward
// map walks the 16-32 channels of each position with the broadcast scale and
// shift; here they stay in registers.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <immintrin.h>
#include <string>
#include <vector>

#include "work_queue.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockRows = 64;    // float32 partial sums over this many rows
constexpr int64_t kRowsPerPart = 2048;  // rows per work item (fixed: deterministic)

void SumPart(const float* __restrict__ x, int64_t r0, int64_t r1, int64_t c, double* sum,
             double* sumsq) {
  std::vector<float> s(c), q(c);
  for (int64_t b0 = r0; b0 < r1; b0 += kBlockRows) {
    const int64_t b1 = std::min(r1, b0 + kBlockRows);
    if (c % 8 == 0) {  // AVX2, 8 channels at a time: the same sums as the loop below
      for (int64_t j = 0; j < c; j += 8) {
        __m256 sv = _mm256_setzero_ps(), qv = _mm256_setzero_ps();
        for (int64_t r = b0; r < b1; ++r) {
          const __m256 v = _mm256_loadu_ps(x + r * c + j);
          sv = _mm256_add_ps(sv, v);
          qv = _mm256_fmadd_ps(v, v, qv);
        }
        _mm256_storeu_ps(&s[j], sv);
        _mm256_storeu_ps(&q[j], qv);
      }
    } else {
      std::fill(s.begin(), s.end(), 0.f);
      std::fill(q.begin(), q.end(), 0.f);
      for (int64_t r = b0; r < b1; ++r) {
        const float* row = x + r * c;
        for (int64_t j = 0; j < c; ++j) {
          s[j] += row[j];
          q[j] = std::fma(row[j], row[j], q[j]);
        }
      }
    }
    for (int64_t j = 0; j < c; ++j) {
      sum[j] += s[j];
      sumsq[j] += q[j];
    }
  }
}

// g = (h > 0 ? dh : 0) for rows [r0, r1), and per channel sum g, sum g * x,
// summed like SumPart.  AVX2 over 8 channels at a time where C is a multiple of
// 8 (written out: the compiler does not vectorize the masked loop well).
void GradPart(const float* __restrict__ dh, const float* __restrict__ h,
              const float* __restrict__ x, float* __restrict__ g, int64_t r0, int64_t r1,
              int64_t c, double* sum_g, double* sum_gx) {
  std::vector<float> s(c), q(c);
  const bool vec = c % 8 == 0;
  for (int64_t b0 = r0; b0 < r1; b0 += kBlockRows) {
    std::fill(s.begin(), s.end(), 0.f);
    std::fill(q.begin(), q.end(), 0.f);
    const int64_t b1 = std::min(r1, b0 + kBlockRows);
    if (vec) {
      const __m256 zero = _mm256_setzero_ps();
      for (int64_t j = 0; j < c; j += 8) {
        __m256 sv = zero, qv = zero;
        for (int64_t r = b0; r < b1; ++r) {
          const int64_t o = r * c + j;
          const __m256 keep = _mm256_cmp_ps(_mm256_loadu_ps(h + o), zero, _CMP_GT_OQ);
          const __m256 v = _mm256_and_ps(keep, _mm256_loadu_ps(dh + o));
          _mm256_storeu_ps(g + o, v);
          sv = _mm256_add_ps(sv, v);
          qv = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + o), qv);
        }
        _mm256_storeu_ps(&s[j], sv);
        _mm256_storeu_ps(&q[j], qv);
      }
    } else {
      for (int64_t r = b0; r < b1; ++r) {
        const int64_t o = r * c;
        for (int64_t j = 0; j < c; ++j) {
          const float v = h[o + j] > 0.f ? dh[o + j] : 0.f;
          g[o + j] = v;
          s[j] += v;
          q[j] = std::fma(v, x[o + j], q[j]);
        }
      }
    }
    for (int64_t j = 0; j < c; ++j) {
      sum_g[j] += s[j];
      sum_gx[j] += q[j];
    }
  }
}

// h = max(x * a + b + res, 0) for rows [r0, r1) (res null: no residual); AVX2
// with a and b in registers where C is a multiple of 8 up to kMaxRegChannels.
constexpr int64_t kMaxRegChannels = 64;

void ActPart(const float* __restrict__ x, const float* __restrict__ a,
             const float* __restrict__ b, const float* __restrict__ res, float* __restrict__ h,
             int64_t r0, int64_t r1, int64_t c) {
  if (c % 8 == 0 && c <= kMaxRegChannels) {
    __m256 av[kMaxRegChannels / 8], bv[kMaxRegChannels / 8];
    for (int64_t j = 0; j < c; j += 8) {
      av[j / 8] = _mm256_loadu_ps(a + j);
      bv[j / 8] = _mm256_loadu_ps(b + j);
    }
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t j = 0; j < c; j += 8) {
        const int64_t o = r * c + j;
        __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(x + o), av[j / 8], bv[j / 8]);
        if (res != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(res + o));
        _mm256_storeu_ps(h + o, _mm256_max_ps(v, zero));
      }
    }
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t j = 0; j < c; ++j) {
      const int64_t o = r * c + j;
      float v = std::fma(x[o], a[j], b[j]);
      if (res != nullptr) v += res[o];
      h[o] = v > 0.f ? v : 0.f;
    }
  }
}

// Runs `part(r0, r1, acc_a, acc_b)` for every part [r0, r1) of `rows` rows on
// the pool (each part adds its C sums a and C sums b into its own float64
// slots) and adds the parts in a fixed order into `out_a`, `out_b` (C each).
template <typename Part>
void ReduceParts(ffi::ThreadPool& pool, int64_t rows, int64_t c, Part part, float* out_a,
                 float* out_b) {
  const int64_t parts = std::max<int64_t>(1, (rows + kRowsPerPart - 1) / kRowsPerPart);
  std::vector<double> acc(parts * 2 * c, 0.0);  // per part: C sums a, then C sums b
  auto work = [&](dropjax::WorkQueue& queue) {
    for (int64_t p; (p = queue.Take()) >= 0;) {
      part(p * kRowsPerPart, std::min(rows, (p + 1) * kRowsPerPart), &acc[p * 2 * c],
           &acc[p * 2 * c + c]);
    }
  };
  dropjax::RunOnPool(pool, parts, pool.num_threads(), work);
  for (int64_t j = 0; j < c; ++j) {
    double ta = 0.0, tb = 0.0;
    for (int64_t p = 0; p < parts; ++p) {  // fixed order
      ta += acc[p * 2 * c + j];
      tb += acc[p * 2 * c + c + j];
    }
    out_a[j] = static_cast<float>(ta);
    out_b[j] = static_cast<float>(tb);
  }
}

// Channels C (the last dimension) and rows (the rest) of `x`, or an error.
ffi::Error Rows(const ffi::Buffer<ffi::F32>& x, const char* name, int64_t* c, int64_t* rows) {
  const auto xd = x.dimensions();
  if (xd.size() == 0) return ffi::Error::InvalidArgument(std::string(name) + ": rank >= 1 needed");
  *c = xd[xd.size() - 1];
  *rows = *c == 0 ? 0 : x.element_count() / *c;
  return ffi::Error::Success();
}

}  // namespace

static ffi::Error ChannelMomentsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                     ffi::ResultBuffer<ffi::F32> sum,
                                     ffi::ResultBuffer<ffi::F32> sumsq) {
  int64_t c, rows;
  if (auto e = Rows(x, "channel_moments", &c, &rows); e.failure()) return e;
  if (sum->element_count() != c || sumsq->element_count() != c)
    return ffi::Error::InvalidArgument("channel_moments: outputs must have C elements");
  const float* xp = x.typed_data();
  ReduceParts(
      pool, rows, c,
      [&](int64_t r0, int64_t r1, double* s, double* q) { SumPart(xp, r0, r1, c, s, q); },
      sum->typed_data(), sumsq->typed_data());
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DropjaxChannelMoments, ChannelMomentsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

static ffi::Error NormActGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dh,
                                  ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> x,
                                  ffi::ResultBuffer<ffi::F32> g,
                                  ffi::ResultBuffer<ffi::F32> sum_g,
                                  ffi::ResultBuffer<ffi::F32> sum_gx) {
  int64_t c, rows;
  if (auto e = Rows(dh, "norm_act_grad", &c, &rows); e.failure()) return e;
  const int64_t n = dh.element_count();
  if (h.element_count() != n || x.element_count() != n || g->element_count() != n)
    return ffi::Error::InvalidArgument("norm_act_grad: dh, h, x and g must have the same size");
  if (sum_g->element_count() != c || sum_gx->element_count() != c)
    return ffi::Error::InvalidArgument("norm_act_grad: the sums must have C elements");
  const float* dhp = dh.typed_data();
  const float* hp = h.typed_data();
  const float* xp = x.typed_data();
  float* gp = g->typed_data();
  ReduceParts(
      pool, rows, c,
      [&](int64_t r0, int64_t r1, double* s, double* q) {
        GradPart(dhp, hp, xp, gp, r0, r1, c, s, q);
      },
      sum_g->typed_data(), sum_gx->typed_data());
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DropjaxNormActGrad, NormActGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// h = max(x * a + b + res, 0): a and b (C,), res x's shape or empty for none.
static ffi::Error NormActImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                             ffi::Buffer<ffi::F32> res, ffi::ResultBuffer<ffi::F32> h) {
  int64_t c, rows;
  if (auto e = Rows(x, "norm_act", &c, &rows); e.failure()) return e;
  const int64_t n = x.element_count();
  if (a.element_count() != c || b.element_count() != c)
    return ffi::Error::InvalidArgument("norm_act: a and b need one value per channel");
  if ((res.element_count() != n && res.element_count() != 0) || h->element_count() != n)
    return ffi::Error::InvalidArgument("norm_act: the residual and h must have x's size "
                                       "(or the residual be empty)");
  const float* xp = x.typed_data();
  const float* ap = a.typed_data();
  const float* bp = b.typed_data();
  const float* rp = res.element_count() != 0 ? res.typed_data() : nullptr;
  float* hp = h->typed_data();
  const int64_t parts = (rows + kRowsPerPart - 1) / kRowsPerPart;
  auto work = [&](dropjax::WorkQueue& queue) {
    for (int64_t p; (p = queue.Take()) >= 0;)
      ActPart(xp, ap, bp, rp, hp, p * kRowsPerPart, std::min(rows, (p + 1) * kRowsPerPart), c);
  };
  if (parts > 0) dropjax::RunOnPool(pool, parts, pool.num_threads(), work);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DropjaxNormAct, NormActImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
