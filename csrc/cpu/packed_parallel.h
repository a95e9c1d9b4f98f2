// Work sharing of the packed kernels (packed_conv2d's row blocks, the code ops' chunks) without spin-waiting.
//
// at::parallel_for (OpenMP here) ends every region at a barrier where the finished threads spin. When the
// process has fewer cores than threads (another program busy on a 2-core machine: the scheduler's fair share,
// per session with autogroup, gives it one core for two threads), the spinning thread takes the core from the
// one it waits for, and each region costs a scheduler slice: measured, 2 threads ran edsr-baseline at 0.45x
// the speed of 1. Here the calling thread works too, helpers run on torch's inter-op pool (threads that sleep
// on a condition variable when idle) and take items from a shared counter, and the caller, once no item is
// left, waits only for helpers that hold one: a helper that never got a core finds nothing to do and leaves.
// On free cores all threads share the items; on one core the caller does them all, as with 1 thread.
#pragma once

#include <ATen/Parallel.h>

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

namespace qops::cpu {

// The shared counter of run_shared. (No vector code: the per-ISA kernel files share it.)
struct SharedItems {
  std::mutex m;
  std::condition_variable done;
  int64_t next = 0, items = 0, holding = 0;
  // The next item, or -1; `first` registers a thread as holding items until it calls release().
  int64_t claim(bool first) {
    std::lock_guard<std::mutex> lock(m);
    if (next >= items) return -1;
    if (first) ++holding;
    return next++;
  }
  void release() {
    {
      std::lock_guard<std::mutex> lock(m);
      --holding;
    }
    done.notify_all();
  }
};

// What a worker calls for its next item: the item, or -1 when none is left.
struct Claim {
  SharedItems* s;
  int64_t operator()() const { return s->claim(false); }
};

// Runs items [0, items) on up to `workers` threads (the caller included). work(first, claim) processes item
// `first` and then every item that claim() returns until it returns -1; it runs once per thread that got an
// item, so it may set up per-thread buffers before its loop.
template <typename Work>
void run_shared(int64_t items, int64_t workers, Work&& work) {
  if (items <= 0) return;
  auto shared = std::make_shared<SharedItems>();
  shared->items = items;
  const Claim claim{shared.get()};
  // Helpers touch `work` only after a successful first claim, which the caller waits for: a helper that
  // starts after the caller returned finds no item and only touches `shared`, which it co-owns.
  auto* work_ptr = &work;
  for (int64_t w = 1; w < workers && w < items; ++w) {
    at::launch([shared, work_ptr, claim]() {
      const int64_t first = shared->claim(true);
      if (first < 0) return;
      (*work_ptr)(first, claim);
      shared->release();
    });
  }
  const int64_t first = shared->claim(true);
  if (first >= 0) {
    work(first, claim);
    shared->release();
  }
  std::unique_lock<std::mutex> lock(shared->m);
  shared->done.wait(lock, [&] { return shared->holding == 0; });
}

}  // namespace qops::cpu
