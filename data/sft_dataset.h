// Supervised fine-tuning data: JSONL in TRL's formats turned into conversations, rendered with a chat
// template and tokenised into (input_ids, labels) with labels = -100 where no loss is taken.
//
// Accepted lines (one JSON object per line; blank lines are skipped; the format is detected per line):
//   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   any number of turns
//   {"prompt": "...", "completion": "..."}       -> user: prompt, assistant: completion
//   {"prompt": [messages], "completion": [messages]}   TRL's conversational prompt/completion
//   {"instruction": "...", "input": "...", "response": "..."}   ("input" optional) -> user: instruction,
//       followed by "\n\n" + input when input is present and non-empty; assistant: response
// Every example needs at least one assistant turn, and no assistant turn may be empty. Anything else
// (invalid JSON, wrong types, unknown roles, none of the formats) is an error "FILE:LINE: expected ...,
// found ...", or with skip_bad_lines the line is dropped and counted.
//
// Labels: with completion_only_loss (the default) labels[i] = ids[i] for the tokens of assistant spans
// (the content and the end-of-turn token of every assistant turn, see chat_template.h) and -100 elsewhere;
// without it every token is a label. Labels are not shifted here: a batch's targets are
// targets[t] = labels[t + 1], and -100 for a sequence's last token (see sft_loader.h).
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "data/chat_template.h"
#include "data/tokenizer.h"

namespace llm::data {

inline constexpr int32_t kIgnoreIndex = -100;
// The built-in SFT corpus: arithmetic problems as conversations, each with a system prompt
// (kArithmeticSftSystem), user "12+35=", assistant "47".
inline constexpr std::string_view kBuiltinArithmeticSft = "builtin:arithmetic_sft";
inline constexpr std::string_view kArithmeticSftSystem = "You are a calculator. Reply with the number only.";

struct SftExample {
  std::vector<ChatMessage> messages;
  std::string source;  // "FILE:LINE" (or "builtin:arithmetic_sft:INDEX"), for messages
};

struct SftFile {
  std::vector<SftExample> examples;
  int64_t skipped_lines = 0;        // bad lines dropped because skipping was allowed
  std::string first_skipped_error;  // the error the first skipped line would have raised
};

// The conversation of one JSONL record. Throws std::invalid_argument with "expected ..., found ..." (no
// file or line: the caller adds them).
std::vector<ChatMessage> sft_messages_from_json(const nlohmann::json& record);

// Reads a .jsonl file of SFT records. Throws std::runtime_error "FILE:LINE: ..." for a bad line unless
// skip_bad_lines, and naming the file when it cannot be read.
SftFile read_sft_jsonl(const std::string& path, bool skip_bad_lines);

// The built-in corpus: count problems from generate_arithmetic(count, seed), with the system prompt.
std::vector<SftExample> arithmetic_sft_examples(int count, uint64_t seed);
// kBuiltinArithmeticSft: fixed count and seed, so validation splits agree between runs.
std::vector<SftExample> builtin_arithmetic_sft_examples();

struct SftOptions {
  // A chat template name ("chatml", "qwen2", "qwen2.5", "llama3", "qwen3") or a tokenizer folder /
  // tokenizer.json path whose chat template is used (see load_chat_template). Empty means "chatml".
  std::string chat_template;
  bool drop_system_prompt = false;  // remove the data's system messages (a template's default stays)
  bool enable_thinking = false;     // Qwen3's switch, passed to the template
  bool completion_only_loss = true;
  int max_length = 1024;        // tokens per example; longer ones are cut at the end and counted
  bool skip_bad_lines = false;  // drop and count bad JSONL lines instead of failing
  int model_vocab_size = 0;     // every token must be below it; 0 means the tokenizer's vocab_size
};

struct SftStats {
  int64_t examples = 0;           // examples kept
  int64_t skipped_lines = 0;      // bad lines skipped (skip_bad_lines)
  int64_t truncated = 0;          // kept examples that were cut to max_length
  int64_t dropped_no_target = 0;  // examples with no trainable token left after truncation
  int64_t tokens = 0;             // tokens of kept examples
  int64_t target_tokens = 0;      // of them, tokens that are a target (labels != -100, not the first)
  std::string first_skipped_error;
};

// Tokenised examples stored back to back.
struct SftDataset {
  std::string name;  // the path or builtin name, for messages
  int max_length = 0;
  std::vector<int32_t> ids;
  std::vector<int32_t> labels;              // same length as ids; kIgnoreIndex where not trained
  std::vector<int64_t> example_begin{0};    // example e is [example_begin[e], example_begin[e+1])
  std::vector<std::string> example_source;  // "FILE:LINE" of each example
  SftStats stats;
  int64_t num_examples() const { return static_cast<int64_t>(example_begin.size()) - 1; }
  int64_t length(int64_t e) const { return example_begin.at(e + 1) - example_begin.at(e); }
};

// Renders, tokenises, masks and truncates examples. Throws std::invalid_argument naming the example's
// source for a bad conversation (e.g. only system messages left after drop_system_prompt) and
// std::runtime_error "SOURCE: token id ... >= model vocab size ..." for a token the model cannot embed;
// throws std::invalid_argument for max_length < 2.
std::shared_ptr<SftDataset> tokenize_sft_examples(const std::string& name,
                                                  const std::vector<SftExample>& examples,
                                                  const Tokenizer& tokenizer,
                                                  const ChatTemplate& chat_template,
                                                  const SftOptions& options);

// A .jsonl file or kBuiltinArithmeticSft, read and tokenised with the chat template named by
// options.chat_template. Skipped lines are counted in stats.skipped_lines (and reported on stderr).
std::shared_ptr<SftDataset> load_sft_dataset(const std::string& path, const Tokenizer& tokenizer,
                                             const SftOptions& options = {});

}  // namespace llm::data
