// The pretraining loader: weighted interleaving, determinism, the validation split, exact resume (also
// through the prefetch thread), prefetch error propagation and shutdown, and loading datasets from disk.
#include <gtest/gtest.h>

#include <unistd.h>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>

#include "data/byte_tokenizer.h"
#include "data/loader.h"
#include "data/shards.h"

namespace {

namespace fs = std::filesystem;
using llm::data::Batch;
using llm::data::BatchSource;
using llm::data::ByteTokenizer;
using llm::data::LoaderOptions;
using llm::data::PrefetchLoader;
using llm::data::PretrainLoader;
using llm::data::Split;
using llm::data::TokenDataset;
using DatasetList = std::vector<std::shared_ptr<const TokenDataset>>;

const ByteTokenizer kTokenizer;

std::shared_ptr<const TokenDataset> make_dataset(const std::string& name,
                                                 const std::vector<std::string>& documents,
                                                 double weight = 1.0) {
  llm::data::DatasetSpec spec;
  spec.spec = name;
  spec.path = name;
  spec.weight = weight;
  return llm::data::dataset_from_documents(spec, documents, kTokenizer);
}

// Documents "<prefix>0000\n", "<prefix>0001\n", ... so each one can be recognised in a batch.
std::vector<std::string> numbered_documents(const std::string& prefix, int count) {
  std::vector<std::string> documents;
  for (int i = 0; i < count; ++i) {
    char number[16];
    std::snprintf(number, sizeof(number), "%04d", i);
    documents.push_back(prefix + number + "\n");
  }
  return documents;
}

LoaderOptions options(int B, int T, uint64_t seed, double val_fraction = 0.0, Split split = Split::kTrain) {
  LoaderOptions result;
  result.B = B;
  result.T = T;
  result.seed = seed;
  result.val_fraction = val_fraction;
  result.split = split;
  return result;
}

// The token stream a batch was cut from: each row is T+1 consecutive tokens.
void append_stream(const Batch& batch, std::vector<int32_t>* stream) {
  for (int b = 0; b < batch.B; ++b) {
    const size_t row = static_cast<size_t>(b) * batch.T;
    stream->insert(stream->end(), batch.inputs.begin() + row, batch.inputs.begin() + row + batch.T);
    stream->push_back(batch.targets[row + batch.T - 1]);
  }
}

// The complete documents of a stream (the pieces before the first and after the last eos are cut).
std::vector<std::string> complete_documents(const std::vector<int32_t>& stream) {
  std::vector<std::string> documents;
  std::vector<int32_t> current;
  bool seen_eos = false;
  for (const int32_t token : stream) {
    if (token != ByteTokenizer::kEndOfText) {
      current.push_back(token);
      continue;
    }
    if (seen_eos) documents.push_back(kTokenizer.decode(current));
    current.clear();
    seen_eos = true;
  }
  return documents;
}

void expect_same_batch(const Batch& a, const Batch& b) {
  EXPECT_EQ(a.inputs, b.inputs);
  EXPECT_EQ(a.targets, b.targets);
  EXPECT_EQ(a.positions, b.positions);
  EXPECT_EQ(a.state_after, b.state_after);
}

TEST(PretrainLoader, BatchLayout) {
  PretrainLoader loader({make_dataset("d", {"hello world"})}, options(3, 5, 1));
  const Batch batch = loader.next();
  EXPECT_EQ(batch.B, 3);
  EXPECT_EQ(batch.T, 5);
  EXPECT_EQ(batch.num_tokens, 15);
  ASSERT_EQ(batch.inputs.size(), 15u);
  std::vector<int32_t> stream;
  append_stream(batch, &stream);
  // One document repeated: "hello world" + eos, wrapping around.
  std::vector<int32_t> expected;
  while (expected.size() < stream.size()) {
    for (char c : std::string("hello world")) expected.push_back(c);
    expected.push_back(ByteTokenizer::kEndOfText);
  }
  expected.resize(stream.size());
  EXPECT_EQ(stream, expected);
  for (int b = 0; b < 3; ++b) {
    for (int t = 0; t < 5; ++t) {
      EXPECT_EQ(batch.positions[b * 5 + t], t);
      if (t + 1 < 5) {
        EXPECT_EQ(batch.targets[b * 5 + t], batch.inputs[b * 5 + t + 1]);
      }
    }
  }
  EXPECT_EQ(loader.epoch(0), 1);
}

TEST(PretrainLoader, WeightsSetTheDocumentShare) {
  const DatasetList datasets = {make_dataset("a | | 3", numbered_documents("a", 50), 3.0),
                                make_dataset("b | | 1", numbered_documents("b", 50), 1.0)};
  PretrainLoader loader(datasets, options(8, 127, 5));
  std::vector<int32_t> stream;
  for (int i = 0; i < 60; ++i) append_stream(loader.next(), &stream);
  std::map<char, int> counts;
  for (const std::string& document : complete_documents(stream)) ++counts[document[0]];
  const double total = counts['a'] + counts['b'];
  ASSERT_GT(total, 8000);
  EXPECT_NEAR(counts['a'] / total, 0.75, 0.02);
  EXPECT_GT(loader.epoch(0), loader.epoch(1));
}

TEST(PretrainLoader, SameSeedSameBatches) {
  const DatasetList datasets = {make_dataset("a", numbered_documents("a", 20), 2.0),
                                make_dataset("b", numbered_documents("bb", 30), 1.0)};
  PretrainLoader first(datasets, options(4, 33, 11));
  PretrainLoader second(datasets, options(4, 33, 11));
  PretrainLoader other_seed(datasets, options(4, 33, 12));
  bool differs = false;
  for (int i = 0; i < 20; ++i) {
    const Batch a = first.next();
    expect_same_batch(a, second.next());
    differs = differs || a.inputs != other_seed.next().inputs;
  }
  EXPECT_TRUE(differs);
}

TEST(PretrainLoader, ValidationDocumentsNeverTrain) {
  const DatasetList datasets = {make_dataset("a", numbered_documents("a", 200), 1.0),
                                make_dataset("b", numbered_documents("b", 40), 1.0)};
  std::set<std::string> held_out;
  for (int64_t u : llm::data::validation_units(200, 0.1)) held_out.insert(numbered_documents("a", 200)[u]);
  for (int64_t u : llm::data::validation_units(40, 0.1)) held_out.insert(numbered_documents("b", 40)[u]);
  ASSERT_EQ(held_out.size(), 24u);

  PretrainLoader train(datasets, options(4, 64, 3, 0.1, Split::kTrain));
  std::vector<int32_t> train_stream;
  for (int i = 0; i < 30; ++i) append_stream(train.next(), &train_stream);  // several epochs
  std::set<std::string> trained;
  for (const std::string& document : complete_documents(train_stream)) trained.insert(document);
  EXPECT_EQ(trained.size(), 240u - 24u);
  for (const std::string& document : held_out) EXPECT_EQ(trained.count(document), 0u) << document;

  PretrainLoader validation(datasets, options(2, 50, 3, 0.1, Split::kValidation));
  std::vector<int32_t> validation_stream;
  const Batch first = validation.next();
  for (int i = 0; i < 4; ++i) append_stream(i == 0 ? first : validation.next(), &validation_stream);
  std::set<std::string> validated;
  for (const std::string& document : complete_documents(validation_stream)) validated.insert(document);
  EXPECT_EQ(validated, held_out);
  // reset() restarts evaluation from the same first batch.
  validation.reset();
  expect_same_batch(validation.next(), first);

  PretrainLoader all(datasets, options(1, 8, 3, 0.1, Split::kAll));
  EXPECT_EQ(all.units_in_split(0), 200);
  EXPECT_EQ(train.units_in_split(0), 180);
  EXPECT_EQ(validation.units_in_split(1), 4);
}

TEST(PretrainLoader, ValidationUnitsAreSpreadAndExact) {
  EXPECT_TRUE(llm::data::validation_units(100, 0.0).empty());
  EXPECT_TRUE(llm::data::validation_units(1, 0.5).empty());
  EXPECT_EQ(llm::data::validation_units(10, 0.01), std::vector<int64_t>{5});
  EXPECT_EQ(llm::data::validation_units(10, 0.2), (std::vector<int64_t>{2, 7}));
  EXPECT_EQ(llm::data::validation_units(2, 0.9), std::vector<int64_t>{1});
  EXPECT_EQ(llm::data::validation_units(1000, 0.05).size(), 50u);
  EXPECT_THROW(llm::data::validation_units(10, 1.0), std::invalid_argument);
  EXPECT_THROW(llm::data::validation_units(10, -0.1), std::invalid_argument);
  // A split with nothing in it is an error, not an empty loop.
  EXPECT_THROW(
      PretrainLoader({make_dataset("one", {"only document"})}, options(1, 4, 0, 0.1, Split::kValidation)),
      std::invalid_argument);
}

TEST(PretrainLoader, ResumeContinuesBitForBit) {
  const DatasetList datasets = {make_dataset("a", numbered_documents("a", 7), 3.0),
                                make_dataset("b", numbered_documents("long-b", 5), 1.0)};
  const LoaderOptions loader_options = options(2, 13, 99, 0.2);
  PretrainLoader reference(datasets, loader_options);
  std::vector<Batch> batches;
  for (int i = 0; i < 12; ++i) batches.push_back(reference.next());
  for (int k : {1, 5, 11}) {
    // Through text, as a checkpoint would store it.
    const nlohmann::json saved = nlohmann::json::parse(batches[k - 1].state_after.dump());
    PretrainLoader resumed(datasets, loader_options);
    resumed.restore(saved);
    for (int i = k; i < 12; ++i) expect_same_batch(resumed.next(), batches[i]);
  }
  EXPECT_EQ(reference.state(), batches.back().state_after);
}

TEST(PretrainLoader, RestoreRejectsForeignStates) {
  const DatasetList datasets = {make_dataset("a", numbered_documents("a", 7))};
  PretrainLoader loader(datasets, options(1, 8, 1, 0.2));
  loader.next();
  const nlohmann::json good = loader.state();
  const Batch expected = loader.next();
  loader.restore(good);

  auto expect_rejected = [&](nlohmann::json bad, const std::string& fragment) {
    try {
      loader.restore(bad);
      ADD_FAILURE() << "expected restore to fail: " << fragment;
    } catch (const std::invalid_argument& error) {
      EXPECT_NE(std::string(error.what()).find(fragment), std::string::npos) << error.what();
    }
  };
  nlohmann::json bad = good;
  bad["rng"] = "not numbers";
  expect_rejected(bad, "rng");
  bad = good;
  bad["datasets"][0]["spec"] = "other";
  expect_rejected(bad, "'other'");
  bad = good;
  bad["datasets"][0]["next"] = 100;
  expect_rejected(bad, "\"next\"");
  bad = good;
  bad["split"] = "validation";
  expect_rejected(bad, "validation split");
  bad = good;
  bad["active"]["offset"] = 1000;
  expect_rejected(bad, "\"offset\"");
  bad = good;
  bad.erase("batches");
  expect_rejected(bad, "batches");
  expect_rejected(nlohmann::json::array(), "format");
  PretrainLoader other_split(datasets, options(1, 8, 1, 0.3));
  EXPECT_THROW(other_split.restore(good), std::invalid_argument);
  // Failed restores left the loader where it was.
  expect_same_batch(loader.next(), expected);
}

TEST(PrefetchLoader, ResumeFromTheLastConsumedBatch) {
  const DatasetList datasets = {make_dataset("a", numbered_documents("a", 9), 1.0),
                                make_dataset("b", numbered_documents("b", 6), 2.0)};
  const LoaderOptions loader_options = options(3, 17, 7, 0.1);
  PretrainLoader reference(datasets, loader_options);
  std::vector<Batch> batches;
  for (int i = 0; i < 10; ++i) batches.push_back(reference.next());

  nlohmann::json saved;
  {
    PrefetchLoader prefetch(std::make_unique<PretrainLoader>(datasets, loader_options), 3);
    EXPECT_EQ(prefetch.state(), PretrainLoader(datasets, loader_options).state());
    for (int i = 0; i < 4; ++i) expect_same_batch(prefetch.next(), batches[i]);
    // Let the worker run ahead; the state must still be that of the last consumed batch.
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    saved = prefetch.state();
    EXPECT_EQ(saved, batches[3].state_after);
  }
  PrefetchLoader resumed(std::make_unique<PretrainLoader>(datasets, loader_options));
  resumed.restore(saved);
  for (int i = 4; i < 10; ++i) expect_same_batch(resumed.next(), batches[i]);
  resumed.reset();
  expect_same_batch(resumed.next(), batches[0]);
  // A bad state is rejected and the stream goes on from where the consumer was.
  EXPECT_THROW(resumed.restore(nlohmann::json::object()), std::invalid_argument);
  expect_same_batch(resumed.next(), batches[1]);
}

// Yields tiny batches and throws on call number `fail_at` (1-based).
class CountingSource : public BatchSource {
 public:
  explicit CountingSource(int fail_at, std::atomic<int>* produced = nullptr)
      : fail_at_(fail_at), produced_(produced) {}
  Batch next() override {
    ++calls_;
    if (calls_ == fail_at_) throw std::runtime_error("source failed at call " + std::to_string(calls_));
    if (produced_) ++*produced_;
    Batch batch;
    batch.B = 1;
    batch.T = 1;
    batch.inputs = {calls_};
    batch.state_after = calls_;
    return batch;
  }
  nlohmann::json state() const override { return calls_; }
  void restore(const nlohmann::json& state) override { calls_ = state.get<int>(); }
  void reset() override { calls_ = 0; }

