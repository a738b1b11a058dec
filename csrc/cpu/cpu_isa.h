// Run-time ISA checks for the CPU kernels' hand-vectorised paths. The build targets baseline x86-64;
// functions that use wider instructions carry a target attribute (UGD_TARGET_AVX512BF16) and run
// only where the check passes, so one binary serves every x86-64 CPU.
#pragma once

#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10))
#define UGD_HAVE_AVX512BF16_CODE 1
#define UGD_TARGET_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#else
#define UGD_HAVE_AVX512BF16_CODE 0
#endif

// GCC 12 reports the registers its own AVX-512 intrinsics leave undefined on purpose
// (_mm512_undefined_*, inside reductions, inserts and widening loads) as uninitialised: a false
// positive, silenced for the files that use those intrinsics (the only includers of this header).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace ugd_ops::cpu {

// AVX512 F/BW/VL/DQ and AVX512-BF16 (vdpbf16ps, vcvtneps2bf16), with the OS saving the zmm state.
inline bool cpu_has_avx512bf16() {
#if UGD_HAVE_AVX512BF16_CODE
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

}  // namespace ugd_ops::cpu
