// The one harness of the C++ tests (test_ops.cpp, test_cuda_attention_plan.cpp,
// test_attention_bwd_schedule.cpp): EXPECT, the named test list and main's runner.
//
//   EXPECT(cond, msg...)   a failed check counts and, for the first 20 failures, prints the file,
//                          line, condition and the message built by c10::str(msg...); the test goes on
//   run_tests(argc, argv, tests)
//                          runs every test, or the ones named on the command line (ctest registers
//                          one ctest test per name); an exception fails the test that threw it; an
//                          unknown name lists the tests and returns 2; else 0 when all passed, 1 if not
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <cstdio>
#include <exception>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace ugd_ops_tests {

inline int g_failures = 0;

struct TestCase {
  const char* name;
  std::function<void()> fn;
};

inline bool run_test(const TestCase& t) {
  const int before = g_failures;
  std::printf("[ RUN      ] %s\n", t.name);
  std::fflush(stdout);
  try {
    t.fn();
  } catch (const c10::Error& e) {
    ++g_failures;
    std::fprintf(stderr, "%s: unexpected c10::Error: %s\n", t.name, e.what_without_backtrace());
  } catch (const std::exception& e) {
    ++g_failures;
    std::fprintf(stderr, "%s: unexpected exception: %s\n", t.name, e.what());
  }
  const bool ok = g_failures == before;
  std::printf("[ %s ] %s\n", ok ? "      OK" : "  FAILED", t.name);
  std::fflush(stdout);
  return ok;
}

inline int run_tests(int argc, char** argv, const std::vector<TestCase>& tests) {
  std::vector<const TestCase*> chosen;
  if (argc <= 1) {
    for (const TestCase& t : tests) chosen.push_back(&t);
  }
  for (int a = 1; a < argc; ++a) {
    const TestCase* found = nullptr;
    for (const TestCase& t : tests)
      if (std::string_view(argv[a]) == t.name) found = &t;
    if (found == nullptr) {
      std::fprintf(stderr, "unknown test '%s'; the tests are:", argv[a]);
      for (const TestCase& t : tests) std::fprintf(stderr, " %s", t.name);
      std::fprintf(stderr, "\n");
      return 2;
    }
    chosen.push_back(found);
  }
  int failed = 0;
  for (const TestCase* t : chosen) failed += run_test(*t) ? 0 : 1;
  std::printf("%d of %zu tests passed\n", static_cast<int>(chosen.size()) - failed, chosen.size());
  return failed == 0 ? 0 : 1;
}

}  // namespace ugd_ops_tests

#define EXPECT(cond, ...)                                                                        \
  do {                                                                                           \
    if (!(cond)) {                                                                               \
      if (++::ugd_ops_tests::g_failures <= 20)                                                   \
        std::fprintf(stderr, "%s:%d: EXPECT(%s) failed: %s\n", __FILE__, __LINE__, #cond,       \
                     std::string(c10::str(__VA_ARGS__)).c_str());                                \
    }                                                                                            \
  } while (0)
