// Status codes returned by the torch-free entry points of llada_engine.
//
// csrc/ never throws across its public boundary: every launch function returns a Status that the
// bindings turn into a Python exception with a message naming the argument at fault.
#pragma once

namespace llada {

enum class Status : int {
  kOk = 0,
  kNanInput = 1,        // a NaN was found in a floating-point input
  kBadArgument = 2,     // an argument outside the documented domain
  kCudaError = 3,       // a CUDA runtime call or kernel launch failed
  kNotCompiled = 4,     // the kernel was not compiled into this build (e.g. no CUDA)
};

inline const char* status_string(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kNanInput: return "NaN in input";
    case Status::kBadArgument: return "bad argument";
    case Status::kCudaError: return "CUDA error";
    case Status::kNotCompiled: return "kernel not compiled into this build";
  }
  return "unknown status";
}

}  // namespace llada