 private:
  int calls_ = 0;
  int fail_at_;
  std::atomic<int>* produced_;
};

TEST(PrefetchLoader, WorkerExceptionsReachTheConsumer) {
  PrefetchLoader prefetch(std::make_unique<CountingSource>(3), 2);
  EXPECT_EQ(prefetch.next().inputs[0], 1);
  EXPECT_EQ(prefetch.next().inputs[0], 2);
  for (int attempt = 0; attempt < 2; ++attempt) {
    try {
      prefetch.next();
      FAIL() << "expected the worker's exception";
    } catch (const std::runtime_error& error) {
      EXPECT_STREQ(error.what(), "source failed at call 3");
    }
  }
  // Restoring clears the error and restarts the worker.
  prefetch.restore(3);
  EXPECT_EQ(prefetch.next().inputs[0], 4);
}

TEST(PrefetchLoader, DestructorWithFullQueueDoesNotHang) {
  const auto start = std::chrono::steady_clock::now();
  for (int depth : {1, 2, 8}) {
    std::atomic<int> produced{0};
    {
      PrefetchLoader prefetch(std::make_unique<CountingSource>(-1, &produced), depth);
      while (produced.load() < depth) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      EXPECT_EQ(produced.load(), depth) << "the queue is bounded";
    }
    { PrefetchLoader destroyed_at_once(std::make_unique<CountingSource>(-1), depth); }
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(1));
}

class LoadDatasetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("llm_loader_" + std::string(info->name()) + "_" + std::to_string(::getpid()));
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
  fs::path dir_;
};

