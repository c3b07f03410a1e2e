// The SFT loader: rows of whole examples (one per row, or best-fit-decreasing packed), shuffled per epoch
// from the seed with a portable generator, so the same seed gives the same batches on every platform and
// a two-number state (epoch, step) resumes exactly.
#include "data/sft_loader.h"

#include <algorithm>
#include <map>
#include <stdexcept>
#include <string>

namespace llm::data {
namespace {

using json = nlohmann::json;

// splitmix64: a small portable generator (std::shuffle's algorithm differs between standard libraries).
uint64_t splitmix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

template <typename T>
void seeded_shuffle(std::vector<T>* items, uint64_t seed, uint64_t epoch, uint64_t stream) {
  uint64_t state = seed ^ (epoch * 0xd1b54a32d192ed03ULL) ^ (stream * 0x8cb92ba72f3d8dd7ULL);
  splitmix64(&state);
  for (size_t i = items->size(); i > 1; --i) {
    const size_t j = static_cast<size_t>(splitmix64(&state) % i);
    std::swap((*items)[i - 1], (*items)[j]);
  }
}

int split_code(Split split) {
  return static_cast<int>(split);
}

}  // namespace

std::vector<std::vector<int64_t>> best_fit_decreasing(const std::vector<int64_t>& lengths, int64_t capacity) {
  std::vector<int64_t> order(lengths.size());
  for (size_t i = 0; i < order.size(); ++i) {
    if (lengths[i] < 1 || lengths[i] > capacity) {
      throw std::invalid_argument("best_fit_decreasing: length " + std::to_string(lengths[i]) + " of item " +
                                  std::to_string(i) + " is outside [1, " + std::to_string(capacity) + "]");
    }
    order[i] = static_cast<int64_t>(i);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  std::vector<std::vector<int64_t>> bins;
  std::multimap<int64_t, size_t> open;  // room left -> bin; equal rooms keep the order they were made in
  for (const int64_t item : order) {
    const auto best = open.lower_bound(lengths[item]);
    size_t bin = bins.size();
    int64_t room = capacity;
    if (best != open.end()) {
      bin = best->second;
      room = best->first;
      open.erase(best);
    } else {
      bins.emplace_back();
    }
    bins[bin].push_back(item);
    room -= lengths[item];
    if (room > 0) open.emplace(room, bin);
  }
  return bins;
}

SftLoader::SftLoader(std::shared_ptr<const SftDataset> dataset, const SftLoaderOptions& options)
    : dataset_(std::move(dataset)), options_(options) {
  if (!dataset_) throw std::invalid_argument("SftLoader: no dataset");
  const std::string& name = dataset_->name;
  if (options_.B < 1) throw std::invalid_argument(name + ": batch size B must be >= 1");
  max_length_ = options_.max_length > 0 ? options_.max_length : dataset_->max_length;
  if (max_length_ < 1) throw std::invalid_argument(name + ": max_length must be >= 1");
  const int64_t n = dataset_->num_examples();
  if (options_.split == Split::kAll) {
    if (options_.val_fraction < 0.0 || options_.val_fraction >= 1.0) {
      throw std::invalid_argument(name + ": val_fraction must be in [0, 1)");
    }
    for (int64_t e = 0; e < n; ++e) examples_.push_back(e);
  } else {
    const std::vector<int64_t> held_out = validation_units(n, options_.val_fraction);
    if (options_.split == Split::kValidation) {
      examples_ = held_out;
    } else {
      size_t h = 0;
      for (int64_t e = 0; e < n; ++e) {
        if (h < held_out.size() && held_out[h] == e) {
          ++h;
          continue;
        }
        examples_.push_back(e);
      }
    }
  }
  if (examples_.empty()) throw std::invalid_argument(name + ": the split holds no examples");
  std::vector<int64_t> lengths;
  for (const int64_t e : examples_) {
    const int64_t length = dataset_->length(e);
    if (length > max_length_) {
      throw std::invalid_argument(dataset_->example_source.at(e) + ": example of " + std::to_string(length) +
                                  " tokens is longer than max_length " + std::to_string(max_length_));
    }
    lengths.push_back(length);
  }
  bins_per_epoch_ = options_.packing ? static_cast<int64_t>(best_fit_decreasing(lengths, max_length_).size())
                                     : static_cast<int64_t>(examples_.size());
  steps_per_epoch_ = (bins_per_epoch_ + options_.B - 1) / options_.B;
}

void SftLoader::build_epoch(int64_t epoch) {
  if (built_epoch_ == epoch) return;
  std::vector<int64_t> order = examples_;
  if (options_.shuffle) seeded_shuffle(&order, options_.seed, static_cast<uint64_t>(epoch), 0);
  rows_.clear();
  if (!options_.packing) {
    for (const int64_t e : order) rows_.push_back({e});
  } else {
    std::vector<int64_t> lengths;
    lengths.reserve(order.size());
    for (const int64_t e : order) lengths.push_back(dataset_->length(e));
    for (const std::vector<int64_t>& bin : best_fit_decreasing(lengths, max_length_)) {
      std::vector<int64_t> row;
      for (const int64_t i : bin) row.push_back(order[i]);
      rows_.push_back(std::move(row));
    }
    if (options_.shuffle) seeded_shuffle(&rows_, options_.seed, static_cast<uint64_t>(epoch), 1);
  }
  built_epoch_ = epoch;
}

SftBatch SftLoader::next() {
  build_epoch(epoch_);
  const int B = options_.B;
  const size_t first = static_cast<size_t>(step_) * static_cast<size_t>(B);
  const size_t last = std::min(rows_.size(), first + static_cast<size_t>(B));
  int64_t T = 1;
  for (size_t r = first; r < last; ++r) {
    int64_t used = 0;
    for (const int64_t e : rows_[r]) used += dataset_->length(e);
    T = std::max(T, used);
  }
  SftBatch batch;
  batch.B = B;
  batch.T = static_cast<int>(T);
  const size_t cells = static_cast<size_t>(B) * static_cast<size_t>(T);
  batch.inputs.assign(cells, options_.pad_id);
  batch.targets.assign(cells, kIgnoreIndex);
  batch.positions.assign(cells, 0);
  batch.doc_ids.assign(cells, -1);
  for (size_t r = first; r < last; ++r) {
    size_t cell = (r - first) * static_cast<size_t>(T);
    int32_t doc = 0;
    for (const int64_t e : rows_[r]) {
      const int64_t begin = dataset_->example_begin[e];
      const int64_t length = dataset_->length(e);
      for (int64_t t = 0; t < length; ++t, ++cell) {
        batch.inputs[cell] = dataset_->ids[begin + t];
        const int32_t target = t + 1 < length ? dataset_->labels[begin + t + 1] : kIgnoreIndex;
        batch.targets[cell] = target;
        batch.positions[cell] = static_cast<int32_t>(t);
        batch.doc_ids[cell] = doc;
        if (target != kIgnoreIndex) ++batch.num_target_tokens;
      }
      batch.num_real_tokens += length;
      ++doc;
    }
  }
  if (++step_ == steps_per_epoch_) {
    step_ = 0;
    ++epoch_;
  }
  batch.state_after = state();
  return batch;
}

json SftLoader::state() const {
  return json{{"kind", "sft"},
              {"epoch", epoch_},
              {"step_in_epoch", step_},
              {"seed", options_.seed},
              {"examples", static_cast<int64_t>(examples_.size())},
              {"dataset_examples", dataset_->num_examples()},
              {"packing", options_.packing},
              {"shuffle", options_.shuffle},
              {"B", options_.B},
              {"max_length", max_length_},
              {"split", split_code(options_.split)},
              {"val_fraction", options_.val_fraction}};
}

void SftLoader::restore(const json& state) {
  const std::string where = dataset_->name + ": SFT loader state";
  if (!state.is_object()) throw std::invalid_argument(where + ": expected an object");
  auto expect = [&](const char* key, const json& value) {
    const auto it = state.find(key);
    if (it == state.end()) throw std::invalid_argument(where + ": missing \"" + key + "\"");
    if (*it != value) {
      throw std::invalid_argument(where + ": \"" + key + "\" is " + it->dump() + ", this loader has " +
                                  value.dump());
    }
  };
  const json current = this->state();
  for (const char* key : {"kind", "seed", "examples", "dataset_examples", "packing", "shuffle", "B",
                          "max_length", "split", "val_fraction"}) {
    expect(key, current[key]);
  }
  auto integer = [&](const char* key) {
    const auto it = state.find(key);
    if (it == state.end() || !it->is_number_integer()) {
      throw std::invalid_argument(where + ": expected an integer \"" + key + "\"");
    }
    return it->get<int64_t>();
  };
  const int64_t epoch = integer("epoch");
  const int64_t step = integer("step_in_epoch");
  if (epoch < 0 || step < 0 || step >= steps_per_epoch_) {
    throw std::invalid_argument(where + ": epoch " + std::to_string(epoch) + " step " + std::to_string(step) +
                                " is out of range (" + std::to_string(steps_per_epoch_) +
                                " steps per epoch)");
  }
  epoch_ = epoch;
  step_ = step;
}

void SftLoader::reset() {
  epoch_ = 0;
  step_ = 0;
}

}  // namespace llm::data
