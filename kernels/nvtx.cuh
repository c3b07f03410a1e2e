// NVTX ranges for Nsight Systems: every kernel launcher opens one named after its op, so a timeline shows
// which op each kernel belongs to. The NVTX v3 headers that ship with the CUDA toolkit are header-only;
// without a profiler attached a push/pop costs a few nanoseconds.
#pragma once

#include <nvtx3/nvToolsExt.h>

namespace llm::cuda {

// Pushes a range when constructed and pops it when destroyed (at the end of the enclosing scope).
class NvtxRange {
 public:
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

}  // namespace llm::cuda
