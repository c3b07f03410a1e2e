// Dataset loading, the weighted interleaving loader and its prefetch thread. See loader.h for the sampling
// rules. Draws use mt19937_64 with our own mapping to [0, 1) (std distributions differ between standard
// libraries), so the same seed gives the same batches on every platform.
#include "data/loader.h"

#include <algorithm>
#include <cstdio>
#include <sstream>
#include <stdexcept>

#include "data/arithmetic.h"
#include "data/shards.h"

namespace llm::data {
namespace {

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Appends units to a dataset, checking every token against the model's vocabulary as it goes.
class DatasetBuilder {
 public:
  DatasetBuilder(const DatasetSpec& spec, const Tokenizer& tokenizer, const LoadOptions& options)
      : tokenizer_(tokenizer), options_(options), dataset_(std::make_shared<TokenDataset>()) {
    dataset_->spec = spec;
    vocab_size_ = options.model_vocab_size > 0 ? options.model_vocab_size : tokenizer.vocab_size();
    if (tokenizer.eos_id() < 0) {
      throw std::invalid_argument("dataset '" + spec.spec + "': tokenizer '" + tokenizer.name() +
                                  "' has no eos token to end documents with");
    }
    if (options.shard_chunk_tokens < 1) {
      throw std::invalid_argument("expected shard_chunk_tokens >= 1, found " +
                                  std::to_string(options.shard_chunk_tokens));
    }
  }

  void add_documents(const std::string& source, const std::vector<std::string>& documents) {
    int64_t position = 0;
    for (size_t d = 0; d < documents.size(); ++d) {
      std::vector<int32_t> ids = tokenizer_.encode(documents[d]);
      ids.push_back(tokenizer_.eos_id());
      check_range(source, ids, position, static_cast<int64_t>(d));
      position += static_cast<int64_t>(ids.size());
      append_unit(ids.data(), static_cast<int64_t>(ids.size()));
    }
  }

  void add_shard(const std::string& file) {
    const TokenShard shard = read_token_shard(file);
    if (static_cast<int64_t>(shard.vocab_size) != tokenizer_.vocab_size()) {
      throw std::runtime_error("dataset '" + dataset_->spec.spec + "': " + file + " was tokenised for a " +
                               std::to_string(shard.vocab_size) + "-token vocabulary, but tokenizer '" +
                               tokenizer_.name() + "' has " + std::to_string(tokenizer_.vocab_size()));
    }
    check_range(file, shard.tokens, 0, -1);
    const int64_t total = static_cast<int64_t>(shard.tokens.size());
    for (int64_t begin = 0; begin < total; begin += options_.shard_chunk_tokens) {
      append_unit(shard.tokens.data() + begin, std::min(options_.shard_chunk_tokens, total - begin));
    }
  }

  void add_skipped(const std::string& file, const DocumentFile& read) {
    if (read.skipped_lines == 0) return;
    dataset_->skipped_lines += read.skipped_lines;
    std::fprintf(stderr, "warning: dataset '%s': skipped %lld bad lines in %s (first: %s)\n",
                 dataset_->spec.spec.c_str(), static_cast<long long>(read.skipped_lines), file.c_str(),
                 read.first_skipped_error.c_str());
  }

  std::shared_ptr<const TokenDataset> finish() {
    if (dataset_->num_units() == 0) {
      throw std::runtime_error("dataset '" + dataset_->spec.spec + "': expected documents, found none");
    }
    return dataset_;
  }

 private:
  // document is the index of the document in its file, or -1 for a shard.
  void check_range(const std::string& source, const std::vector<int32_t>& ids, int64_t first_position,
                   int64_t document) const {
    for (size_t i = 0; i < ids.size(); ++i) {
      if (ids[i] >= 0 && ids[i] < vocab_size_) continue;
      const std::string where =
          document >= 0 ? " (document index " + std::to_string(document) + ")" : std::string();
      throw std::runtime_error("dataset '" + dataset_->spec.spec + "': " + source + ": token " +
                               std::to_string(ids[i]) + " at position " +
                               std::to_string(first_position + static_cast<int64_t>(i)) + where +
                               " is outside the model's vocabulary [0, " + std::to_string(vocab_size_) + ")");
    }
  }

