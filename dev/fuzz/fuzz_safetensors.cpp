// libFuzzer target: the safetensors parser. Any byte string must either parse (and then every tensor
// converts without reading outside the buffer) or raise SafetensorsError; nothing else.
// Built and run by dev/fuzz/run.sh.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "llm/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const llm::SafetensorsFile file =
        llm::SafetensorsFile::from_bytes("fuzz", std::vector<uint8_t>(data, data + size));
    uint64_t covered = 0;
    for (const auto& t : file.tensors()) {
      // Validation guarantees numel * dtype size == end - begin <= size.
      if (t.end - t.begin != static_cast<uint64_t>(t.numel) * llm::safe_dtype_size(t.dtype)) std::abort();
      if (t.end > size) std::abort();
      covered += t.end - t.begin;
      std::vector<double> out(static_cast<size_t>(t.numel));
      file.read(t.name, out.data(), out.size());
    }
    if (covered > size) std::abort();
  } catch (const llm::SafetensorsError&) {
  }
  return 0;
}
