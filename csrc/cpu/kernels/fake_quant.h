// Interface between the fake_quant CPU entry points (csrc/cpu/fake_quant.cpp) and the per-ISA hot loops
// (csrc/cpu/kernels/fake_quant.cpp). Plain data only: the kernels include no torch operator headers.
#pragma once

#include <cstdint>

#include "qops/cpu_dispatch.h"

namespace qops::cpu {

enum class FqDtype : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// The tensor as a dense array [outer, channels, inner] in memory order (channels = 1 per tensor), and
// the split of that array into tasks. The split depends on the shape only, never on the thread count,
// so every result (the reductions included) is the same for any number of threads and on every ISA.
struct FqCpuProblem {
  FqDtype dtype;
  int64_t outer, channels, inner;
  // Per channel (length `channels`): scale, 1.0f / scale, and the zero point of this pass, rounded as
  // the built-in rounds it (fq_zero_point_forward / fq_zero_point_backward[_per_channel]).
  const float* scale;
  const float* inv_scale;
  const float* zero_point;
  float quant_min, quant_max;

  // Task grid. Segment mode (inner > 1, or one channel): a task is (row group g, channel c, column
  // chunk k) and walks rows [g*rows_per_group, ...) of channel c, columns [k*chunk, ...) of each row.
  // Row mode (inner == 1, channels > 1): a task is (row group g, channel tile j) and walks its rows
  // over channels [j*tile, ...).
  bool row_mode;
  int64_t groups, rows_per_group;
  int64_t chunks, chunk;        // segment mode
  int64_t tiles, tile;          // row mode
  int64_t tasks;                // groups * channels * chunks, or groups * tiles
  int64_t tasks_per_thread_min; // grain of at::parallel_for (small problems stay on one thread)
};

// Number of doubles of the backward's partial sums: [groups][channels][chunks][3] with 3 = (inside term
// sum dy*((q-zp)*s-x), sum of dy below the range, sum of dy above the range).
inline int64_t fq_partials_size(const FqCpuProblem& p) {
  return p.groups * p.channels * (p.row_mode ? 1 : p.chunks) * 3;
}

}  // namespace qops::cpu

// y = fake_quant(x) for every element.
QOPS_DECLARE_ISA_FN(void, fake_quant_forward_kernel, (const FqCpuProblem& p, const void* x, void* y))
// grad_x for every element and the partial sums of the scale / zero-point gradients (see fq_partials_size).
QOPS_DECLARE_ISA_FN(void, fake_quant_backward_kernel,
                    (const FqCpuProblem& p, const void* grad, const void* x, void* grad_x, double* partials))
