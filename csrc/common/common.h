// Helpers shared by every op family, host and device: qualifiers, accumulate
// types, ceil division. The host-only pieces live beside it: check.h (argument
// checks, FV_CHECK), alloc.h (allocation with out-of-memory messages),
// dtype.h (dtype dispatch, gather / scatter), parallel.h (the parallel-for),
// cuda.h (CUDA error checks, device guard, current stream, device views).
#pragma once

#include <cstdint>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#if defined(__CUDACC__)
#define FV_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FV_HOST_DEVICE inline
#endif

// Hot CPU loops are compiled twice, for AVX2+FMA (x86-64-v3) and for the
// baseline ISA, and picked at load time, so one wheel is fast on new CPUs and
// still runs on old ones. FV_CPU_CLONES_512 adds an AVX-512 (x86-64-v4) clone,
// for loops written over 16 floats at a time (GCC's autovectoriser keeps to
// 256-bit vectors otherwise).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__) && defined(__linux__)
#define FV_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define FV_CPU_CLONES_512 __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FV_CPU_CLONES
#define FV_CPU_CLONES_512
#endif

namespace fastvision {

// Half and bfloat16 inputs accumulate in float; double stays double so that
// gradcheck sees full precision.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

// Ceil division for sizes (a >= 0, b > 0), without forming a + b - 1, which
// overflows for a near 2^63 (an empty batch allows such axis lengths).
FV_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

}  // namespace fastvision
