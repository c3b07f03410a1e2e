// SFT data: the TRL JSONL formats, loss masks through the chat template, truncation counting, bad-line
// errors naming FILE:LINE, padded and best-fit-decreasing packed batches (positions, doc_ids, padding
// efficiency), per-epoch shuffling, validation splits and exact resume.
#include <gtest/gtest.h>

#include <unistd.h>
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "data/byte_tokenizer.h"
#include "data/sft_dataset.h"
#include "data/sft_loader.h"
#include "data/tokenizer_factory.h"

namespace {

namespace fs = std::filesystem;
using namespace llm::data;

const ByteTokenizer kTokenizer;

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() /
            ("llm_sft_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  std::string write(const std::string& name, const std::string& text) const {
    const std::string file = (path_ / name).string();
    std::ofstream(file, std::ios::binary) << text;
    return file;
  }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

std::shared_ptr<SftDataset> tokenize(const std::vector<std::vector<ChatMessage>>& conversations,
                                     const SftOptions& options = {}) {
  std::vector<SftExample> examples;
  for (size_t i = 0; i < conversations.size(); ++i)
    examples.push_back({conversations[i], "ex" + std::to_string(i)});
  return tokenize_sft_examples("test", examples, kTokenizer, chat_template_by_name("chatml"), options);
}

// The text of the labelled (trained) tokens of example e, with "|" between separate labelled runs.
std::string trained_text(const SftDataset& d, int64_t e) {
  std::string out;
  bool in_run = false;
  for (int64_t i = d.example_begin[e]; i < d.example_begin[e + 1]; ++i) {
    if (d.labels[i] == kIgnoreIndex) {
      in_run = false;
      continue;
    }
    if (!in_run && !out.empty()) out += "|";
    in_run = true;
    out += kTokenizer.decode({d.labels[i]});
  }
  return out;
}

std::string example_text(const SftDataset& d, int64_t e) {
  return kTokenizer.decode(
      std::vector<int32_t>(d.ids.begin() + d.example_begin[e], d.ids.begin() + d.example_begin[e + 1]));
}

// A dataset of the given lengths without a tokenizer: example e holds ids 1000*e + t, all trained.
std::shared_ptr<SftDataset> synthetic(const std::vector<int64_t>& lengths, int max_length) {
  auto d = std::make_shared<SftDataset>();
  d->name = "synthetic";
  d->max_length = max_length;
  for (size_t e = 0; e < lengths.size(); ++e) {
    for (int64_t t = 0; t < lengths[e]; ++t) {
      d->ids.push_back(static_cast<int32_t>(1000 * e + t));
      d->labels.push_back(static_cast<int32_t>(1000 * e + t));
    }
    d->example_begin.push_back(static_cast<int64_t>(d->ids.size()));
    d->example_source.push_back("synthetic:" + std::to_string(e));
  }
  d->stats.examples = d->num_examples();
  return d;
}

void expect_same(const SftBatch& a, const SftBatch& b) {
  EXPECT_EQ(a.B, b.B);
  EXPECT_EQ(a.T, b.T);
  EXPECT_EQ(a.inputs, b.inputs);
  EXPECT_EQ(a.targets, b.targets);
  EXPECT_EQ(a.positions, b.positions);
  EXPECT_EQ(a.doc_ids, b.doc_ids);
  EXPECT_EQ(a.num_target_tokens, b.num_target_tokens);
  EXPECT_EQ(a.num_real_tokens, b.num_real_tokens);
  EXPECT_EQ(a.state_after, b.state_after);
}

// ---- formats ----

TEST(SftFormats, EveryFormatParses) {
  TempDir dir;
  const std::string file = dir.write(
      "data.jsonl",
      R"({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, )"
      R"({"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}, )"
      R"({"role": "assistant", "content": "A2"}]})"
      "\n\n"
      R"({"prompt": "12+35=", "completion": "47"})"
      "\n"
      R"({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]})"
      "\n"
      R"({"instruction": "Translate", "input": "chat", "response": "cat"})"
      "\n"
      R"({"instruction": "Say hi", "response": "hi"})"
      "\n"
      R"({"instruction": "Say hi", "input": "", "response": "hi"})"
      "\n");
  const SftFile read = read_sft_jsonl(file, false);
  ASSERT_EQ(read.examples.size(), 6u);
  EXPECT_EQ(read.skipped_lines, 0);
  const auto& m0 = read.examples[0].messages;
  ASSERT_EQ(m0.size(), 5u);
  EXPECT_EQ(m0[0].role, "system");
  EXPECT_EQ(m0[4].content, "A2");
  EXPECT_EQ(read.examples[0].source, file + ":1");
  EXPECT_EQ(read.examples[1].source, file + ":3");  // the blank line counts
  const std::vector<ChatMessage> pc = read.examples[1].messages;
  ASSERT_EQ(pc.size(), 2u);
  EXPECT_EQ(pc[0].role, "user");
  EXPECT_EQ(pc[0].content, "12+35=");
  EXPECT_EQ(pc[1].role, "assistant");
  EXPECT_EQ(pc[1].content, "47");
  EXPECT_EQ(read.examples[2].messages[1].content, "yo");
  EXPECT_EQ(read.examples[3].messages[0].content, "Translate\n\nchat");
  EXPECT_EQ(read.examples[3].messages[1].content, "cat");
  EXPECT_EQ(read.examples[4].messages[0].content, "Say hi");
  EXPECT_EQ(read.examples[5].messages[0].content, "Say hi");  // empty input adds nothing
}