  void append_unit(const int32_t* ids, int64_t count) {
    dataset_->tokens.insert(dataset_->tokens.end(), ids, ids + count);
    dataset_->unit_begin.push_back(static_cast<int64_t>(dataset_->tokens.size()));
  }

  const Tokenizer& tokenizer_;
  const LoadOptions& options_;
  int vocab_size_ = 0;
  std::shared_ptr<TokenDataset> dataset_;
};

const char* split_name(Split split) {
  switch (split) {
    case Split::kTrain:
      return "train";
    case Split::kValidation:
      return "validation";
    case Split::kAll:
      return "all";
  }
  return "?";
}

[[noreturn]] void bad_state(const std::string& what) {
  throw std::invalid_argument("loader state: " + what);
}

const nlohmann::json& state_field(const nlohmann::json& object, const char* key) {
  if (!object.is_object()) bad_state(std::string("expected an object holding \"") + key + "\"");
  const auto field = object.find(key);
  if (field == object.end()) bad_state(std::string("expected a field \"") + key + "\", found none");
  return *field;
}

int64_t state_int(const nlohmann::json& object, const char* key, int64_t lo, int64_t hi) {
  const nlohmann::json& field = state_field(object, key);
  if (!field.is_number_integer()) bad_state(std::string("expected \"") + key + "\" to be an integer");
  const int64_t value = field.get<int64_t>();
  if (value < lo || value > hi) {
    bad_state(std::string("expected \"") + key + "\" in [" + std::to_string(lo) + ", " + std::to_string(hi) +
              "], found " + std::to_string(value));
  }
  return value;
}

std::string state_string(const nlohmann::json& object, const char* key) {
  const nlohmann::json& field = state_field(object, key);
  if (!field.is_string()) bad_state(std::string("expected \"") + key + "\" to be a string");
  return field.get<std::string>();
}

constexpr const char* kStateFormat = "llm.pretrain_loader.v1";

}  // namespace

std::shared_ptr<const TokenDataset> dataset_from_documents(const DatasetSpec& spec,
                                                           const std::vector<std::string>& documents,
                                                           const Tokenizer& tokenizer,
                                                           const LoadOptions& options) {
  DatasetBuilder builder(spec, tokenizer, options);
  builder.add_documents(spec.path, documents);
  return builder.finish();
}

std::shared_ptr<const TokenDataset> load_dataset(const DatasetSpec& spec, const Tokenizer& tokenizer,
                                                 const LoadOptions& options) {
  DatasetBuilder builder(spec, tokenizer, options);
  if (spec.path == kBuiltinArithmetic) {
    if (!spec.subset.empty()) {
      throw std::invalid_argument("dataset '" + spec.spec + "': " + spec.path + " has no subsets, found '" +
                                  spec.subset + "'");
    }
    builder.add_documents(spec.path, builtin_arithmetic_documents());
    return builder.finish();
  }
  for (const std::string& file : dataset_files(spec)) {
    if (ends_with(file, ".bin")) {
      builder.add_shard(file);
      continue;
    }
    const DocumentFile read = read_documents(file, options.skip_bad_lines);
    builder.add_skipped(file, read);
    builder.add_documents(file, read.documents);
  }
  return builder.finish();
}

std::vector<std::shared_ptr<const TokenDataset>> load_datasets(const std::vector<std::string>& specs,
                                                               const Tokenizer& tokenizer,
                                                               const LoadOptions& options) {
  if (specs.empty()) throw std::invalid_argument("expected at least one dataset, found none");
  std::vector<std::shared_ptr<const TokenDataset>> datasets;
  for (const std::string& spec : specs)
    datasets.push_back(load_dataset(parse_dataset_spec(spec), tokenizer, options));
  return datasets;
}

std::vector<int64_t> validation_units(int64_t num_units, double val_fraction) {
  if (!(val_fraction >= 0.0 && val_fraction < 1.0)) {
    throw std::invalid_argument("expected val_fraction in [0, 1), found " + std::to_string(val_fraction));
  }
  std::vector<int64_t> held_out;
  if (val_fraction == 0.0 || num_units < 2) return held_out;
  const int64_t count =
      std::clamp<int64_t>(static_cast<int64_t>(num_units * val_fraction + 0.5), 1, num_units - 1);
  // The middle of each of `count` equal slices: evenly spread, so no part of a file is over-represented.
  for (int64_t j = 0; j < count; ++j) held_out.push_back((2 * j + 1) * num_units / (2 * count));
  return held_out;
}

PretrainLoader::PretrainLoader(std::vector<std::shared_ptr<const TokenDataset>> datasets,
                               const LoaderOptions& options)
    : options_(options) {
  if (options.B < 1 || options.T < 1) {
    throw std::invalid_argument("expected B >= 1 and T >= 1, found B=" + std::to_string(options.B) +
                                " T=" + std::to_string(options.T));
  }
  if (datasets.empty()) throw std::invalid_argument("expected at least one dataset, found none");
  for (std::shared_ptr<const TokenDataset>& dataset : datasets) {
    if (!dataset) throw std::invalid_argument("expected a loaded dataset, found a null pointer");
    Stream stream;
    const std::vector<int64_t> held_out = validation_units(dataset->num_units(), options.val_fraction);
    if (options.split == Split::kValidation) {
      stream.units = held_out;
    } else {
      size_t h = 0;
      for (int64_t u = 0; u < dataset->num_units(); ++u) {
        const bool is_held_out = h < held_out.size() && held_out[h] == u;
        if (is_held_out) ++h;
        if (!is_held_out || options.split == Split::kAll) stream.units.push_back(u);
      }
    }
    if (!stream.units.empty()) total_weight_ += dataset->spec.weight;
    stream.dataset = std::move(dataset);
    streams_.push_back(std::move(stream));
  }
  if (total_weight_ <= 0.0) {
    throw std::invalid_argument(std::string("expected documents in the ") + split_name(options.split) +
                                " split, found none (val_fraction " + std::to_string(options.val_fraction) +
                                "; a dataset needs >= 2 documents to hold one out)");
  }
  reset();
}

void PretrainLoader::reset() {
  rng_.seed(options_.seed);
  for (Stream& stream : streams_) {
    stream.next = 0;
    stream.epoch = 0;
  }
  active_dataset_ = -1;
  active_unit_ = 0;
  active_offset_ = 0;
  batches_ = 0;
}

void PretrainLoader::start_next_unit() {
  const double uniform = static_cast<double>(rng_() >> 11) * 0x1.0p-53;
  double remaining = uniform * total_weight_;
  int chosen = -1;
  for (size_t i = 0; i < streams_.size(); ++i) {
    if (streams_[i].units.empty()) continue;
    chosen = static_cast<int>(i);
    if (remaining < streams_[i].dataset->spec.weight) break;
    remaining -= streams_[i].dataset->spec.weight;
  }
  Stream& stream = streams_[chosen];
  if (stream.next == static_cast<int64_t>(stream.units.size())) {
    stream.next = 0;
    ++stream.epoch;
  }
  active_dataset_ = chosen;
  active_unit_ = stream.units[stream.next++];
  active_offset_ = 0;
}

void PretrainLoader::fill(int32_t* out, int64_t count) {
  while (count > 0) {
    if (active_dataset_ >= 0) {
      const TokenDataset& dataset = *streams_[active_dataset_].dataset;
      const int64_t begin = dataset.unit_begin[active_unit_] + active_offset_;
      const int64_t take = std::min(count, dataset.unit_begin[active_unit_ + 1] - begin);
      std::copy_n(dataset.tokens.data() + begin, take, out);
      out += take;
      count -= take;
      active_offset_ += take;
      if (count == 0) break;
    }
    start_next_unit();
  }
}

Batch PretrainLoader::next() {
  const int B = options_.B;
  const int T = options_.T;
  Batch batch;
  batch.B = B;
  batch.T = T;
  batch.inputs.resize(static_cast<size_t>(B) * T);
  batch.targets.resize(batch.inputs.size());
  batch.positions.resize(batch.inputs.size());
  std::vector<int32_t> row(static_cast<size_t>(T) + 1);
  for (int b = 0; b < B; ++b) {
    fill(row.data(), T + 1);
    const size_t offset = static_cast<size_t>(b) * T;
    std::copy_n(row.begin(), T, batch.inputs.begin() + offset);
    std::copy_n(row.begin() + 1, T, batch.targets.begin() + offset);
    for (int t = 0; t < T; ++t) batch.positions[offset + t] = t;
  }
  batch.num_tokens = static_cast<int64_t>(B) * T;
  ++batches_;
  batch.state_after = state();
  return batch;
}

nlohmann::json PretrainLoader::state() const {
  nlohmann::json state;
  state["format"] = kStateFormat;
  state["split"] = split_name(options_.split);
  state["val_fraction"] = options_.val_fraction;
  std::ostringstream rng;
  rng << rng_;
  state["rng"] = rng.str();
  state["batches"] = batches_;
  nlohmann::json datasets = nlohmann::json::array();
  for (const Stream& stream : streams_) {
    datasets.push_back({{"spec", stream.dataset->spec.spec},
                        {"units", static_cast<int64_t>(stream.units.size())},
                        {"tokens", static_cast<int64_t>(stream.dataset->tokens.size())},
                        {"next", stream.next},
                        {"epoch", stream.epoch}});
  }
  state["datasets"] = std::move(datasets);
  if (active_dataset_ < 0) {
    state["active"] = nullptr;
  } else {
    state["active"] = {{"dataset", active_dataset_}, {"unit", active_unit_}, {"offset", active_offset_}};
  }
  return state;
}

void PretrainLoader::restore(const nlohmann::json& state) {
  // Everything is validated into locals first, so a bad state leaves the loader as it was.
  if (state_string(state, "format") != kStateFormat)
    bad_state(std::string("expected format ") + kStateFormat);
  const std::string split = state_string(state, "split");
  if (split != split_name(options_.split)) {
    bad_state(std::string("saved for the ") + split + " split, but this loader reads the " +
              split_name(options_.split) + " split");
  }
  const nlohmann::json& val_fraction = state_field(state, "val_fraction");
  if (!val_fraction.is_number() || val_fraction.get<double>() != options_.val_fraction) {
    bad_state("saved with val_fraction " + val_fraction.dump() + ", but this loader uses " +
              std::to_string(options_.val_fraction));
  }
  std::mt19937_64 rng;
  std::istringstream rng_text(state_string(state, "rng"));
  rng_text >> rng;
  if (rng_text.fail()) bad_state("expected \"rng\" to hold a mt19937_64 state");
  const int64_t batches = state_int(state, "batches", 0, INT64_MAX);

  const nlohmann::json& datasets = state_field(state, "datasets");
  if (!datasets.is_array() || datasets.size() != streams_.size()) {
    bad_state("expected " + std::to_string(streams_.size()) + " datasets, found " +
              (datasets.is_array() ? std::to_string(datasets.size()) : std::string("no array")));
  }
  std::vector<std::pair<int64_t, int64_t>> positions;  // (next, epoch) per dataset
  for (size_t i = 0; i < streams_.size(); ++i) {
    const Stream& stream = streams_[i];
    const nlohmann::json& saved = datasets[i];
    const std::string spec = state_string(saved, "spec");
    const int64_t units = static_cast<int64_t>(stream.units.size());
    if (spec != stream.dataset->spec.spec || state_int(saved, "units", 0, INT64_MAX) != units ||
        state_int(saved, "tokens", 0, INT64_MAX) != static_cast<int64_t>(stream.dataset->tokens.size())) {
      bad_state("dataset " + std::to_string(i) + " was '" + spec + "' with other contents than '" +
                stream.dataset->spec.spec + "' has now");
    }
    positions.emplace_back(state_int(saved, "next", 0, units), state_int(saved, "epoch", 0, INT64_MAX));
  }

  int active_dataset = -1;
  int64_t active_unit = 0;
  int64_t active_offset = 0;
  const nlohmann::json& active = state_field(state, "active");
  if (!active.is_null()) {
    active_dataset =
        static_cast<int>(state_int(active, "dataset", 0, static_cast<int64_t>(streams_.size()) - 1));
    const Stream& stream = streams_[active_dataset];
    active_unit = state_int(active, "unit", 0, stream.dataset->num_units() - 1);
    if (!std::binary_search(stream.units.begin(), stream.units.end(), active_unit)) {
      bad_state("active unit " + std::to_string(active_unit) + " is not in the " + split + " split");
    }
    const TokenDataset& dataset = *stream.dataset;
    active_offset =
        state_int(active, "offset", 0, dataset.unit_begin[active_unit + 1] - dataset.unit_begin[active_unit]);
  }

  rng_ = rng;
  batches_ = batches;
  for (size_t i = 0; i < streams_.size(); ++i) {
    streams_[i].next = positions[i].first;
    streams_[i].epoch = positions[i].second;
  }
  active_dataset_ = active_dataset;
  active_unit_ = active_unit;
  active_offset_ = active_offset;
}

PrefetchLoader::PrefetchLoader(std::unique_ptr<BatchSource> source, int depth)
    : source_(std::move(source)), depth_(static_cast<size_t>(depth)) {
  if (!source_) throw std::invalid_argument("PrefetchLoader: expected a source, found a null pointer");
  if (depth < 1)
    throw std::invalid_argument("PrefetchLoader: expected depth >= 1, found " + std::to_string(depth));
  set_consumed_state(source_->state());
  start_worker();
}

PrefetchLoader::~PrefetchLoader() {
  stop_worker();
}

void PrefetchLoader::set_consumed_state(nlohmann::json state) {
  std::lock_guard<std::mutex> lock(mutex_);
  consumed_state_ = std::move(state);
}

void PrefetchLoader::start_worker() {
  stopping_ = false;
  worker_ = std::thread([this] { run_worker(); });
}

void PrefetchLoader::stop_worker() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  if (worker_.joinable()) worker_.join();
}