TEST_F(LoadDatasetTest, FolderOfTextJsonlAndShards) {
  write("corpus/a.txt", "one\n<|endoftext|>\ntwo\n");
  write("corpus/b.jsonl", "{\"text\": \"three\"}\nbroken\n");
  llm::data::write_token_shard((dir_ / "corpus/c.bin").string(), {1, 2, 3, 4, 5}, ByteTokenizer::kVocabSize);
  llm::data::LoadOptions load_options;
  load_options.shard_chunk_tokens = 2;
  const std::string folder = (dir_ / "corpus").string();
  EXPECT_THROW(llm::data::load_datasets({folder}, kTokenizer, load_options), std::runtime_error);
  load_options.skip_bad_lines = true;
  const DatasetList datasets = llm::data::load_datasets({folder + " | | 2"}, kTokenizer, load_options);
  ASSERT_EQ(datasets.size(), 1u);
  const TokenDataset& dataset = *datasets[0];
  EXPECT_EQ(dataset.spec.weight, 2.0);
  EXPECT_EQ(dataset.skipped_lines, 1);
  EXPECT_EQ(dataset.unit_begin, (std::vector<int64_t>{0, 5, 10, 16, 18, 20, 21}));
  EXPECT_EQ(kTokenizer.decode(dataset.tokens),
            "one\n<|endoftext|>two\n<|endoftext|>three<|endoftext|>" + kTokenizer.decode({1, 2, 3, 4, 5}));
}