TEST(SftFormats, BadLinesNameFileAndLine) {
  TempDir dir;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{not json", "invalid JSON"},
      {"[1, 2]", "a JSON array"},
      {R"({"text": "x"})", "keys: text"},
      {R"({"messages": "hi"})", "a JSON string"},
      {R"({"messages": []})", "an empty list"},
      {R"({"messages": [{"role": "user", "content": 3}]})", "a JSON number"},
      {R"({"messages": [{"role": "user"}]})", "no \"content\""},
      {R"({"messages": [{"role": "tool", "content": "x"}]})", "\"tool\""},
      {R"({"messages": [{"role": "user", "content": "x"}]})", "at least one assistant turn"},
      {R"({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]})", "empty"},
      {R"({"prompt": "x", "completion": ""})", "an empty string"},
      {R"({"prompt": "x"})", "no \"completion\""},
      {R"({"prompt": 1, "completion": "y"})", "a JSON number"},
      {R"({"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "user", "content": "y"}]})",
       "role \"user\""},
      {R"({"instruction": "x", "response": 5})", "a JSON number"},
      {R"({"instruction": "x", "input": 5, "response": "y"})", "a JSON number"},
      {R"({"response": "y"})", "no \"instruction\""},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string good = R"({"prompt": "a", "completion": "b"})";
    const std::string file =
        dir.write("bad" + std::to_string(i) + ".jsonl", good + "\n" + good + "\n" + cases[i].first + "\n");
    try {
      read_sft_jsonl(file, false);
      ADD_FAILURE() << "no error for " << cases[i].first;
    } catch (const std::runtime_error& e) {
      const std::string message = e.what();
      EXPECT_EQ(message.rfind(file + ":3: expected ", 0), 0u) << message;
      EXPECT_NE(message.find(cases[i].second), std::string::npos) << message;
    }
    const SftFile skipped = read_sft_jsonl(file, true);
    EXPECT_EQ(skipped.examples.size(), 2u);
    EXPECT_EQ(skipped.skipped_lines, 1);
    EXPECT_EQ(skipped.first_skipped_error.rfind(file + ":3: ", 0), 0u);
  }
  EXPECT_THROW(read_sft_jsonl(dir.write("x.jsonl", "") + ".missing", false), std::runtime_error);
}

TEST(SftFormats, LoadDatasetCountsSkippedLines) {
  TempDir dir;
  const std::string file = dir.write("d.jsonl",
                                     "oops\n"
                                     R"({"prompt": "1+1=", "completion": "2"})"
                                     "\n[]\n");
  SftOptions options;
  options.skip_bad_lines = true;
  const auto d = load_sft_dataset(file, kTokenizer, options);
  EXPECT_EQ(d->num_examples(), 1);
  EXPECT_EQ(d->stats.skipped_lines, 2);
  EXPECT_EQ(d->stats.first_skipped_error.rfind(file + ":1: ", 0), 0u);
  options.skip_bad_lines = false;
  EXPECT_THROW(load_sft_dataset(file, kTokenizer, options), std::runtime_error);
  EXPECT_THROW(load_sft_dataset(dir.write("d.txt", "x"), kTokenizer, options), std::runtime_error);
}

// ---- masks ----

