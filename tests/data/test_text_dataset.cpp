// Text and JSONL readers, every bad-data error (naming file and line), skip counting, dataset specs and
// the files a spec resolves to.
#include <gtest/gtest.h>

#include <unistd.h>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>

#include "data/text_dataset.h"

namespace {

namespace fs = std::filesystem;
using llm::data::DatasetSpec;
using llm::data::DocumentFile;

// A fresh folder per test, removed afterwards.
class TextDatasetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("llm_text_dataset_" + std::string(info->name()) + "_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write(const std::string& name, const std::string& content) {
    const fs::path path = dir_ / name;
    fs::create_directories(path.parent_path());
    std::ofstream(path, std::ios::binary) << content;
    return path.string();
  }

  // The message of the std::runtime_error that reading `content` as JSONL raises.
  std::string jsonl_error(const std::string& content) {
    const std::string path = write("bad.jsonl", content);
    try {
      llm::data::read_jsonl_documents(path, false);
    } catch (const std::runtime_error& error) {
      return error.what();
    }
    return "no error";
  }

  fs::path dir_;
};

TEST_F(TextDatasetTest, TextFileWithoutSeparatorIsOneDocument) {
  const std::string path = write("a.txt", "line one\nline two\n");
  EXPECT_EQ(llm::data::read_text_documents(path), std::vector<std::string>{"line one\nline two\n"});
  const std::string raw = write("raw.txt", std::string("no newline \xff\x00 end", 17));
  EXPECT_EQ(llm::data::read_text_documents(raw),
            std::vector<std::string>{std::string("no newline \xff\x00 end", 17)});
}

TEST_F(TextDatasetTest, TextFileSplitsOnSeparatorLines) {
  const std::string path =
      write("a.txt",
            "first\ndoc\n<|endoftext|>\nsecond <|endoftext|> inline\n<|endoftext|>\r\n<|endoftext|>\nthird");
  const std::vector<std::string> expected = {"first\ndoc\n", "second <|endoftext|> inline\n", "third"};
  EXPECT_EQ(llm::data::read_text_documents(path), expected);
}

TEST_F(TextDatasetTest, JsonlReadsTextFieldsAndSkipsBlankLines) {
  const std::string path = write(
      "a.jsonl",
      "{\"text\": \"hello\"}\n\n   \r\n{\"id\": 3, \"text\": \"w\\u00f6rld\\n\"}\r\n{\"text\": \"\"}\n");
  const DocumentFile file = llm::data::read_jsonl_documents(path, false);
  EXPECT_EQ(file.documents, (std::vector<std::string>{"hello", "w\xc3\xb6rld\n"}));
  EXPECT_EQ(file.skipped_lines, 0);
}

TEST_F(TextDatasetTest, JsonlBadLinesNameFileAndLine) {
  const std::string good = "{\"text\": \"ok\"}\n\n";
  const struct {
    std::string line;
    std::string found;
  } cases[] = {
      {"not json at all", "invalid JSON"},
      {"{\"text\": \"unterminated", "invalid JSON"},
      {"[1, 2]", "a JSON array"},
      {"\"just a string\"", "a JSON string"},
      {"{\"content\": \"x\"}", "an object without \"text\" (keys: content)"},
      {"{}", "an object without \"text\" (keys: none)"},
      {"{\"text\": 5}", "\"text\" of type number"},
      {"{\"text\": null}", "\"text\" of type null"},
      {"{\"text\": [\"a\"]}", "\"text\" of type array"},
  };
  for (const auto& c : cases) {
    const std::string message = jsonl_error(good + c.line + "\n" + good);
    EXPECT_NE(
        message.find("bad.jsonl:3: expected a JSON object with a string field \"text\", found " + c.found),
        std::string::npos)
        << message;
  }
}

