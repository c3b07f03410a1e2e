// The arithmetic demo corpus: deterministic, correct answers, a consistent learnable format, and a checker
// that accepts right answers and rejects wrong ones.
#include <gtest/gtest.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "data/arithmetic.h"

namespace {

using llm::data::ArithmeticOptions;
using llm::data::ArithmeticProblem;

int64_t evaluate(const std::string& prompt) {
  const size_t op = prompt.find_first_of("+-*");
  const int64_t a = std::stoll(prompt.substr(0, op));
  const int64_t b = std::stoll(prompt.substr(op + 1, prompt.size() - op - 2));
  return prompt[op] == '+' ? a + b : prompt[op] == '-' ? a - b : a * b;
}

TEST(Arithmetic, Deterministic) {
  const auto first = llm::data::generate_arithmetic(500, 42);
  const auto second = llm::data::generate_arithmetic(500, 42);
  const auto other = llm::data::generate_arithmetic(500, 43);
  ASSERT_EQ(first.size(), 500u);
  bool differs = false;
  for (size_t i = 0; i < first.size(); ++i) {
    EXPECT_EQ(first[i].prompt, second[i].prompt);
    EXPECT_EQ(first[i].answer, second[i].answer);
    differs = differs || first[i].prompt != other[i].prompt;
  }
  EXPECT_TRUE(differs);
  EXPECT_EQ(llm::data::builtin_arithmetic_documents(), llm::data::builtin_arithmetic_documents());
}

TEST(Arithmetic, AnswersAreCorrectAndFormatIsConsistent) {
  int counts[3] = {0, 0, 0};
  for (const ArithmeticProblem& problem : llm::data::generate_arithmetic(2000, 7)) {
    ASSERT_EQ(problem.prompt.back(), '=');
    const size_t op = problem.prompt.find_first_of("+-*");
    ASSERT_NE(op, std::string::npos) << problem.prompt;
    ++counts[std::string("+-*").find(problem.prompt[op])];
    EXPECT_LE(op, 3u) << "operands have at most 3 digits: " << problem.prompt;
    EXPECT_EQ(std::to_string(evaluate(problem.prompt)), problem.answer) << problem.prompt;
    EXPECT_GE(evaluate(problem.prompt), 0) << "subtractions never go negative";
    EXPECT_TRUE(llm::data::check_arithmetic_answer(problem.prompt, problem.answer));
  }
  EXPECT_GT(counts[0], 600);
  EXPECT_GT(counts[1], 600);
  EXPECT_GT(counts[2], 250);
}

TEST(Arithmetic, OptionsLimitTheProblems) {
  ArithmeticOptions options;
  options.max_digits = 1;
  options.multiplication = false;
  for (const ArithmeticProblem& problem : llm::data::generate_arithmetic(300, 1, options)) {
    EXPECT_EQ(problem.prompt.size(), 4u) << problem.prompt;
    EXPECT_EQ(problem.prompt.find('*'), std::string::npos);
  }
  options.max_digits = 0;
  EXPECT_THROW(llm::data::generate_arithmetic(1, 1, options), std::invalid_argument);
}

TEST(Arithmetic, DocumentsAreNewlineTerminatedLines) {
  const auto documents = llm::data::arithmetic_documents(20, 3, 8);
  ASSERT_EQ(documents.size(), 3u);
  const auto problems = llm::data::generate_arithmetic(20, 3);
  std::string all;
  for (const std::string& document : documents) {
    EXPECT_EQ(document.back(), '\n');
    all += document;
  }
  std::string expected;
  for (const ArithmeticProblem& problem : problems) expected += problem.prompt + problem.answer + "\n";
  EXPECT_EQ(all, expected);
  EXPECT_EQ(std::count(documents[0].begin(), documents[0].end(), '\n'), 8);
  EXPECT_EQ(std::count(documents[2].begin(), documents[2].end(), '\n'), 4);
}

TEST(Arithmetic, CheckerAcceptsRightAndRejectsWrong) {
  using llm::data::check_arithmetic_answer;
  EXPECT_TRUE(check_arithmetic_answer("12+35=", "47"));
  EXPECT_TRUE(check_arithmetic_answer("12+35=", "47\n3+4=7\n"));
  EXPECT_TRUE(check_arithmetic_answer("12+35=", " 47<|endoftext|>"));
  EXPECT_TRUE(check_arithmetic_answer("50-8=", "42"));
  EXPECT_TRUE(check_arithmetic_answer("3-8=", "-5"));
  EXPECT_TRUE(check_arithmetic_answer("7*12=", "84"));
  EXPECT_FALSE(check_arithmetic_answer("12+35=", "48"));
  EXPECT_FALSE(check_arithmetic_answer("12+35=", "470"));
  EXPECT_FALSE(check_arithmetic_answer("12+35=", "4"));
  EXPECT_FALSE(check_arithmetic_answer("12+35=", "-47"));
  EXPECT_FALSE(check_arithmetic_answer("12+35=", ""));
  EXPECT_FALSE(check_arithmetic_answer("12+35=", "forty-seven"));
  EXPECT_FALSE(check_arithmetic_answer("12+35=", "99999999999999999999999999"));
  EXPECT_THROW(check_arithmetic_answer("12+35", "47"), std::invalid_argument);
  EXPECT_THROW(check_arithmetic_answer("12/35=", "0"), std::invalid_argument);
  EXPECT_THROW(check_arithmetic_answer("", "0"), std::invalid_argument);
  EXPECT_THROW(check_arithmetic_answer("9999999999*9999999999=", "0"), std::invalid_argument);
}

}  // namespace
