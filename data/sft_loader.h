// Batches of SFT examples, unpacked (padded to the batch's longest sequence) or packed (best-fit-decreasing
// bins of max_length tokens), with per-document positions and document ids, deterministic per-epoch
// shuffling and exact resume.
//
// A sequence of L tokens (an example) fills L positions of a row: inputs are its ids, targets[t] =
// labels[t + 1] for t < L-1 and -100 for its last token, positions run 0..L-1 and doc_ids hold the index of
// the document in its row (0, 1, ...). Padding (pad_id inputs, -100 targets, position 0, doc_id -1) fills
// each row to T, the longest row of the batch (never more than max_length). The attention's document mask
// lets a query see only keys of its own doc_id, so packed documents never see each other and a packed
// batch gives the same loss as the same documents unpacked.
//
// Epoch e visits the examples of the split once, in an order shuffled from (seed, e):
//   unpacked: B examples per batch, in that order; the last batch of an epoch may have empty rows
//             (all padding) so that every batch has B rows: ceil(N / B) steps per epoch.
//   packed:   the examples, in that order, are sorted by length (longest first, stable) and placed by
//             best-fit-decreasing: each goes into the open bin with the least room that still fits it,
//             else a new bin. The bins are then shuffled from (seed, e) and served B per batch:
//             ceil(bins / B) steps per epoch (the same every epoch: bin contents depend only on lengths).
// Examples are never split across rows; every example must be at most max_length (tokenize_sft_examples
// truncates to the dataset's max_length first).
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "data/loader.h"
#include "data/sft_dataset.h"

namespace llm::data {

struct SftBatch {
  int B = 0;
  int T = 0;
  std::vector<int32_t> inputs;     // B*T, row-major
  std::vector<int32_t> targets;    // B*T, next-token labels, -100 where no loss is taken
  std::vector<int32_t> positions;  // B*T, restarting at 0 in every document; 0 for padding
  std::vector<int32_t> doc_ids;    // B*T, the document's index within its row; -1 for padding
  int64_t num_target_tokens = 0;   // targets != -100
  int64_t num_real_tokens = 0;     // non-padding tokens
  nlohmann::json state_after;      // the loader's state right after producing this batch
  // num_real_tokens / (B*T): the share of the batch's compute spent on real tokens.
  double padding_efficiency() const {
    return B * T > 0 ? static_cast<double>(num_real_tokens) / (static_cast<double>(B) * T) : 0.0;
  }
};

struct SftLoaderOptions {
  int B = 1;
  int max_length = 0;  // row capacity; 0 means the dataset's max_length
  bool packing = false;
  int32_t pad_id = 0;   // the input id of padding: the tokenizer's pad_id() (its targets are -100 anyway)
  bool shuffle = true;  // false keeps file order (and, packed, the bins in best-fit-decreasing order)
  uint64_t seed = 0;
  double val_fraction = 0.0;    // held-out examples as in validation_units() of loader.h
  Split split = Split::kTrain;  // a separate validation file uses kAll
};

// Best-fit-decreasing over `lengths` (in the order given; ties keep it) into bins of `capacity`: the
// indices into lengths of every bin, in the order the bins were opened. Throws std::invalid_argument for
// a length outside [1, capacity].
std::vector<std::vector<int64_t>> best_fit_decreasing(const std::vector<int64_t>& lengths, int64_t capacity);

class SftLoader {
 public:
  // Throws std::invalid_argument for B < 1, a bad val_fraction, a split with no examples, or an example
  // longer than max_length (naming its source).
  SftLoader(std::shared_ptr<const SftDataset> dataset, const SftLoaderOptions& options);

  SftBatch next();
  // {"kind": "sft", "epoch", "step_in_epoch", "seed", "examples", "packing", "split", ...}.
  nlohmann::json state() const;
  // Throws std::invalid_argument naming the problem when the state is malformed or was saved for another
  // dataset size, seed, split, packing or batch size; the loader is then unchanged.
  void restore(const nlohmann::json& state);
  void reset();  // back to epoch 0, step 0

  int64_t steps_per_epoch() const { return steps_per_epoch_; }
  int64_t epoch() const { return epoch_; }  // epochs completed
  int64_t step_in_epoch() const { return step_; }
  int64_t examples_in_split() const { return static_cast<int64_t>(examples_.size()); }
  int64_t bins_per_epoch() const { return bins_per_epoch_; }  // rows holding data per epoch
  int max_length() const { return max_length_; }

 private:
  void build_epoch(int64_t epoch);  // fills rows_ for `epoch`

  std::shared_ptr<const SftDataset> dataset_;
  SftLoaderOptions options_;
  int max_length_ = 0;
  std::vector<int64_t> examples_;           // dataset example indices of this split
  std::vector<std::vector<int64_t>> rows_;  // the current epoch's rows (example indices)
  int64_t built_epoch_ = -1;
  int64_t bins_per_epoch_ = 0;
  int64_t steps_per_epoch_ = 0;
  int64_t epoch_ = 0;
  int64_t step_ = 0;
};

}  // namespace llm::data
