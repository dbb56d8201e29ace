// LLADA_HD marks functions shared by the C++ CPU kernels and the CUDA kernels, so that index,
// mask and sampling math is written once and unit-tested on the CPU.
#pragma once

#if defined(__CUDACC__)
#define LLADA_HD __host__ __device__ __forceinline__
#else
#define LLADA_HD inline
#endif

// LLADA_CPU_MULTIVERSION compiles a hot CPU function for AVX-512, AVX2 and baseline x86-64 and picks one
// at load time, so one binary vectorises wide on the machine it runs on. A lambda inside such a function is
// not cloned (it compiles for the baseline ISA): hot helpers must be always-inline functions instead.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define LLADA_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LLADA_CPU_MULTIVERSION
#endif
