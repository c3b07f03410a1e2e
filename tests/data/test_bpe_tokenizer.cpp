// Byte-level BPE against ids written by the Hugging Face `tokenizers` library
// (dev/reference/tokenizer_fixtures.py), NFC against Python's unicodedata, and malformed tokenizer files.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "data/bpe_tokenizer.h"
#include "data/byte_tokenizer.h"
#include "data/tokenizer_factory.h"
#include "data/unicode_normalize.h"

namespace llm::data {
namespace {

using json = nlohmann::json;

const std::string kFixtures = std::string(LLM_SOURCE_DIR) + "/tests/fixtures/tokenizers";

const json& expected() {
  static const json data = [] {
    std::ifstream in(kFixtures + "/expected_ids.json");
    return json::parse(in);
  }();
  return data;
}

std::vector<int32_t> ids_of(const json& value) {
  return value.get<std::vector<int32_t>>();
}

// `tokenizers` decodes with String::from_utf8_lossy; ours returns the bytes. Replace each maximal invalid
// UTF-8 subsequence by U+FFFD the same way to compare.
std::string lossy(const std::string& bytes) {
  std::string out;
  size_t i = 0;
  while (i < bytes.size()) {
    char32_t cp = 0;
    const int n = utf8_decode(bytes, i, &cp);
    if (n > 0) {
      out.append(bytes, i, n);
      i += n;
      continue;
    }
    // Skip the longest prefix of a valid sequence (at least one byte), as Rust does.
    const auto b0 = static_cast<unsigned char>(bytes[i]);
    size_t skip = 1;
    const int need = b0 >= 0xF0 ? 4 : b0 >= 0xE0 ? 3 : b0 >= 0xC2 ? 2 : 1;
    while (static_cast<int>(skip) < need && i + skip < bytes.size()) {
      const auto b = static_cast<unsigned char>(bytes[i + skip]);
      bool ok = (b & 0xC0) == 0x80;
      if (skip == 1) {
        if (b0 == 0xE0) ok = b >= 0xA0 && b <= 0xBF;
        if (b0 == 0xED) ok = b >= 0x80 && b <= 0x9F;
        if (b0 == 0xF0) ok = b >= 0x90 && b <= 0xBF;
        if (b0 == 0xF4) ok = b >= 0x80 && b <= 0x8F;
      }
      if (!ok) break;
      ++skip;
    }
    out += "\xEF\xBF\xBD";
    i += skip;
  }
  return out;
}

std::unique_ptr<BpeTokenizer> load(const std::string& name) {
  return BpeTokenizer::from_files(kFixtures + "/" + name + "/tokenizer.json",
                                  kFixtures + "/" + name + "/tokenizer_config.json");
}

json tokenizer_json(const std::string& name) {
  std::ifstream in(kFixtures + "/" + name + "/tokenizer.json");
  return json::parse(in);
}

void check_cases(const BpeTokenizer& tokenizer, const json& cases, const std::string& label) {
  ASSERT_GT(cases.size(), 50u);
  for (const json& c : cases) {
    const std::string text = c["text"].get<std::string>();
    const std::vector<int32_t> ids = tokenizer.encode(text);
    EXPECT_EQ(ids, ids_of(c["ids"])) << label << ": " << json(text).dump();
    if (c.contains("decoded")) {
      EXPECT_EQ(lossy(tokenizer.decode(ids)), c["decoded"].get<std::string>())
          << label << ": " << json(text).dump();
      EXPECT_EQ(lossy(tokenizer.decode(ids, true)), c["decoded_skip_special"].get<std::string>())
          << label << ": " << json(text).dump();
    }
  }
}

TEST(BpeTokenizer, MatchesTokenizersGpt2) {
  check_cases(*load("gpt2"), expected()["tokenizers"]["gpt2"]["cases"], "gpt2");
}
TEST(BpeTokenizer, MatchesTokenizersLlama3) {
  check_cases(*load("llama3"), expected()["tokenizers"]["llama3"]["cases"], "llama3");
}
TEST(BpeTokenizer, MatchesTokenizersQwen2) {
  check_cases(*load("qwen2"), expected()["tokenizers"]["qwen2"]["cases"], "qwen2");
}

// decode(encode(x)) == x without a normalizer, NFC(x) with one. The only texts exempt are those that
// `tokenizers` does not round-trip either: lstrip/rstrip added tokens swallow the spaces beside them, and
// the normalized added token "café_token" decodes through the byte map (é is byte 0xE9 there).
void check_round_trip(const char* name, bool nfc) {
  const auto tokenizer = load(name);
  int checked = 0;
  for (const json& c : expected()["tokenizers"][name]["cases"]) {
    const std::string text = c["text"].get<std::string>();
    const std::string want = nfc ? nfc_normalize(text) : text;
    if (c["decoded"].get<std::string>() != want) {
      EXPECT_TRUE(text.find("<mask>") != std::string::npos || text.find("caf") != std::string::npos) << text;
      continue;
    }
    EXPECT_EQ(tokenizer->decode(tokenizer->encode(text)), want) << name << ": " << json(text).dump();
    ++checked;
  }
  EXPECT_GE(checked, 90) << name;
}

TEST(BpeTokenizer, RoundTripsGpt2) {
  check_round_trip("gpt2", false);
}
TEST(BpeTokenizer, RoundTripsLlama3) {
  check_round_trip("llama3", false);
}
TEST(BpeTokenizer, RoundTripsQwen2ToNfcText) {
  check_round_trip("qwen2", true);
}

TEST(BpeTokenizer, AddPrefixSpaceVariant) {
  json config = tokenizer_json("gpt2");
  config["pre_tokenizer"]["add_prefix_space"] = true;
  const BpeTokenizer tokenizer(config, json(), "gpt2+add_prefix_space");
  check_cases(tokenizer, expected()["variants"]["gpt2_add_prefix_space"], "gpt2_add_prefix_space");
}

TEST(BpeTokenizer, IgnoreMergesVariantOfLlama3) {
  json config = tokenizer_json("llama3");
  config["model"]["ignore_merges"] = false;
  const BpeTokenizer tokenizer(config, json(), "llama3-no-ignore-merges");
  check_cases(tokenizer, expected()["variants"]["llama3_no_ignore_merges"], "llama3_no_ignore_merges");
}

TEST(BpeTokenizer, IgnoreMergesTakesWholeVocabularyWords) {
  for (const char* mode : {"merge", "ignore"}) {
    const json& fixture = expected()["tiny_ignore_merges"][mode];
    const BpeTokenizer tokenizer(json::parse(fixture["tokenizer_json"].get<std::string>()), json(), mode);
    for (const json& c : fixture["cases"]) {
      EXPECT_EQ(tokenizer.encode(c["text"].get<std::string>()), ids_of(c["ids"]))
          << mode << ": " << c["text"];
    }
  }
}

TEST(BpeTokenizer, PostProcessorBos) {
  const auto llama = load("llama3");
  EXPECT_TRUE(llama->adds_bos());
  for (const json& c : expected()["llama3_with_special"]) {
    EXPECT_EQ(llama->encode_with_special_tokens(c["text"].get<std::string>()), ids_of(c["ids"]));
  }
  EXPECT_FALSE(load("gpt2")->adds_bos());
}

TEST(BpeTokenizer, SpecialIdsAndVocabSize) {
  for (const char* name : {"gpt2", "llama3", "qwen2"}) {
    EXPECT_EQ(load(name)->vocab_size(), expected()["tokenizers"][name]["vocab_size"].get<int>()) << name;
  }
  const auto gpt2 = load("gpt2");
  const int32_t endoftext = gpt2->token_to_id("<|endoftext|>");
  ASSERT_GE(endoftext, 0);
  EXPECT_EQ(gpt2->eos_id(), endoftext);
  EXPECT_EQ(gpt2->bos_id(), endoftext);
  EXPECT_EQ(gpt2->pad_id(), -1);
  EXPECT_TRUE(gpt2->is_special(endoftext));
  EXPECT_FALSE(gpt2->is_special(gpt2->token_to_id("foo_bar")));
  EXPECT_EQ(gpt2->token_to_id("<|im_start|>"), -1);
  EXPECT_EQ(gpt2->token_to_id("Ġ"), gpt2->encode(" ")[0]);

  const auto llama = load("llama3");
  EXPECT_EQ(llama->bos_id(), llama->token_to_id("<|begin_of_text|>"));
  EXPECT_EQ(llama->eos_id(), llama->token_to_id("<|eot_id|>"));
  EXPECT_GE(llama->token_to_id("<|start_header_id|>"), 0);

  const auto qwen = load("qwen2");
  EXPECT_EQ(qwen->bos_id(), -1);  // "bos_token": null
  EXPECT_EQ(qwen->eos_id(), qwen->token_to_id("<|im_end|>"));
  EXPECT_EQ(qwen->pad_id(), qwen->token_to_id("<|endoftext|>"));
  EXPECT_FALSE(qwen->is_special(qwen->token_to_id("<think>")));

  // Without tokenizer_config.json: well-known names.
  const auto bare = BpeTokenizer::from_files(kFixtures + "/llama3/tokenizer.json");
  EXPECT_EQ(bare->eos_id(), bare->token_to_id("<|end_of_text|>"));
  EXPECT_EQ(bare->bos_id(), bare->token_to_id("<|begin_of_text|>"));
}

TEST(BpeTokenizer, InvalidUtf8RoundTripsAsBytes) {
  for (const char* name : {"gpt2", "llama3", "qwen2"}) {
    const auto tokenizer = load(name);
    const std::string text = "ok \xFF\xFE x\xC3 \xE2\x82 caf\xC3\xA9 \xED\xA0\x80 end\xF0";
    EXPECT_EQ(tokenizer->decode(tokenizer->encode(text)), text) << name;
  }
}

TEST(BpeTokenizer, RandomBytesRoundTrip) {
  std::mt19937 rng(1234);
  const std::string alphabet = "ab c\n\t'sl1 <|endoftext|>\xC3\xA9\xE4\xB8\xAD\xF0\x9F\x98\x80";
  for (const char* name : {"gpt2", "llama3"}) {
    const auto tokenizer = load(name);
    for (int trial = 0; trial < 300; ++trial) {
      std::string text;
      const int length = static_cast<int>(rng() % 40);
      for (int k = 0; k < length; ++k) {
        text.push_back(rng() % 4 == 0 ? static_cast<char>(rng() % 256) : alphabet[rng() % alphabet.size()]);
      }
      EXPECT_EQ(tokenizer->decode(tokenizer->encode(text)), text) << name << ": trial " << trial;
    }
  }
}

TEST(BpeTokenizer, LongWordsTakeTheHeapPath) {
  // Pre-tokens over 128 bytes are merged with a heap instead of rescanning; the fixture's 300-byte word
  // checks it against `tokenizers`, and a long mixed word must still round-trip.
  const auto tokenizer = load("llama3");
  int checked = 0;
  for (const json& c : expected()["tokenizers"]["llama3"]["cases"]) {
    if (c["text"].get<std::string>().size() >= 300) {
      EXPECT_EQ(tokenizer->encode(c["text"].get<std::string>()), ids_of(c["ids"]));
      ++checked;
    }
  }
  EXPECT_GT(checked, 0);
  std::string word;
  for (int k = 0; k < 60; ++k) word += k % 3 == 0 ? "model" : k % 3 == 1 ? "token" : "\xE4\xB8\xAD";
  EXPECT_EQ(tokenizer->decode(tokenizer->encode(word)), word);
}

TEST(BpeTokenizer, ConcurrentEncodesAgree) {
  const auto tokenizer = load("qwen2");
  const json& cases = expected()["tokenizers"]["qwen2"]["cases"];
  std::vector<int> failures(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 5; ++round) {
        for (const json& c : cases) {
          if (tokenizer->encode(c["text"].get<std::string>()) != ids_of(c["ids"])) ++failures[t];
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(failures[t], 0) << "thread " << t;
}

TEST(BpeTokenizer, DecodeRejectsUnknownIds) {
  const auto tokenizer = load("gpt2");
  EXPECT_THROW(tokenizer->decode({0, tokenizer->vocab_size()}), std::invalid_argument);
  EXPECT_THROW(tokenizer->decode({-1}), std::invalid_argument);
}

TEST(Nfc, MatchesPythonUnicodedata) {
  for (const json& c : expected()["nfc"]) {
    const std::string text = c["text"].get<std::string>();
    EXPECT_EQ(nfc_normalize(text), c["nfc"].get<std::string>()) << json(text).dump();
    if (is_nfc_quick(text)) {
      EXPECT_EQ(text, c["nfc"].get<std::string>());
    }
  }
}

TEST(Nfc, KnownCases) {
  EXPECT_EQ(nfc_normalize("plain ASCII"), "plain ASCII");
  EXPECT_EQ(nfc_normalize("e\xCC\x81"), "\xC3\xA9");                                 // e + acute -> é
  EXPECT_EQ(nfc_normalize("\xE1\x84\x92\xE1\x85\xA1\xE1\x86\xAB"), "\xED\x95\x9C");  // jamo -> 한
  EXPECT_EQ(nfc_normalize("\xE2\x84\xAB"), "\xC3\x85");                              // Angstrom sign -> Å
  EXPECT_EQ(nfc_normalize("\xE0\xA5\x98"), "\xE0\xA4\x95\xE0\xA4\xBC");  // excluded composite stays split
  EXPECT_EQ(nfc_normalize(std::string("a\xFF\xCC\x81", 4)), std::string("a\xFF\xCC\x81", 4));  // bytes kept
  EXPECT_TRUE(is_nfc_quick("already composed: \xC3\xA9 \xED\x95\x9C"));
  EXPECT_FALSE(is_nfc_quick("e\xCC\x81"));
  EXPECT_STREQ(unicode_tables_version(), expected()["unicode_version"].get<std::string>().c_str());
}

TEST(TokenizerFactory, MakesByteAndBpeTokenizers) {
  EXPECT_EQ(make_tokenizer("byte")->name(), "byte");
  const auto from_folder = make_tokenizer(kFixtures + "/qwen2");
  const auto from_file = make_tokenizer(kFixtures + "/qwen2/tokenizer.json");
  EXPECT_EQ(from_folder->encode("hello <|im_end|>"), from_file->encode("hello <|im_end|>"));
  EXPECT_EQ(from_file->eos_id(), from_file->token_to_id("<|im_end|>"));  // tokenizer_config.json beside it
  try {
    make_tokenizer("/no/such/tokenizer");
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("/no/such/tokenizer"), std::string::npos) << e.what();
  }
  EXPECT_THROW(make_tokenizer(kFixtures), std::runtime_error);  // a folder without tokenizer.json
}

// ---------------------------------------------------------------------------------------------------------
// Bad input: each broken tokenizer.json gives one clear error naming the file and the key.

class BadTokenizerFile : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("bpe_bad_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // Writes text as tokenizer.json and returns the error message of loading it.
  std::string error_of_text(const std::string& text) {
    const std::string path = (dir_ / "tokenizer.json").string();
    std::ofstream(path, std::ios::binary) << text;
    try {
      BpeTokenizer::from_files(path);
    } catch (const std::runtime_error& e) {
      const std::string message = e.what();
      EXPECT_NE(message.find(path), std::string::npos) << message;
      return message;
    }
    ADD_FAILURE() << "no error for " << text.substr(0, 200);
    return "";
  }
  std::string error_of(const json& value) { return error_of_text(value.dump()); }

  std::filesystem::path dir_;
};

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

TEST_F(BadTokenizerFile, MalformedJson) {
  EXPECT_TRUE(contains(error_of_text(""), "invalid JSON"));
  EXPECT_TRUE(contains(error_of_text("{\"model\": {\"type\": \"BPE\","), "invalid JSON"));
  EXPECT_TRUE(contains(error_of_text("[1, 2]"), "expected a JSON object"));
  std::string truncated = tokenizer_json("gpt2").dump();
  truncated.resize(truncated.size() / 2);
  EXPECT_TRUE(contains(error_of_text(truncated), "invalid JSON"));
}

TEST_F(BadTokenizerFile, MissingOrUnsupportedModel) {
  json config = tokenizer_json("gpt2");
  config.erase("model");
  EXPECT_TRUE(contains(error_of(config), "model: missing"));
  for (const char* type : {"Unigram", "WordPiece", "WordLevel"}) {
    json other = tokenizer_json("gpt2");
    other["model"]["type"] = type;
    const std::string message = error_of(other);
    EXPECT_TRUE(contains(message, std::string("\"") + type + "\" is not supported")) << message;
    EXPECT_TRUE(contains(message, "\"BPE\"")) << message;
  }
}

TEST_F(BadTokenizerFile, BadVocabAndMerges) {
  json config = tokenizer_json("gpt2");
  config["model"]["merges"].push_back("Ġzzqx Ġqqq");
  EXPECT_TRUE(contains(error_of(config), "is not in model.vocab"));

  config = tokenizer_json("llama3");
  config["model"]["merges"][3] = json::array({"a", "nonexistent-token"});
  const std::string message = error_of(config);
  EXPECT_TRUE(contains(message, "model.merges[3]")) << message;
  EXPECT_TRUE(contains(message, "nonexistent-token")) << message;

  config = tokenizer_json("gpt2");
  config["model"]["merges"][0] = "onlyone";
  EXPECT_TRUE(contains(error_of(config), "model.merges[0]"));
  config["model"]["merges"][0] = 17;
  EXPECT_TRUE(contains(error_of(config), "model.merges[0]"));

  config = tokenizer_json("gpt2");
  config["model"]["vocab"] = json::array();
  EXPECT_TRUE(contains(error_of(config), "model.vocab"));
  config = tokenizer_json("gpt2");
  config["model"]["vocab"]["bad"] = -3;
  EXPECT_TRUE(contains(error_of(config), "expected a token id"));
  config["model"]["vocab"]["bad"] = 4000000000LL;
  EXPECT_TRUE(contains(error_of(config), "expected a token id"));
  config = tokenizer_json("gpt2");
  config["model"].erase("merges");
  EXPECT_TRUE(contains(error_of(config), "model.merges"));
  config = tokenizer_json("gpt2");
  config["added_tokens"][0]["id"] = "zero";
  EXPECT_TRUE(contains(error_of(config), "added_tokens[0].id"));
}

TEST_F(BadTokenizerFile, UnsupportedPipelineParts) {
  json config = tokenizer_json("qwen2");
  config["normalizer"] = {{"type", "Lowercase"}};
  EXPECT_TRUE(contains(error_of(config), "\"Lowercase\" is not supported"));
  config["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "NFC"}}, {{"type", "NFKD"}}}}};
  EXPECT_TRUE(contains(error_of(config), "normalizer.normalizers[1].type"));

  config = tokenizer_json("gpt2");
  config["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "▁"}};
  EXPECT_TRUE(contains(error_of(config), "\"Metaspace\" is not supported"));
  config["pre_tokenizer"] = nullptr;
  EXPECT_TRUE(contains(error_of(config), "pre_tokenizer: missing"));

  config = tokenizer_json("llama3");
  config["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  EXPECT_TRUE(contains(error_of(config), "cannot compile regex"));
  config = tokenizer_json("llama3");
  config["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed";
  EXPECT_TRUE(contains(error_of(config), "\"Isolated\""));
  config = tokenizer_json("llama3");
  config["pre_tokenizer"]["pretokenizers"].erase(1);  // no ByteLevel
  EXPECT_TRUE(contains(error_of(config), "no ByteLevel"));

  config = tokenizer_json("gpt2");
  config["decoder"] = {{"type", "WordPiece"}};
  EXPECT_TRUE(contains(error_of(config), "decoder.type"));
  config = tokenizer_json("gpt2");
  config["model"]["dropout"] = 0.1;
  EXPECT_TRUE(contains(error_of(config), "model.dropout"));
}

TEST_F(BadTokenizerFile, BadTokenizerConfig) {
  const std::string json_path = (dir_ / "tokenizer.json").string();
  const std::string config_path = (dir_ / "tokenizer_config.json").string();
  std::ofstream(json_path) << tokenizer_json("gpt2").dump();
  std::ofstream(config_path) << R"({"eos_token": "<|not_a_token|>"})";
  try {
    BpeTokenizer::from_files(json_path, config_path);
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_TRUE(contains(e.what(), "eos_token")) << e.what();
  }
  std::ofstream(config_path) << "{broken";
  EXPECT_THROW(BpeTokenizer::from_files(json_path, config_path), std::runtime_error);
}

// Random edits of a valid tokenizer.json (a value replaced by one of another type, or a key removed) must
// load, or fail with std::runtime_error; encoding with whatever loads must not crash.
TEST_F(BadTokenizerFile, RandomMutationsFailCleanly) {
  const json base = tokenizer_json("llama3");
  std::vector<json::json_pointer> paths;
  const json flat = base.flatten();
  for (auto it = flat.begin(); it != flat.end(); ++it) {
    json::json_pointer pointer(it.key());
    // Keep the sample small: every structural key, and a few vocabulary and merge entries.
    const std::string key = it.key();
    if ((key.rfind("/model/vocab/", 0) == 0 || key.rfind("/model/merges/", 0) == 0) &&
        paths.size() % 50 != 0) {
      paths.push_back(pointer);
      continue;
    }
    paths.push_back(pointer);
    while (!pointer.empty()) {
      pointer = pointer.parent_pointer();
      paths.push_back(pointer);
    }
  }
  const std::vector<json> replacements = {
      nullptr, true, -1, 1e12, 3, "x", "Ġ", json::array(), json::object(), json::array({"a", "b"})};
  std::mt19937 rng(99);
  int loaded = 0, rejected = 0;
  for (int trial = 0; trial < 150; ++trial) {
    json mutated = base;
    for (int edits = 1 + static_cast<int>(rng() % 2); edits > 0; --edits) {
      const json::json_pointer& target = paths[rng() % paths.size()];
      if (target.empty() || !mutated.contains(target)) continue;
      if (rng() % 4 == 0) {
        json& parent = mutated[target.parent_pointer()];
        if (parent.is_object()) parent.erase(target.back());
      } else {
        mutated[target] = replacements[rng() % replacements.size()];
      }
    }
    try {
      const BpeTokenizer tokenizer(mutated, json(), "mutated");
      ++loaded;
      try {
        const auto ids = tokenizer.encode("Hello world, 123 <|eot_id|> \xC3\xA9");
        (void)tokenizer.decode(ids);
      } catch (const std::runtime_error&) {
      }
    } catch (const std::runtime_error&) {
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 0);
  EXPECT_EQ(loaded + rejected, 150);
}

}  // namespace
}  // namespace llm::data
