// Per-channel sum and sum of squares of a float32 array (..., C), as an XLA
// FFI handler for the CPU backend: the batch-norm statistics in one pass.
//
// XLA:CPU rewrites a long reduction into a tree of reduce-windows, which
// cannot fuse their producer, so sum(x * x) first writes x * x to memory and
// reads it back (benchmarks/README.md).  Here each part of the rows is summed
// in float32 over blocks of 64 rows, the block sums are added in float64, and
// the parts are combined in a fixed order: one read of x, results that do not
// depend on the thread schedule, and no float32 drift over long sums.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "work_queue.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockRows = 64;    // float32 partial sums over this many rows
constexpr int64_t kRowsPerPart = 2048;  // rows per work item (fixed: deterministic)

void SumPart(const float* x, int64_t r0, int64_t r1, int64_t c, double* sum, double* sumsq) {
  std::vector<float> s(c), q(c);
  for (int64_t b0 = r0; b0 < r1; b0 += kBlockRows) {
    std::fill(s.begin(), s.end(), 0.f);
    std::fill(q.begin(), q.end(), 0.f);
    const int64_t b1 = std::min(r1, b0 + kBlockRows);
    for (int64_t r = b0; r < b1; ++r) {
      const float* row = x + r * c;
      for (int64_t j = 0; j < c; ++j) {  // vectorized by the compiler
        s[j] += row[j];
        q[j] += row[j] * row[j];
      }
    }
    for (int64_t j = 0; j < c; ++j) {
      sum[j] += s[j];
      sumsq[j] += q[j];
    }
  }
}

}  // namespace

static ffi::Error ChannelMomentsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                     ffi::ResultBuffer<ffi::F32> sum,
                                     ffi::ResultBuffer<ffi::F32> sumsq) {
  const auto xd = x.dimensions();
  if (xd.size() == 0) return ffi::Error::InvalidArgument("channel_moments: x must have rank >= 1");
  const int64_t c = xd[xd.size() - 1];
  const int64_t rows = c == 0 ? 0 : x.element_count() / c;
  if (sum->element_count() != c || sumsq->element_count() != c)
    return ffi::Error::InvalidArgument("channel_moments: outputs must have C elements");
  const int64_t parts = std::max<int64_t>(1, (rows + kRowsPerPart - 1) / kRowsPerPart);
  std::vector<double> acc(parts * 2 * c, 0.0);  // per part: sums, then sums of squares
  const float* xp = x.typed_data();
  auto work = [&](dropjax::WorkQueue& queue) {
    for (int64_t p; (p = queue.Take()) >= 0;) {
      const int64_t r0 = p * kRowsPerPart, r1 = std::min(rows, r0 + kRowsPerPart);
      SumPart(xp, r0, r1, c, &acc[p * 2 * c], &acc[p * 2 * c + c]);
    }
  };
  dropjax::RunOnPool(pool, parts, pool.num_threads(), work);
  float* s = sum->typed_data();
  float* q = sumsq->typed_data();
  for (int64_t j = 0; j < c; ++j) {
    double ts = 0.0, tq = 0.0;
    for (int64_t p = 0; p < parts; ++p) {  // fixed order
      ts += acc[p * 2 * c + j];
      tq += acc[p * 2 * c + c + j];
    }
    s[j] = static_cast<float>(ts);
    q[j] = static_cast<float>(tq);
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DropjaxChannelMoments, ChannelMomentsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
