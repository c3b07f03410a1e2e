// Arithmetic demo corpus. Uses mt19937_64 with our own range mapping (std::uniform_int_distribution
// differs between standard libraries) so the corpus is identical everywhere. Short, newline-terminated
// lines in one format keep it learnable by a tiny byte-level model within a few hundred steps.
#include "data/arithmetic.h"

#include <random>
#include <stdexcept>

namespace llm::data {
namespace {

constexpr int kBuiltinProblems = 20000;
constexpr uint64_t kBuiltinSeed = 20240601;
constexpr int kBuiltinProblemsPerDocument = 8;
// Operands of at most 9 digits keep every product inside int64.
constexpr int kMaxPromptDigits = 9;
constexpr int kMaxAnswerDigits = 18;

// Uniform in [lo, hi]; the modulo bias is below 2^-40 for these ranges.
int64_t uniform(std::mt19937_64& rng, int64_t lo, int64_t hi) {
  return lo + static_cast<int64_t>(rng() % static_cast<uint64_t>(hi - lo + 1));
}

int64_t power_of_ten(int exponent) {
  int64_t value = 1;
  for (int i = 0; i < exponent; ++i) value *= 10;
  return value;
}

// A number with a uniformly drawn digit count in [1, max_digits], then uniform among those numbers.
int64_t random_operand(std::mt19937_64& rng, int max_digits) {
  const int digits = static_cast<int>(uniform(rng, 1, max_digits));
  if (digits == 1) return uniform(rng, 0, 9);
  return uniform(rng, power_of_ten(digits - 1), power_of_ten(digits) - 1);
}

// Parses an unsigned decimal of 1..max_digits digits at text[*pos]; false when there is none or it is longer.
bool parse_digits(std::string_view text, size_t* pos, int max_digits, int64_t* value) {
  size_t i = *pos;
  int64_t result = 0;
  while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
    if (i - *pos >= static_cast<size_t>(max_digits)) return false;
    result = result * 10 + (text[i] - '0');
    ++i;
  }
  if (i == *pos) return false;
  *pos = i;
  *value = result;
  return true;
}

void skip_spaces(std::string_view text, size_t* pos) {
  while (*pos < text.size() && text[*pos] == ' ') ++*pos;
}

}  // namespace

std::vector<ArithmeticProblem> generate_arithmetic(int count, uint64_t seed,
                                                   const ArithmeticOptions& options) {
  if (count < 0) throw std::invalid_argument("generate_arithmetic: expected count >= 0");
  if (options.max_digits < 1 || options.max_digits > 9) {
    throw std::invalid_argument("generate_arithmetic: expected max_digits in [1, 9], found " +
                                std::to_string(options.max_digits));
  }
  std::mt19937_64 rng(seed);
  std::vector<ArithmeticProblem> problems;
  problems.reserve(count);
  for (int i = 0; i < count; ++i) {
    const int64_t kind = uniform(rng, 0, options.multiplication ? 9 : 7);
    int64_t a = 0;
    int64_t b = 0;
    char op = '+';
    int64_t result = 0;
    if (kind < 4) {
      a = random_operand(rng, options.max_digits);
      b = random_operand(rng, options.max_digits);
      result = a + b;
    } else if (kind < 8) {
      a = random_operand(rng, options.max_digits);
      b = random_operand(rng, options.max_digits);
      if (a < b) std::swap(a, b);
      op = '-';
      result = a - b;
    } else {
      a = uniform(rng, 0, 9);
      b = random_operand(rng, options.max_digits > 1 ? options.max_digits - 1 : 1);
      op = '*';
      result = a * b;
    }
    problems.push_back({std::to_string(a) + op + std::to_string(b) + "=", std::to_string(result)});
  }
  return problems;
}

std::string arithmetic_line(const ArithmeticProblem& problem) {
  return problem.prompt + problem.answer + "\n";
}

std::vector<std::string> arithmetic_documents(int count, uint64_t seed, int problems_per_document,
                                              const ArithmeticOptions& options) {
  if (problems_per_document < 1) {
    throw std::invalid_argument("arithmetic_documents: expected problems_per_document >= 1");
  }
  const std::vector<ArithmeticProblem> problems = generate_arithmetic(count, seed, options);
  std::vector<std::string> documents;
  for (size_t i = 0; i < problems.size(); ++i) {
    if (i % problems_per_document == 0) documents.emplace_back();
    documents.back() += arithmetic_line(problems[i]);
  }
  return documents;
}

std::vector<std::string> builtin_arithmetic_documents() {
  return arithmetic_documents(kBuiltinProblems, kBuiltinSeed, kBuiltinProblemsPerDocument);
}

bool check_arithmetic_answer(std::string_view prompt, std::string_view text) {
  size_t pos = 0;
  int64_t a = 0;
  int64_t b = 0;
  skip_spaces(prompt, &pos);
  bool ok = parse_digits(prompt, &pos, kMaxPromptDigits, &a);
  char op = 0;
  if (ok && pos < prompt.size()) op = prompt[pos++];
  ok = ok && (op == '+' || op == '-' || op == '*') && parse_digits(prompt, &pos, kMaxPromptDigits, &b);
  ok = ok && pos < prompt.size() && prompt[pos++] == '=';
  skip_spaces(prompt, &pos);
  if (!ok || pos != prompt.size()) {
    throw std::invalid_argument("check_arithmetic_answer: expected a prompt like \"12+35=\", found \"" +
                                std::string(prompt.substr(0, 60)) + "\"");
  }
  const int64_t expected = op == '+' ? a + b : op == '-' ? a - b : a * b;

  pos = 0;
  skip_spaces(text, &pos);
  const bool negative = pos < text.size() && text[pos] == '-';
  if (negative) ++pos;
  int64_t magnitude = 0;
  if (!parse_digits(text, &pos, kMaxAnswerDigits, &magnitude)) return false;
  return (negative ? -magnitude : magnitude) == expected;
}

}  // namespace llm::data
