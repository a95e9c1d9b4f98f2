// Argument checks and memory layout of fake_quant / fake_quant_backward, shared by the CPU entry points
// (csrc/cpu/fake_quant.cpp) and the CUDA binding (csrc/cuda/fake_quant_binding.cpp). Host code, ATen only.
//
// Layout: the kernels see x as a dense array [outer, channels, inner] in memory order. Any non-overlapping
// and dense x (contiguous, channels_last, transposed, any permutation) is used in place: for a channel
// axis of size > 1, inner = x.stride(axis). Other inputs (slices with gaps, expanded tensors) are first
// copied into at::empty_like(x), a dense tensor with x's dimension order. Outputs are at::empty_like of
// that dense x, i.e. torch.empty_like(x): the same strides for dense inputs (the fake kernels in
// qops/fake_quant.py rely on it). A grad whose layout differs from x's is copied the same way.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "qops/checks.h"

namespace qops {

// Integers beyond 2^23 in magnitude would make q - zp inexact in float32, where the kernels compute.
constexpr int64_t kFqMaxQuantAbs = int64_t{1} << 23;

struct FqLayout {
  int64_t outer = 1, channels = 1, inner = 1;
};

inline void fq_check_qparam(const at::Tensor& t, const at::Tensor& x, int64_t expected_numel, int64_t axis,
                            const char* name) {
  check_floating(t, name);
  check_same_device(t, x, name, "x");
  if (axis == -1) {
    TORCH_CHECK(t.numel() == 1, name, ": expected 1 element for axis=-1 (per tensor), got ", t.numel(),
                " (shape ", t.sizes(), ")");
  } else {
    TORCH_CHECK(t.numel() == expected_numel, name, ": expected ", expected_numel, " elements (x.size(", axis,
                ")) for axis=", axis, ", got ", t.numel(), " (shape ", t.sizes(), ")");
  }
}

// Checks every argument of fake_quant; returns the axis in [0, x.dim()), or -1 for per tensor.
inline int64_t fq_check_args(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                             int64_t axis, int64_t quant_min, int64_t quant_max) {
  check_defined(x, "x");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "x: expected a float32, float16 or bfloat16 tensor, got ", dt);
  int64_t dim_axis = -1;
  if (axis != -1) {
    TORCH_CHECK(axis >= -x.dim() && axis < x.dim(), "axis: ", axis, " is out of range for a tensor with ",
                x.dim(), " dimensions (axis=-1 means per tensor; the last axis per channel is x.dim()-1)");
    dim_axis = axis < 0 ? axis + x.dim() : axis;
  }
  const int64_t channels = dim_axis == -1 ? 1 : x.size(dim_axis);
  fq_check_qparam(scale, x, channels, dim_axis, "scale");
  fq_check_qparam(zero_point, x, channels, dim_axis, "zero_point");
  TORCH_CHECK(quant_min >= -kFqMaxQuantAbs && quant_min <= kFqMaxQuantAbs, "quant_min: expected a value in [",
              -kFqMaxQuantAbs, ", ", kFqMaxQuantAbs, "] (exact in float32), got ", quant_min);
  TORCH_CHECK(quant_max >= -kFqMaxQuantAbs && quant_max <= kFqMaxQuantAbs, "quant_max: expected a value in [",
              -kFqMaxQuantAbs, ", ", kFqMaxQuantAbs, "] (exact in float32), got ", quant_max);
  TORCH_CHECK(quant_min < quant_max, "quant_min: expected quant_min < quant_max, got quant_min=", quant_min,
              ", quant_max=", quant_max);
  return dim_axis;
}

inline void fq_check_grad(const at::Tensor& grad, const at::Tensor& x) {
  check_defined(grad, "grad");
  TORCH_CHECK(grad.sizes() == x.sizes(), "grad: expected shape ", x.sizes(), " like x, got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "grad: expected dtype ", x.scalar_type(), " like x, got ",
              grad.scalar_type());
  check_same_device(grad, x, "grad", "x");
}

// x itself when it is non-overlapping and dense, else a dense copy in x's dimension order.
inline at::Tensor fq_dense(const at::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) return x;
  return at::empty_like(x).copy_(x);
}

inline bool fq_same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (!a.is_non_overlapping_and_dense()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// t (same shape as the dense `like`) with like's memory layout: t itself or a copy.
inline at::Tensor fq_in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (fq_same_layout(t, like)) return t;
  return at::empty_like(like).copy_(t);
}

// [outer, channels, inner] of a dense, non-empty x for a normalized axis (-1: per tensor). One channel
// (per tensor, or an axis of size 1) is a single run over all of memory.
inline FqLayout fq_layout(const at::Tensor& dense_x, int64_t dim_axis) {
  FqLayout l;
  if (dim_axis == -1 || dense_x.size(dim_axis) == 1) {
    l.inner = dense_x.numel();
    return l;
  }
  l.channels = dense_x.size(dim_axis);
  l.inner = dense_x.stride(dim_axis);
  l.outer = dense_x.numel() / (l.channels * l.inner);
  return l;
}

}  // namespace qops
