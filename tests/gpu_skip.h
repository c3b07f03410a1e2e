// The one GPU skip of the tests: a test that needs a GPU skips, printing why, on a machine without one.
// Host-only (kernels/cuda_runtime.h), so that .cpp tests compiled without nvcc can use it too.
#pragma once

#include <gtest/gtest.h>

#include "kernels/cuda_runtime.h"

#define SKIP_WITHOUT_GPU()                                                       \
  do {                                                                           \
    if (::llm::cuda::device_count() == 0) {                                      \
      GTEST_SKIP() << "GPU test skipped: " << ::llm::cuda::unavailable_reason(); \
    }                                                                            \
  } while (0)
