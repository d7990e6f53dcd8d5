/* OpenBLAS 0.3.21 (Debian 12, DYNAMIC_ARCH) chooses its kernels from the CPU's model number.
 * Virtual machines that report a generic "Intel Xeon Processor" make it fall back to Prescott
 * (SSE3) kernels: 15 GFLOP/s sgemm instead of 100 on this project's 2-core AVX-512 machine, and
 * 4.6 instead of 19.5 decode tok/s. It reads OPENBLAS_CORETYPE once, when it is loaded, before
 * main runs; so a program re-executes itself once with the variable set from the instruction sets
 * the CPU reports. A variable set by the user is left alone. */
#ifndef CANOPY_CLI_CPU_TUNE_H
#define CANOPY_CLI_CPU_TUNE_H

#include <stdlib.h>
#include <unistd.h>

static inline void cli_tune_openblas(char **argv) {
  if (getenv("OPENBLAS_CORETYPE")) return;
  const char *core = NULL;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    core = "SkylakeX";
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    core = "Haswell";
#endif
  if (!core || setenv("OPENBLAS_CORETYPE", core, 1)) return;
  execv("/proc/self/exe", argv); /* returns only on failure: then run with what OpenBLAS chose */
}

#endif
