// Turns a failed CUDA runtime call or kernel launch into llada::Status::kCudaError.
#pragma once

#include <cuda_runtime_api.h>

#include "llada/status.h"

#define LLADA_RETURN_IF_CUDA_ERROR(expr)                    \
  do {                                                      \
    if ((expr) != cudaSuccess) return ::llada::Status::kCudaError; \
  } while (0)

#define LLADA_RETURN_LAUNCH_STATUS() \
  return cudaGetLastError() == cudaSuccess ? ::llada::Status::kOk : ::llada::Status::kCudaError
