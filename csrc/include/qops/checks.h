// Argument checks shared by the CPU and CUDA entry points (csrc/cpu/*.cpp, csrc/cuda/*_binding.cpp).
// Every failure is a RuntimeError (c10::Error) whose message starts with the argument's name.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace qops {

inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
}

inline void check_floating(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, ": expected a floating-point tensor, got ",
              t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  check_defined(t, name);
  TORCH_CHECK(t.scalar_type() == want, name, ": expected dtype ", want, ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), " like ", ref_name,
              ", got ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, ": expected ", dim, " dimensions, got shape ", t.sizes());
}

// Wraps a possibly negative axis into [0, dim); -1 stays -1 only where the caller means "per tensor".
inline int64_t check_axis(int64_t axis, int64_t dim, const char* name = "axis") {
  TORCH_CHECK(axis >= -dim && axis < dim, name, ": ", axis, " is out of range for a tensor with ", dim,
              " dimensions");
  return axis < 0 ? axis + dim : axis;
}

}  // namespace qops
