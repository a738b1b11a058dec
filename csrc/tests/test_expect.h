// The failure counter and EXPECT macro shared by the CPU tests of the CUDA attention kernels
// (test_cuda_attention_plan.cpp, test_attention_bwd_schedule.cpp). A failed EXPECT counts and, for
// the first 20 failures, prints the file, line, condition and the message built by c10::str(...).
#pragma once

#include <c10/util/StringUtil.h>

#include <cstdio>
#include <string>

namespace ugd_ops_tests {
inline int g_failures = 0;
}  // namespace ugd_ops_tests

#define EXPECT(cond, ...)                                                                        \
  do {                                                                                           \
    if (!(cond)) {                                                                               \
      if (++::ugd_ops_tests::g_failures <= 20)                                                   \
        std::fprintf(stderr, "%s:%d: EXPECT(%s) failed: %s\n", __FILE__, __LINE__, #cond,       \
                     std::string(c10::str(__VA_ARGS__)).c_str());                                \
    }                                                                                            \
  } while (0)
