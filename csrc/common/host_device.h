// LLADA_HD marks functions shared by the C++ CPU kernels and the CUDA kernels, so that index,
// mask and sampling math is written once and unit-tested on the CPU.
#pragma once

#if defined(__CUDACC__)
#define LLADA_HD __host__ __device__ __forceinline__
#else
#define LLADA_HD inline
#endif
