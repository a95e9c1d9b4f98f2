// Grain sizes of at::parallel_for in the CPU code. Waking a thread costs microseconds, and on a shared machine
// a parked thread costs a scheduler quantum (milliseconds) that the whole call waits for: a problem too small
// to repay that runs on the calling thread. Every at::parallel_for in csrc/cpu passes parallel_grain(...).
#pragma once

#include <algorithm>
#include <cstdint>

namespace qops::cpu {

// Scalar operations (a load and a compare, a multiply-add in plain code) worth one parallel task.
constexpr int64_t kParallelMinWork = int64_t{1} << 18;
// Multiply-adds of the vectorized convolution paths worth one task (they run ~10-50x faster than plain code):
// ~2^24 is a few hundred microseconds of the dot path, so a layer of an image of ~41x41 pixels with 32 channels
// (15M multiply-adds) stays on one thread, and one of 64 channels (60M) uses two.
constexpr int64_t kParallelMinMacs = int64_t{1} << 24;

// Items per task so that every task does at least `min_work`.
inline int64_t parallel_grain(int64_t work_per_item, int64_t min_work = kParallelMinWork) {
  const int64_t w = std::max<int64_t>(work_per_item, 1);
  return std::max<int64_t>(1, (min_work + w - 1) / w);
}

// Threads worth using for `work` in total (at least 1, at most `threads`).
inline int64_t parallel_threads(int64_t work, int64_t threads, int64_t min_work = kParallelMinWork) {
  return std::clamp<int64_t>(work / min_work, 1, std::max<int64_t>(threads, 1));
}

}  // namespace qops::cpu
