//! @file
//! The assertion of kvc's fuzz targets: a failed property prints where and aborts, which
//! libFuzzer (and the standalone corpus runner) report as a crash with the input saved.
#pragma once

#include <cstdio>
#include <cstdlib>

//! Aborts with the condition's text when `condition` is false (also in release builds).
#define KVC_FUZZ_CHECK(condition)                                                                \
  do {                                                                                           \
    if (!(condition)) {                                                                          \
      std::fprintf(stderr, "%s:%d: fuzz property failed: %s\n", __FILE__, __LINE__, #condition); \
      std::abort();                                                                              \
    }                                                                                            \
  } while (0)
