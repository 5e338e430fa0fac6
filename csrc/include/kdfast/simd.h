// KDFAST_SIMD_CLONES: marks a CPU hot loop to be compiled for the x86-64-v4 (AVX-512) and
// x86-64-v3 (AVX2 + FMA) levels as well as the baseline ISA, the variant picked at load time
// (GCC/Clang on x86-64); elsewhere a plain function. Inline helpers it calls are compiled into
// each variant. With -ffp-contract=fast (setup.py) a * b + c becomes one FMA in the v3/v4
// variants: a polynomial exp is then about a third fewer instructions.
#pragma once

#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define KDFAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef KDFAST_SIMD_CLONES
#define KDFAST_SIMD_CLONES
#endif

// KDFAST_ALWAYS_INLINE: a small helper of such a loop (an exp) that must be inlined for the
// loop to vectorise; GCC stops inlining it on its own once a clone calls it from several loops.
#if defined(__GNUC__)
#define KDFAST_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define KDFAST_ALWAYS_INLINE inline
#endif