TEST_F(LoadDatasetTest, BuiltinArithmetic) {
  const DatasetList datasets = llm::data::load_datasets({"builtin:arithmetic"}, kTokenizer);
  EXPECT_GT(datasets[0]->num_units(), 1000);
  EXPECT_THROW(llm::data::load_datasets({"builtin:arithmetic | easy"}, kTokenizer), std::invalid_argument);
  PretrainLoader loader(datasets, options(2, 32, 0, 0.05));
  const std::string text = kTokenizer.decode(loader.next().inputs);
  EXPECT_NE(text.find('='), std::string::npos) << text;
}

TEST_F(LoadDatasetTest, TokensOutsideTheModelVocabularyAreNamed) {
  llm::data::LoadOptions load_options;
  load_options.model_vocab_size = 257;  // no room for <|pad|>
  const std::string file = write("high.txt", "ok\n<|endoftext|>\nab<|pad|>");
  try {
    llm::data::load_datasets({file}, kTokenizer, load_options);
    FAIL() << "expected an error";
  } catch (const std::runtime_error& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("dataset '" + file + "'"), std::string::npos) << message;
    EXPECT_NE(message.find("token 257 at position 6 (document index 1)"), std::string::npos) << message;
  }
  // Shards must match the tokenizer they are read with.
  llm::data::write_token_shard((dir_ / "gpt2.bin").string(), {1, 2}, 50257);
  EXPECT_THROW(llm::data::load_datasets({(dir_ / "gpt2.bin").string()}, kTokenizer), std::runtime_error);
  EXPECT_THROW(llm::data::load_datasets({(dir_ / "missing.jsonl").string()}, kTokenizer), std::runtime_error);
  write("empty.txt", "");
  EXPECT_THROW(llm::data::load_datasets({(dir_ / "empty.txt").string()}, kTokenizer), std::runtime_error);
}

}  // namespace
