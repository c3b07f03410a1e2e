// libFuzzer target: config.json import. Any byte string must either import or raise ConfigError; an
// imported config must export (config.json) and import back to the same ModelConfig.
// Built and run by dev/fuzz/run.sh.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "llm/hf_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  llm::HfConfigImport first;
  try {
    first = llm::hf_config_from_text(text, "fuzz");
  } catch (const llm::ConfigError&) {
    return 0;
  }
  const llm::json exported = llm::hf_config_to_json(first.config, first.tokens, "float32");
  const llm::HfConfigImport second = llm::hf_config_from_json(exported, "fuzz export");
  if (second.config.to_json() != first.config.to_json()) {
    std::fprintf(stderr, "round trip differs:\n%s\n%s\n", first.config.to_json().dump().c_str(),
                 second.config.to_json().dump().c_str());
    std::abort();
  }
  return 0;
}