TEST(SftMasks, PromptTokensAreIgnoredAndEndOfTurnIsTrained) {
  const auto d = tokenize({{{"user", "12+35="}, {"assistant", "47"}}});
  ASSERT_EQ(d->num_examples(), 1);
  EXPECT_EQ(example_text(*d, 0), "<|im_start|>user\n12+35=<|im_end|>\n<|im_start|>assistant\n47<|im_end|>\n");
  EXPECT_EQ(trained_text(*d, 0), "47<|im_end|>");
  // The end-of-turn token itself carries a label; the newline after it does not.
  const int64_t end = d->example_begin[1];
  EXPECT_EQ(d->ids[end - 2], ByteTokenizer::kImEnd);
  EXPECT_EQ(d->labels[end - 2], ByteTokenizer::kImEnd);
  EXPECT_EQ(d->labels[end - 1], kIgnoreIndex);
  EXPECT_EQ(d->stats.target_tokens, 3);
  EXPECT_EQ(d->stats.tokens, d->length(0));
}

TEST(SftMasks, EveryAssistantTurnIsTrainedInMultiTurn) {
  const auto d = tokenize({{{"system", "S"},
                            {"user", "U1"},
                            {"assistant", "A1"},
                            {"user", "U2"},
                            {"assistant", "A2"},
                            {"user", "U3"},
                            {"assistant", "A3"}}});
  EXPECT_EQ(trained_text(*d, 0), "A1<|im_end|>|A2<|im_end|>|A3<|im_end|>");
}

TEST(SftMasks, FullSequenceLossLabelsEveryToken) {
  SftOptions options;
  options.completion_only_loss = false;
  const auto d = tokenize({{{"user", "hi"}, {"assistant", "yo"}}}, options);
  EXPECT_EQ(d->labels, d->ids);
  EXPECT_EQ(d->stats.target_tokens, d->length(0) - 1);
}

TEST(SftMasks, DropSystemPrompt) {
  const std::vector<ChatMessage> chat = {{"system", "Be brief."}, {"user", "hi"}, {"assistant", "yo"}};
  const auto kept = tokenize({chat});
  EXPECT_NE(example_text(*kept, 0).find("<|im_start|>system\nBe brief."), std::string::npos);
  SftOptions options;
  options.drop_system_prompt = true;
  const auto dropped = tokenize({chat}, options);
  EXPECT_EQ(example_text(*dropped, 0),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n");
  EXPECT_EQ(trained_text(*dropped, 0), "yo<|im_end|>");
}

TEST(SftMasks, Qwen3TemplateKeepsTheEmptyThinkBlockInThePrompt) {
  std::vector<SftExample> examples = {{{{"user", "hi"}, {"assistant", "yo"}}, "q"}};
  const auto d =
      tokenize_sft_examples("q", examples, kTokenizer, chat_template_by_name("qwen3"), SftOptions{});
  EXPECT_EQ(example_text(*d, 0),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nyo<|im_end|>\n");
  EXPECT_EQ(trained_text(*d, 0), "yo<|im_end|>");
}

TEST(SftMasks, TemplateFromTheTokenizerFolder) {
  TempDir dir;
  const std::string file = dir.write(
      "chat.jsonl",
      R"({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi there"}, )"
      R"({"role": "assistant", "content": "Hello friend"}, {"role": "user", "content": "Bye"}, )"
      R"({"role": "assistant", "content": "Goodbye"}]})"
      "\n");
  const std::string folder = std::string(LLM_SOURCE_DIR) + "/tests/fixtures/tokenizers/";
  struct Case {
    std::string tokenizer, end_of_turn, first;
  };
  for (const Case& c :
       {Case{"llama3", "<|eot_id|>", "<|begin_of_text|>"}, Case{"qwen2", "<|im_end|>", "<|im_start|>"}}) {
    const auto tokenizer = make_tokenizer(folder + c.tokenizer);
    SftOptions options;
    options.chat_template = folder + c.tokenizer;
    const auto d = load_sft_dataset(file, *tokenizer, options);
    ASSERT_EQ(d->num_examples(), 1);
    EXPECT_EQ(tokenizer->decode({d->ids[0]}), c.first);
    std::string trained;
    for (size_t i = 0; i < d->ids.size(); ++i) {
      if (d->labels[i] == kIgnoreIndex) continue;
      if (i > 0 && d->labels[i - 1] == kIgnoreIndex && !trained.empty()) trained += "|";
      trained += tokenizer->decode({d->labels[i]});
    }
    EXPECT_EQ(trained, "Hello friend" + c.end_of_turn + "|Goodbye" + c.end_of_turn) << c.tokenizer;
  }
}

