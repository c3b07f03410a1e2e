// The pretraining batch source: datasets are tokenised into streams, interleaved by weight with a seeded
// RNG, cut into B rows of T+1 tokens, and served through a prefetch thread. Everything that decides which
// token comes next lives in a small JSON state, so a run resumes bit for bit.
//
// Sampling unit: a document (its tokens plus eos) for .txt/.jsonl/builtin data; a chunk of
// shard_chunk_tokens consecutive tokens for .bin shards, which are already token streams. Each unit is
// drawn whole: the next unit comes from dataset d with probability weight_d / sum(weights), and within a
// dataset units are taken in order, wrapping to the first one (epoch + 1) when all have been used.
// Each row takes the next T+1 tokens of that interleaved stream: inputs are the first T, targets the last T.
//
// Validation split: of a dataset's N units, round(N * val_fraction) (at least 1 when val_fraction > 0 and
// N >= 2, at most N-1) are held out, evenly spread by index and independent of the seed, so the train and
// validation loaders of any run agree on them. An explicit validation dataset list uses Split::kAll.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "data/text_dataset.h"
#include "data/tokenizer.h"

namespace llm::data {

struct Batch {
  int B = 0;
  int T = 0;
  std::vector<int32_t> inputs;     // B*T, row-major
  std::vector<int32_t> targets;    // B*T, inputs shifted left by one
  std::vector<int32_t> positions;  // B*T, 0..T-1 in each row
  std::vector<int32_t> doc_ids;    // B*T document ids of packed rows (-1: padding); empty: one per row
  int64_t num_tokens = 0;          // tokens that count for throughput (targets; SFT: non-padding)
  nlohmann::json state_after;      // the source's state right after producing this batch
};

// Anything that yields batches and can save and restore its position.
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  virtual Batch next() = 0;
  // The state after the last batch next() returned; restore() of it continues with the following batch.
  virtual nlohmann::json state() const = 0;
  virtual void restore(const nlohmann::json& state) = 0;
  // Back to the start, e.g. before each evaluation so evaluations are comparable.
  virtual void reset() = 0;
};

// A dataset loaded and tokenised: its units stored back to back.
struct TokenDataset {
  DatasetSpec spec;
  std::vector<int32_t> tokens;
  std::vector<int64_t> unit_begin{0};  // unit u is tokens[unit_begin[u], unit_begin[u+1])
  int64_t skipped_lines = 0;           // bad JSONL lines skipped (only with skip_bad_lines)
  int64_t num_units() const { return static_cast<int64_t>(unit_begin.size()) - 1; }
};

struct LoadOptions {
  int model_vocab_size = 0;           // every token must be below it; 0 means the tokenizer's vocab_size
  bool skip_bad_lines = false;        // drop and count bad JSONL lines instead of failing
  int64_t shard_chunk_tokens = 1024;  // the sampling unit of .bin shards
};

// Reads the files of a spec (or the builtin corpus), tokenises documents with eos after each, and checks
// every token against the model's vocab size (error naming dataset, file and position). Skipped bad lines
// are reported on stderr and counted in skipped_lines. Shards must have been written for a vocabulary of
// the tokenizer's size.
std::shared_ptr<const TokenDataset> load_dataset(const DatasetSpec& spec, const Tokenizer& tokenizer,
                                                 const LoadOptions& options = {});
std::vector<std::shared_ptr<const TokenDataset>> load_datasets(const std::vector<std::string>& specs,
                                                               const Tokenizer& tokenizer,
                                                               const LoadOptions& options = {});
// A dataset from documents already in memory (tests, generated corpora); spec names it in messages.
std::shared_ptr<const TokenDataset> dataset_from_documents(const DatasetSpec& spec,
                                                           const std::vector<std::string>& documents,
                                                           const Tokenizer& tokenizer,
                                                           const LoadOptions& options = {});

enum class Split { kTrain, kValidation, kAll };

// The held-out unit indices of a dataset of num_units units (sorted). Throws std::invalid_argument unless
// 0 <= val_fraction < 1.
std::vector<int64_t> validation_units(int64_t num_units, double val_fraction);

struct LoaderOptions {
  int B = 1;
  int T = 64;
  uint64_t seed = 0;
  double val_fraction = 0.0;
  Split split = Split::kTrain;
};

class PretrainLoader final : public BatchSource {
 public:
  // Throws std::invalid_argument for B or T < 1, a bad val_fraction, or a split with no units at all.
  PretrainLoader(std::vector<std::shared_ptr<const TokenDataset>> datasets, const LoaderOptions& options);

  Batch next() override;
  nlohmann::json state() const override;
  // Throws std::invalid_argument naming the problem when the state is malformed or was saved for other
  // datasets, another split or another val_fraction; the loader is then unchanged.
  void restore(const nlohmann::json& state) override;
  void reset() override;

  int64_t epoch(size_t dataset) const { return streams_.at(dataset).epoch; }
  int64_t units_in_split(size_t dataset) const {
    return static_cast<int64_t>(streams_.at(dataset).units.size());
  }

 private:
  struct Stream {
    std::shared_ptr<const TokenDataset> dataset;
    std::vector<int64_t> units;  // the unit indices of this split, in order
    int64_t next = 0;            // position in units of the next unit to draw
    int64_t epoch = 0;           // completed passes over units
  };

  void start_next_unit();
  void fill(int32_t* out, int64_t count);

  LoaderOptions options_;
  std::vector<Stream> streams_;
  double total_weight_ = 0.0;
  std::mt19937_64 rng_;
  int active_dataset_ = -1;  // the unit being read, or -1 before the first draw
  int64_t active_unit_ = 0;
  int64_t active_offset_ = 0;
  int64_t batches_ = 0;
};

// Produces batches of another source on a worker thread, up to `depth` ahead, so the training step never
// waits for data. An exception in the worker is rethrown by next() once the batches made before it have
// been consumed. state() is the state_after of the last consumed batch, not of the last produced one.
class PrefetchLoader final : public BatchSource {
 public:
  explicit PrefetchLoader(std::unique_ptr<BatchSource> source, int depth = 2);
  ~PrefetchLoader() override;
  PrefetchLoader(const PrefetchLoader&) = delete;
  PrefetchLoader& operator=(const PrefetchLoader&) = delete;

  Batch next() override;
  nlohmann::json state() const override;
  void restore(const nlohmann::json& state) override;
  void reset() override;

 private:
  void start_worker();
  void stop_worker();
  void run_worker();
  void discard_prefetched();  // stops the worker and drops queued batches and any stored error
  void set_consumed_state(nlohmann::json state);

  std::unique_ptr<BatchSource> source_;  // touched only by the worker while it runs
  size_t depth_;
  std::thread worker_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Batch> queue_;
  std::exception_ptr error_;
  bool stopping_ = false;
  nlohmann::json consumed_state_;
};

}  // namespace llm::data