void PrefetchLoader::run_worker() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      changed_.wait(lock, [this] { return stopping_ || queue_.size() < depth_; });
      if (stopping_) return;
    }
    Batch batch;
    try {
      batch = source_->next();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      error_ = std::current_exception();
      changed_.notify_all();
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(batch));
    }
    changed_.notify_all();
  }
}

Batch PrefetchLoader::next() {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [this] { return !queue_.empty() || error_; });
  if (queue_.empty()) std::rethrow_exception(error_);
  Batch batch = std::move(queue_.front());
  queue_.pop_front();
  consumed_state_ = batch.state_after;
  lock.unlock();
  changed_.notify_all();
  return batch;
}

nlohmann::json PrefetchLoader::state() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return consumed_state_;
}

void PrefetchLoader::discard_prefetched() {
  stop_worker();
  std::lock_guard<std::mutex> lock(mutex_);
  queue_.clear();
  error_ = nullptr;
}

void PrefetchLoader::restore(const nlohmann::json& state) {
  discard_prefetched();
  try {
    source_->restore(state);
  } catch (...) {
    // Put the source back where the consumer is, so the stream continues without a gap.
    source_->restore(consumed_state_);
    start_worker();
    throw;
  }
  set_consumed_state(source_->state());
  start_worker();
}

void PrefetchLoader::reset() {
  discard_prefetched();
  source_->reset();
  set_consumed_state(source_->state());
  start_worker();
}

}  // namespace llm::data