TEST(SftMasks, TruncationIsCountedAndExamplesWithoutTargetsAreDropped) {
  // Byte tokens: "<|im_start|>user\na<|im_end|>\n" is 9, "<|im_start|>assistant\n" 11.
  const std::vector<ChatMessage> short_chat = {{"user", "a"}, {"assistant", "b"}};
  const std::vector<ChatMessage> long_answer = {{"user", "a"}, {"assistant", std::string(50, 'x')}};
  const std::vector<ChatMessage> long_prompt = {{"user", std::string(100, 'p')}, {"assistant", "b"}};
  SftOptions options;
  options.max_length = 30;
  const auto d = tokenize({short_chat, long_answer, long_prompt}, options);
  EXPECT_EQ(d->num_examples(), 2);
  EXPECT_EQ(d->stats.examples, 2);
  EXPECT_EQ(d->stats.truncated, 1);
  EXPECT_EQ(d->stats.dropped_no_target, 1);
  EXPECT_EQ(d->length(1), 30);
  EXPECT_EQ(d->example_source[1], "ex1");
  // The kept part of the long answer is still trained (everything after "assistant\n").
  EXPECT_EQ(trained_text(*d, 1), std::string(30 - 9 - 11, 'x'));
  options.max_length = 1;
  EXPECT_THROW(tokenize({short_chat}, options), std::invalid_argument);
}

TEST(SftMasks, VocabularyAndConversationErrorsNameTheExample) {
  SftOptions options;
  options.model_vocab_size = 256;  // the chat specials (258, 259) do not fit
  try {
    tokenize({{{"user", "a"}, {"assistant", "b"}}}, options);
    ADD_FAILURE() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("ex0: token id 258", 0), 0u) << e.what();
  }
  options = {};
  options.drop_system_prompt = true;
  try {
    tokenize({{{"user", "a"}, {"assistant", "b"}}, {{"system", "s"}}}, options);
    ADD_FAILURE() << "no error";
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind("ex1: expected at least one assistant turn", 0), 0u) << e.what();
  }
}

TEST(SftMasks, BuiltinArithmeticCorpus) {
  const auto d = load_sft_dataset(std::string(kBuiltinArithmeticSft), kTokenizer);
  EXPECT_EQ(d->num_examples(), 4096);
  const std::string text = example_text(*d, 0);
  EXPECT_EQ(text.rfind("<|im_start|>system\n" + std::string(kArithmeticSftSystem), 0), 0u) << text;
  const auto problems = builtin_arithmetic_sft_examples();
  EXPECT_EQ(trained_text(*d, 0), problems[0].messages[2].content + "<|im_end|>");
  SftOptions options;
  options.drop_system_prompt = true;
  const auto dropped = load_sft_dataset(std::string(kBuiltinArithmeticSft), kTokenizer, options);
  EXPECT_EQ(example_text(*dropped, 0).rfind("<|im_start|>user\n" + problems[0].messages[1].content, 0), 0u);
  EXPECT_LT(dropped->stats.tokens, d->stats.tokens);
  EXPECT_EQ(dropped->stats.target_tokens, d->stats.target_tokens);
}

// ---- batches ----