TEST_F(TextDatasetTest, JsonlSkipsAndCountsBadLinesWhenAllowed) {
  const std::string path = write("a.jsonl", "{\"text\": \"a\"}\noops\n{\"text\": 1}\n{\"text\": \"b\"}\n");
  const DocumentFile file = llm::data::read_jsonl_documents(path, true);
  EXPECT_EQ(file.documents, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(file.skipped_lines, 2);
  EXPECT_NE(file.first_skipped_error.find("a.jsonl:2:"), std::string::npos) << file.first_skipped_error;
}

// A small fuzz: lines spliced from JSON fragments and random bytes either parse or raise runtime_error.
TEST_F(TextDatasetTest, RandomJsonlLinesNeverCrash) {
  const std::vector<std::string> pieces = {"{",    "}",    "[",     "]",       "\"text\"",     ":",
                                           ",",    "\"",   "1e999", "null",    "\\u00",        "\xff",
                                           "\xc3", "true", " ",     "\"abc\"", "{\"text\": \""};
  std::mt19937 rng(2);
  int documents = 0;
  int rejected = 0;
  for (int trial = 0; trial < 300; ++trial) {
    std::string line;
    for (int n = 1 + rng() % 8; n > 0; --n) line += pieces[rng() % pieces.size()];
    if (trial % 3 == 0) line = "{\"text\": \"" + line + "\"}";
    try {
      documents += static_cast<int>(
          llm::data::read_jsonl_documents(write("f.jsonl", line + "\n"), false).documents.size());
    } catch (const std::runtime_error& error) {
      EXPECT_NE(std::string(error.what()).find("f.jsonl:1: expected"), std::string::npos) << error.what();
      ++rejected;
    }
  }
  EXPECT_GT(documents, 0);
  EXPECT_GT(rejected, 0);
}

TEST_F(TextDatasetTest, MissingFileIsNamed) {
  const std::string missing = (dir_ / "missing.jsonl").string();
  for (int kind = 0; kind < 2; ++kind) {
    try {
      if (kind == 0) llm::data::read_jsonl_documents(missing, false);
      if (kind == 1) llm::data::read_text_documents((dir_ / "missing.txt").string());
      FAIL() << "expected an error";
    } catch (const std::runtime_error& error) {
      EXPECT_NE(std::string(error.what()).find("missing."), std::string::npos) << error.what();
    }
  }
  EXPECT_THROW(llm::data::read_documents(write("a.csv", "x"), false), std::runtime_error);
}

TEST(DatasetSpec, DefaultsAndExplicitFields) {
  DatasetSpec spec = llm::data::parse_dataset_spec("data/web");
  EXPECT_EQ(spec.path, "data/web");
  EXPECT_EQ(spec.subset, "");
  EXPECT_EQ(spec.weight, 1.0);
  EXPECT_EQ(spec.spec, "data/web");

  spec = llm::data::parse_dataset_spec("  data/web |  en ");
  EXPECT_EQ(spec.path, "data/web");
  EXPECT_EQ(spec.subset, "en");
  EXPECT_EQ(spec.weight, 1.0);

  spec = llm::data::parse_dataset_spec("data/web | en | 2.5");
  EXPECT_EQ(spec.subset, "en");
  EXPECT_EQ(spec.weight, 2.5);

  spec = llm::data::parse_dataset_spec("builtin:arithmetic | | 3");
  EXPECT_EQ(spec.path, "builtin:arithmetic");
  EXPECT_EQ(spec.subset, "");
  EXPECT_EQ(spec.weight, 3.0);

  spec = llm::data::parse_dataset_spec("a.jsonl | | ");
  EXPECT_EQ(spec.weight, 1.0);
}

TEST(DatasetSpec, BadSpecsNameTheSpec) {
  for (const std::string bad : {"a | | abc", "a | | 0", "a | | -1", "a | | 1.5x", "a | | nan", "a | | inf",
                                "", " | en", "a | b | 1 | 2"}) {
    try {
      llm::data::parse_dataset_spec(bad);
      FAIL() << "expected an error for '" << bad << "'";
    } catch (const std::invalid_argument& error) {
      EXPECT_NE(std::string(error.what()).find("'" + bad + "'"), std::string::npos) << error.what();
    }
  }
}

TEST_F(TextDatasetTest, SpecFilesAreSortedAndFiltered) {
  write("corpus/b.jsonl", "");
  write("corpus/a.txt", "");
  write("corpus/c.bin", "");
  write("corpus/notes.md", "");
  write("corpus/en/x.txt", "");
  const std::string corpus = (dir_ / "corpus").string();
  EXPECT_EQ(llm::data::dataset_files(llm::data::parse_dataset_spec(corpus)),
            (std::vector<std::string>{corpus + "/a.txt", corpus + "/b.jsonl", corpus + "/c.bin"}));
  EXPECT_EQ(llm::data::dataset_files(llm::data::parse_dataset_spec(corpus + " | en")),
            (std::vector<std::string>{corpus + "/en/x.txt"}));
  EXPECT_EQ(llm::data::dataset_files(llm::data::parse_dataset_spec(corpus + "/a.txt")),
            (std::vector<std::string>{corpus + "/a.txt"}));
  EXPECT_THROW(llm::data::dataset_files(llm::data::parse_dataset_spec(corpus + " | fr")), std::runtime_error);
  EXPECT_THROW(llm::data::dataset_files(llm::data::parse_dataset_spec(corpus + "/a.txt | en")),
               std::runtime_error);
  EXPECT_THROW(llm::data::dataset_files(llm::data::parse_dataset_spec(corpus + "/nope")), std::runtime_error);
  write("empty/readme.md", "");
  EXPECT_THROW(llm::data::dataset_files(llm::data::parse_dataset_spec((dir_ / "empty").string())),
               std::runtime_error);
}

}  // namespace
