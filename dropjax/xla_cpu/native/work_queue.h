// Work sharing for the dropjax FFI kernels on XLA:CPU's intra-op thread pool.
#ifndef DROPJAX_NATIVE_WORK_QUEUE_H_
#define DROPJAX_NATIVE_WORK_QUEUE_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace dropjax {

// Items [0, count) handed out to whichever thread asks first.
struct WorkQueue {
  explicit WorkQueue(int64_t count) : count(count) {}
  // The next item to do, or -1 when none are left.
  int64_t Take() {
    const int64_t i = next.fetch_add(1);
    return i < count ? i : -1;
  }
  const int64_t count;
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int active = 0;
  bool closed = false;
};

// Runs `work(queue)` on the calling thread and on up to `workers - 1` pool
// threads, and returns when every started call has returned.  `work` takes
// items with `queue.Take()` until it gets -1.  A pool task that starts after
// the caller has finished returns at once without calling `work`, so the
// caller never waits for a task that has not started (no deadlock when every
// pool thread is busy) and `work` never runs after this function returns.
template <typename Work>
void RunOnPool(xla::ffi::ThreadPool& pool, int64_t count, int64_t workers, Work& work) {
  auto queue = std::make_shared<WorkQueue>(count);
  const int64_t helpers = std::min<int64_t>(count, std::max<int64_t>(1, workers)) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([queue, &work]() {
      {
        std::lock_guard<std::mutex> lock(queue->mu);
        if (queue->closed) return;  // the caller is gone: touch nothing
        ++queue->active;
      }
      work(*queue);
      std::lock_guard<std::mutex> lock(queue->mu);
      --queue->active;
      queue->cv.notify_all();
    });
  }
  work(*queue);
  std::unique_lock<std::mutex> lock(queue->mu);
  queue->closed = true;
  queue->cv.wait(lock, [&] { return queue->active == 0; });
}

}  // namespace dropjax

#endif  // DROPJAX_NATIVE_WORK_QUEUE_H_