TEST(SftBatches, PadToLongestWithShiftedTargets) {
  const auto d = tokenize({{{"user", "a"}, {"assistant", "b"}},
                           {{"user", "longer prompt"}, {"assistant", "answer"}},
                           {{"user", "mid"}, {"assistant", "c"}}});
  SftLoaderOptions options;
  options.B = 3;
  options.shuffle = false;
  options.pad_id = kTokenizer.pad_id();
  SftLoader loader(d, options);
  EXPECT_EQ(loader.steps_per_epoch(), 1);
  const SftBatch batch = loader.next();
  const int64_t longest = std::max({d->length(0), d->length(1), d->length(2)});
  ASSERT_EQ(batch.T, longest);
  ASSERT_LT(batch.T, d->max_length);  // padded to the batch, not to max_length
  int64_t real = 0, targets = 0;
  for (int r = 0; r < 3; ++r) {
    const int64_t length = d->length(r);
    const int64_t begin = d->example_begin[r];
    for (int t = 0; t < batch.T; ++t) {
      const size_t cell = static_cast<size_t>(r) * batch.T + t;
      if (t < length) {
        EXPECT_EQ(batch.inputs[cell], d->ids[begin + t]);
        EXPECT_EQ(batch.targets[cell], t + 1 < length ? d->labels[begin + t + 1] : kIgnoreIndex);
        EXPECT_EQ(batch.positions[cell], t);
        EXPECT_EQ(batch.doc_ids[cell], 0);
      } else {
        EXPECT_EQ(batch.inputs[cell], ByteTokenizer::kPad);
        EXPECT_EQ(batch.targets[cell], kIgnoreIndex);
        EXPECT_EQ(batch.doc_ids[cell], -1);
      }
      if (batch.targets[cell] != kIgnoreIndex) ++targets;
    }
    real += length;
  }
  EXPECT_EQ(batch.num_real_tokens, real);
  EXPECT_EQ(batch.num_target_tokens, targets);
  EXPECT_EQ(batch.num_target_tokens, d->stats.target_tokens);
  EXPECT_DOUBLE_EQ(batch.padding_efficiency(), static_cast<double>(real) / (3.0 * longest));
}

TEST(SftBatches, LastBatchOfAnEpochHasEmptyRows) {
  const auto d = synthetic({3, 5, 2, 4, 6}, 8);
  SftLoaderOptions options;
  options.B = 2;
  options.shuffle = false;
  SftLoader loader(d, options);
  EXPECT_EQ(loader.steps_per_epoch(), 3);
  EXPECT_DOUBLE_EQ(loader.next().padding_efficiency(), 8.0 / 10.0);  // {3, 5}: T = 5
  EXPECT_DOUBLE_EQ(loader.next().padding_efficiency(), 6.0 / 8.0);   // {2, 4}: T = 4
  const SftBatch last = loader.next();                               // {6, empty}: T = 6
  EXPECT_EQ(last.T, 6);
  EXPECT_DOUBLE_EQ(last.padding_efficiency(), 6.0 / 12.0);
  EXPECT_EQ(last.num_target_tokens, 5);
  EXPECT_EQ(loader.epoch(), 1);
  EXPECT_EQ(loader.step_in_epoch(), 0);
}

TEST(SftBatches, BestFitDecreasing) {
  const auto bins = best_fit_decreasing({7, 5, 4, 3, 1}, 8);
  const std::vector<std::vector<int64_t>> expected = {{0, 4}, {1, 3}, {2}};
  EXPECT_EQ(bins, expected);
  // Shuffled input order gives the same bins of lengths.
  const auto again = best_fit_decreasing({3, 1, 7, 4, 5}, 8);
  const std::vector<std::vector<int64_t>> expected_again = {{2, 1}, {4, 0}, {3}};
  EXPECT_EQ(again, expected_again);
  EXPECT_THROW(best_fit_decreasing({9}, 8), std::invalid_argument);
  EXPECT_THROW(best_fit_decreasing({0}, 8), std::invalid_argument);
}

TEST(SftBatches, PackedBatchesRestartPositionsAndMarkDocuments) {
  const auto d = synthetic({7, 5, 4, 3, 1}, 8);
  SftLoaderOptions options;
  options.B = 3;
  options.packing = true;
  options.shuffle = false;
  options.pad_id = 257;
  SftLoader loader(d, options);
  EXPECT_EQ(loader.bins_per_epoch(), 3);
  EXPECT_EQ(loader.steps_per_epoch(), 1);
  const SftBatch batch = loader.next();
  ASSERT_EQ(batch.T, 8);
  const std::vector<int32_t> positions = {0, 1, 2, 3, 4, 5, 6, 0, 0, 1, 2, 3,
                                          4, 0, 1, 2, 0, 1, 2, 3, 0, 0, 0, 0};
  const std::vector<int32_t> doc_ids = {0, 0, 0, 0, 0, 0, 0, 1, 0,  0,  0,  0,
                                        0, 1, 1, 1, 0, 0, 0, 0, -1, -1, -1, -1};
  EXPECT_EQ(batch.positions, positions);
  EXPECT_EQ(batch.doc_ids, doc_ids);
  const std::vector<int32_t> inputs = {0,    1,    2,    3,    4,    5,    6,    4000, 1000, 1001, 1002, 1003,
                                       1004, 3000, 3001, 3002, 2000, 2001, 2002, 2003, 257,  257,  257,  257};
  EXPECT_EQ(batch.inputs, inputs);
  // The last token of every document has no target: documents never predict their neighbours.
  const std::vector<int32_t> targets = {1,    2,    3,    4,    5,    6,    -100, -100,
                                        1001, 1002, 1003, 1004, -100, 3001, 3002, -100,
                                        2001, 2002, 2003, -100, -100, -100, -100, -100};
  EXPECT_EQ(batch.targets, targets);
  EXPECT_EQ(batch.num_real_tokens, 20);
  EXPECT_EQ(batch.num_target_tokens, 15);
  EXPECT_DOUBLE_EQ(batch.padding_efficiency(), 20.0 / 24.0);
}

