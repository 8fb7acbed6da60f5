// PNNH_VECTOR_CLONES: build AVX-512 / AVX2 / baseline versions of an inner loop and pick one when the
// module loads, so a portable build still runs wide vectors where the CPU has them. The loops live in
// plain functions because OpenMP simd pragmas cannot sit inside AT_DISPATCH's macro.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PNNH_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PNNH_VECTOR_CLONES
#endif
