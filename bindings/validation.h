// Argument checks shared by the op bindings (attention.cpp, moe.cpp, sampling.cpp): tensors given, the
// devices of an op's tensors, the values of index tensors read on the host through their strides, and the range of
// numbers that the kernels take in a narrower type (int64 -> int32, double -> float). Every error
// names the op and the argument and says what was expected.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <utility>

namespace llada::bindings {

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// Every tensor given defined: None passed for a Tensor argument reaches the op as an undefined tensor.
inline void check_defined(const char* op, std::initializer_list<NamedTensor> tensors) {
  for (const auto& [name, t] : tensors) TORCH_CHECK_TYPE(t->defined(), op, ": ", name, " must be a tensor, got None");
}

// Every tensor on the device of the first one.
inline void check_same_device(const char* op, std::initializer_list<NamedTensor> tensors) {
  const auto& [first_name, first] = *tensors.begin();
  for (const auto& [name, t] : tensors)
    TORCH_CHECK_VALUE(t->device() == first->device(), op, ": ", name, " is on ", t->device(), " but ", first_name,
                      " is on ", first->device());
}

// The values of a 1-D tensor of T on the host, read through its stride, so that any view (expanded,
// sliced with a step, offset into its storage) reads what it shows; a tensor on a GPU is copied to the
// host once (a device synchronisation).
template <class T>
class HostValues {
 public:
  explicit HostValues(const at::Tensor& t)
      : held_(t.is_cpu() ? t : t.cpu()), data_(held_.data_ptr<T>()), stride_(held_.stride(0)), size_(held_.size(0)) {
    TORCH_INTERNAL_ASSERT(held_.dim() == 1);
  }
  T operator[](int64_t i) const { return data_[i * stride_]; }
  int64_t size() const { return size_; }

 private:
  at::Tensor held_;
  const T* data_;
  int64_t stride_;
  int64_t size_;
};

// An integer argument that a kernel holds in int32: it must lie in [lo, INT32_MAX].
inline void check_int32_range(const char* op, const char* name, int64_t value, int64_t lo = 0) {
  TORCH_CHECK_VALUE(value >= lo && value <= std::numeric_limits<int32_t>::max(), op, ": ", name, " must be in [",
                    lo, ", 2^31 - 1], got ", value);
}

// A floating-point argument that a kernel holds in float32: finite there too.
inline void check_float32_finite(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && std::isfinite(static_cast<float>(value)), op, ": ", name,
                    " must be finite in float32 (|", name, "| < 3.4e38), got ", value);
}

// A float32 factor that a kernel folds into others (softmax_scale * log2(e)): finite, and 0 or normal in
// float32, as a subnormal one keeps too few bits for the product to be the reference's.
inline void check_float32_normal(const char* op, const char* name, double value) {
  check_float32_finite(op, name, value);
  TORCH_CHECK_VALUE(value == 0.0 || std::fabs(static_cast<float>(value)) >= std::numeric_limits<float>::min(), op,
                    ": ", name, " must be 0 or at least 1.2e-38 in magnitude (a normal float32), got ", value);
}

}  // namespace llada::bindings