// Splits each row of a packed batch into its documents, by doc_ids.
std::vector<std::vector<int32_t>> documents_of(const SftBatch& batch) {
  std::vector<std::vector<int32_t>> docs;
  for (int r = 0; r < batch.B; ++r) {
    int32_t current = -1;
    for (int t = 0; t < batch.T; ++t) {
      const size_t cell = static_cast<size_t>(r) * batch.T + t;
      const int32_t doc = batch.doc_ids[cell];
      if (doc < 0) break;
      if (doc != current) {
        EXPECT_EQ(doc, current + 1);
        EXPECT_EQ(batch.positions[cell], 0);
        docs.emplace_back();
        current = doc;
      }
      EXPECT_EQ(batch.positions[cell], static_cast<int32_t>(docs.back().size()));
      docs.back().push_back(batch.inputs[cell]);
    }
  }
  return docs;
}

TEST(SftBatches, PackingKeepsEveryExampleWholeOncePerEpoch) {
  std::vector<int64_t> lengths;
  for (int i = 0; i < 60; ++i) lengths.push_back(1 + (i * 37) % 32);
  const auto d = synthetic(lengths, 32);
  SftLoaderOptions options;
  options.B = 4;
  options.packing = true;
  options.seed = 7;
  SftLoader loader(d, options);
  for (int epoch = 0; epoch < 2; ++epoch) {
    std::multiset<int64_t> seen;
    int64_t real = 0;
    for (int64_t s = 0; s < loader.steps_per_epoch(); ++s) {
      const SftBatch batch = loader.next();
      EXPECT_LE(batch.T, 32);
      real += batch.num_real_tokens;
      for (const auto& doc : documents_of(batch)) {
        const int64_t e = doc[0] / 1000;
        ASSERT_EQ(static_cast<int64_t>(doc.size()), lengths[e]);
        for (size_t t = 0; t < doc.size(); ++t) EXPECT_EQ(doc[t], 1000 * e + static_cast<int64_t>(t));
        seen.insert(e);
      }
    }
    EXPECT_EQ(seen.size(), lengths.size());
    EXPECT_EQ(std::set<int64_t>(seen.begin(), seen.end()).size(), lengths.size());
    EXPECT_EQ(loader.epoch(), epoch + 1);
  }
}

TEST(SftBatches, ShufflingIsSeededPerEpoch) {
  std::vector<int64_t> lengths(40, 3);
  const auto d = synthetic(lengths, 8);
  auto order = [&](uint64_t seed, int epochs) {
    SftLoaderOptions options;
    options.B = 1;
    options.seed = seed;
    SftLoader loader(d, options);
    std::vector<std::vector<int32_t>> out(epochs);
    for (int e = 0; e < epochs; ++e)
      for (int64_t s = 0; s < loader.steps_per_epoch(); ++s) out[e].push_back(loader.next().inputs[0] / 1000);
    return out;
  };
  const auto a = order(1, 2);
  EXPECT_EQ(a, order(1, 2));
  EXPECT_NE(a[0], a[1]);
  EXPECT_NE(a[0], order(2, 1)[0]);
  std::vector<int32_t> sorted = a[1];
  std::sort(sorted.begin(), sorted.end());
  for (int i = 0; i < 40; ++i) EXPECT_EQ(sorted[i], i);
}

