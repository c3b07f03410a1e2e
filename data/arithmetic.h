// The built-in demo corpus: arithmetic problems with answers we can verify, generated deterministically
// from a seed (no downloads). Pretraining reads them as text ("12+35=47" lines); SFT, DPO and GRPO demos
// reuse the problems and check_arithmetic_answer as a verifiable reward.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace llm::data {

struct ArithmeticProblem {
  std::string prompt;  // e.g. "12+35="
  std::string answer;  // e.g. "47"
};

struct ArithmeticOptions {
  int max_digits = 3;          // + and - operands have 1..max_digits digits (1..9)
  bool multiplication = true;  // also a one-digit factor times a number of up to max_digits-1 digits
};

// `count` problems: 40% additions, 40% subtractions (never negative), 20% multiplications when enabled.
// The same count, seed and options always give the same problems, on every platform.
std::vector<ArithmeticProblem> generate_arithmetic(int count, uint64_t seed,
                                                   const ArithmeticOptions& options = {});

// One problem as a training line: prompt + answer + "\n".
std::string arithmetic_line(const ArithmeticProblem& problem);

// `count` problems rendered as lines, grouped problems_per_document to a document.
std::vector<std::string> arithmetic_documents(int count, uint64_t seed, int problems_per_document = 8,
                                              const ArithmeticOptions& options = {});

// The corpus behind the dataset path "builtin:arithmetic": fixed size and seed, so the validation split
// is the same in every run.
std::vector<std::string> builtin_arithmetic_documents();

// True when `text` (a model's completion of `prompt`) starts with the right answer: optional spaces, an
// optional '-', digits, then the end or any non-digit. Throws std::invalid_argument when the prompt is
// not of the form "A+B=", "A-B=" or "A*B=".
bool check_arithmetic_answer(std::string_view prompt, std::string_view text);

}  // namespace llm::data