TEST(SftBatches, ResumeIsBitwiseAndResetRestarts) {
  std::vector<int64_t> lengths;
  for (int i = 0; i < 23; ++i) lengths.push_back(1 + (i * 11) % 16);
  const auto d = synthetic(lengths, 16);
  for (const bool packing : {false, true}) {
    SftLoaderOptions options;
    options.B = 3;
    options.packing = packing;
    options.seed = 99;
    SftLoader straight(d, options);
    std::vector<SftBatch> expected;
    const int64_t total = 3 * straight.steps_per_epoch() + 1;
    for (int64_t s = 0; s < total; ++s) expected.push_back(straight.next());
    for (int64_t cut : {int64_t{0}, int64_t{1}, straight.steps_per_epoch(), total - 2}) {
      SftLoader resumed(d, options);
      if (cut > 0) resumed.restore(nlohmann::json::parse(expected[cut - 1].state_after.dump()));
      for (int64_t s = cut; s < total; ++s) expect_same(resumed.next(), expected[s]);
    }
    straight.reset();
    expect_same(straight.next(), expected[0]);
  }
}

TEST(SftBatches, RestoreRejectsAStateOfAnotherRun) {
  const auto d = synthetic({3, 4, 5, 6}, 8);
  SftLoaderOptions options;
  options.B = 2;
  SftLoader loader(d, options);
  loader.next();
  const nlohmann::json state = loader.state();
  for (const char* key : {"seed", "packing", "B"}) {
    nlohmann::json other = state;
    other[key] = key == std::string("packing") ? nlohmann::json(true) : nlohmann::json(5);
    EXPECT_THROW(loader.restore(other), std::invalid_argument) << key;
  }
  nlohmann::json far = state;
  far["step_in_epoch"] = 2;
  EXPECT_THROW(loader.restore(far), std::invalid_argument);
  EXPECT_THROW(loader.restore(nlohmann::json::array()), std::invalid_argument);
  EXPECT_EQ(loader.state(), state);  // unchanged after the failures
  EXPECT_THROW(SftLoader(synthetic({9}, 8), options), std::invalid_argument);
}

TEST(SftBatches, ValidationSplitIsDisjoint) {
  std::vector<int64_t> lengths(20, 2);
  const auto d = synthetic(lengths, 4);
  SftLoaderOptions options;
  options.B = 1;
  options.val_fraction = 0.2;
  auto collect = [&](Split split) {
    options.split = split;
    SftLoader loader(d, options);
    std::set<int32_t> seen;
    for (int64_t s = 0; s < loader.steps_per_epoch(); ++s) seen.insert(loader.next().inputs[0] / 1000);
    return seen;
  };
  const std::set<int32_t> train = collect(Split::kTrain);
  const std::set<int32_t> validation = collect(Split::kValidation);
  EXPECT_EQ(train.size(), 16u);
  EXPECT_EQ(validation.size(), 4u);
  for (const int32_t e : validation) EXPECT_EQ(train.count(e), 0u);
  EXPECT_EQ(collect(Split::kAll).size(), 20u);
  options.val_fraction = 0.0;
  options.split = Split::kValidation;
  EXPECT_THROW(SftLoader(d, options), std::invalid_argument);
}

TEST(SftBatches, PackedBuiltinCorpusIsDenserThanPadded) {
  SftOptions data_options;
  data_options.max_length = 256;
  const auto d = load_sft_dataset(std::string(kBuiltinArithmeticSft), kTokenizer, data_options);
  SftLoaderOptions options;
  options.B = 4;
  options.pad_id = kTokenizer.pad_id();
  SftLoader padded(d, options);
  options.packing = true;
  SftLoader packed(d, options);
  EXPECT_EQ(padded.steps_per_epoch(), 1024);
  EXPECT_LT(packed.steps_per_epoch(), padded.steps_per_epoch() / 2);
  const SftBatch a = padded.next();
  const SftBatch b = packed.next();
  std::printf("padded: %lld steps/epoch, efficiency %.3f; packed: %lld steps/epoch, efficiency %.3f\n",
              static_cast<long long>(padded.steps_per_epoch()), a.padding_efficiency(),
              static_cast<long long>(packed.steps_per_epoch()), b.padding_efficiency());
  EXPECT_GT(b.padding_efficiency(), 0.8);
  const auto padding = std::count(b.doc_ids.begin(), b.doc_ids.end(), -1);
  EXPECT_EQ(b.num_real_tokens, static_cast<int64_t>(b.doc_ids.size()) - padding);
  EXPECT_GE(*std::max_element(b.doc_ids.begin(), b.doc_ids.end()), 1);  // rows hold several documents
}

}  // namespace
