// SFT readers (TRL's messages, prompt/completion and instruction/response records), the built-in arithmetic
// conversations, and tokenisation into ids and labels through a chat template.
#include "data/sft_dataset.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <stdexcept>

#include "data/arithmetic.h"

namespace llm::data {
namespace {

using json = nlohmann::json;

// A short, printable excerpt of untrusted text for error messages.
std::string excerpt(std::string_view text) {
  constexpr size_t kMaxChars = 60;
  std::string out;
  for (size_t i = 0; i < text.size() && i < kMaxChars; ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    out.push_back(c < 0x20 || c == 0x7f ? '?' : static_cast<char>(c));
  }
  if (text.size() > kMaxChars) out += "...";
  return out;
}

bool is_blank(std::string_view text) {
  return text.find_first_not_of(" \t\r\n") == std::string_view::npos;
}

[[noreturn]] void bad(const std::string& expected, const std::string& found) {
  throw std::invalid_argument("expected " + expected + ", found " + found);
}

std::string type_of(const json& value) {
  return std::string("a JSON ") + value.type_name();
}

const std::string& string_field(const json& record, const char* key, const std::string& where) {
  const auto it = record.find(key);
  if (it == record.end()) bad(where + " with a string \"" + key + "\"", "no \"" + std::string(key) + "\"");
  if (!it->is_string()) bad("\"" + std::string(key) + "\" to be a string", type_of(*it));
  return it->get_ref<const std::string&>();
}

// A JSON list of {role, content} objects; `field` names it in messages.
std::vector<ChatMessage> parse_message_list(const json& list, const std::string& field) {
  if (!list.is_array()) bad("\"" + field + "\" to be a list of messages", type_of(list));
  if (list.empty()) bad("\"" + field + "\" to hold at least one message", "an empty list");
  std::vector<ChatMessage> messages;
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string where = field + "[" + std::to_string(i) + "]";
    const json& m = list[i];
    if (!m.is_object()) bad(where + " to be an object with \"role\" and \"content\"", type_of(m));
    ChatMessage message;
    message.role = string_field(m, "role", where);
    message.content = string_field(m, "content", where);
    if (message.role != "system" && message.role != "user" && message.role != "assistant") {
      bad(where + ".role to be system, user or assistant", "\"" + excerpt(message.role) + "\"");
    }
    messages.push_back(std::move(message));
  }
  return messages;
}

void check_conversation(const std::vector<ChatMessage>& messages) {
  bool has_assistant = false;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (messages[i].role != "assistant") continue;
    has_assistant = true;
    if (messages[i].content.empty())
      bad("a non-empty assistant turn", "an empty one (message " + std::to_string(i) + ")");
  }
  if (!has_assistant) bad("at least one assistant turn", "none");
}

std::ifstream open_for_reading(const std::string& path) {
  if (std::filesystem::is_directory(path))
    throw std::runtime_error(path + ": expected a file, found a folder");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  return in;
}

}  // namespace

std::vector<ChatMessage> sft_messages_from_json(const json& record) {
  if (!record.is_object()) bad("a JSON object", type_of(record));
  std::vector<ChatMessage> messages;
  if (record.contains("messages")) {
    messages = parse_message_list(record["messages"], "messages");
  } else if (record.contains("prompt") || record.contains("completion")) {
    if (!record.contains("prompt")) bad("\"prompt\" beside \"completion\"", "no \"prompt\"");
    if (!record.contains("completion")) bad("\"completion\" beside \"prompt\"", "no \"completion\"");
    const json& prompt = record["prompt"];
    const json& completion = record["completion"];
    if (prompt.is_array() || completion.is_array()) {  // conversational prompt/completion
      messages = parse_message_list(prompt, "prompt");
      std::vector<ChatMessage> reply = parse_message_list(completion, "completion");
      for (const ChatMessage& m : reply) {
        if (m.role != "assistant")
          bad("only assistant messages in \"completion\"", "role \"" + m.role + "\"");
      }
      messages.insert(messages.end(), reply.begin(), reply.end());
    } else {
      const std::string p = string_field(record, "prompt", "an object");
      const std::string c = string_field(record, "completion", "an object");
      if (c.empty()) bad("a non-empty \"completion\"", "an empty string");
      messages = {{"user", p}, {"assistant", c}};
    }
  } else if (record.contains("instruction") || record.contains("response")) {
    const std::string instruction = string_field(record, "instruction", "an object");
    const std::string response = string_field(record, "response", "an object");
    if (response.empty()) bad("a non-empty \"response\"", "an empty string");
    std::string user = instruction;
    const auto input = record.find("input");
    if (input != record.end() && !input->is_null()) {
      if (!input->is_string()) bad("\"input\" to be a string", type_of(*input));
      if (!input->get_ref<const std::string&>().empty()) user += "\n\n" + input->get<std::string>();
    }
    messages = {{"user", user}, {"assistant", response}};
  } else {
    std::string keys;
    for (const auto& item : record.items()) keys += (keys.empty() ? "" : ", ") + excerpt(item.key());
    bad("\"messages\", \"prompt\"/\"completion\" or \"instruction\"/\"response\"",
        "keys: " + (keys.empty() ? std::string("none") : keys));
  }
  check_conversation(messages);
  return messages;
}

SftFile read_sft_jsonl(const std::string& path, bool skip_bad_lines) {
  std::ifstream in = open_for_reading(path);
  SftFile result;
  std::string line;
  int64_t line_number = 0;
  while (std::getline(in, line)) {
    ++line_number;
    if (is_blank(line)) continue;
    const std::string where = path + ":" + std::to_string(line_number);
    std::string error;
    const json record = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (record.is_discarded()) {
      error = where + ": expected a JSON object, found invalid JSON: " + excerpt(line);
    } else {
      try {
        result.examples.push_back({sft_messages_from_json(record), where});
        continue;
      } catch (const std::invalid_argument& e) {
        error = where + ": " + e.what();
      }
    }
    if (!skip_bad_lines) throw std::runtime_error(error);
    if (result.skipped_lines == 0) result.first_skipped_error = error;
    ++result.skipped_lines;
  }
  if (in.bad()) throw std::runtime_error(path + ": read error: " + std::strerror(errno));
  return result;
}

std::vector<SftExample> arithmetic_sft_examples(int count, uint64_t seed) {
  std::vector<SftExample> examples;
  const std::vector<ArithmeticProblem> problems = generate_arithmetic(count, seed);
  examples.reserve(problems.size());
  for (size_t i = 0; i < problems.size(); ++i) {
    examples.push_back({{{"system", std::string(kArithmeticSftSystem)},
                         {"user", problems[i].prompt},
                         {"assistant", problems[i].answer}},
                        std::string(kBuiltinArithmeticSft) + ":" + std::to_string(i)});
  }
  return examples;
}

std::vector<SftExample> builtin_arithmetic_sft_examples() {
  constexpr int kCount = 4096;
  constexpr uint64_t kSeed = 1234;
  return arithmetic_sft_examples(kCount, kSeed);
}

std::shared_ptr<SftDataset> tokenize_sft_examples(const std::string& name,
                                                  const std::vector<SftExample>& examples,
                                                  const Tokenizer& tokenizer,
                                                  const ChatTemplate& chat_template,
                                                  const SftOptions& options) {
  if (options.max_length < 2) {
    throw std::invalid_argument(name + ": max_length must be at least 2, found " +
                                std::to_string(options.max_length));
  }
  const int vocab = options.model_vocab_size > 0 ? options.model_vocab_size : tokenizer.vocab_size();
  auto dataset = std::make_shared<SftDataset>();
  dataset->name = name;
  dataset->max_length = options.max_length;
  RenderOptions render;
  render.enable_thinking = options.enable_thinking;
  for (const SftExample& example : examples) {
    std::vector<ChatMessage> messages;
    for (const ChatMessage& m : example.messages) {
      if (options.drop_system_prompt && m.role == "system") continue;
      messages.push_back(m);
    }
    TokenizedChat tokens;
    try {
      check_conversation(messages);
      tokens = tokenize_chat(tokenizer, render_chat(chat_template, messages, render));
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(example.source + ": " + e.what());
    }
    size_t length = tokens.ids.size();
    const bool truncated = length > static_cast<size_t>(options.max_length);
    if (truncated) length = static_cast<size_t>(options.max_length);
    int64_t targets = 0;
    for (size_t i = 0; i < length; ++i) {
      const int32_t id = tokens.ids[i];
      if (id < 0 || id >= vocab) {
        throw std::runtime_error(example.source + ": token id " + std::to_string(id) +
                                 " is outside the model's vocabulary of " + std::to_string(vocab));
      }
      const bool trained = !options.completion_only_loss || tokens.assistant_mask[i] != 0;
      if (trained && i > 0) ++targets;
    }
    if (targets == 0) {
      ++dataset->stats.dropped_no_target;
      continue;
    }
    if (truncated) ++dataset->stats.truncated;
    for (size_t i = 0; i < length; ++i) {
      const bool trained = !options.completion_only_loss || tokens.assistant_mask[i] != 0;
      dataset->ids.push_back(tokens.ids[i]);
      dataset->labels.push_back(trained ? tokens.ids[i] : kIgnoreIndex);
    }
    dataset->example_begin.push_back(static_cast<int64_t>(dataset->ids.size()));
    dataset->example_source.push_back(example.source);
    dataset->stats.tokens += static_cast<int64_t>(length);
    dataset->stats.target_tokens += targets;
  }
  dataset->stats.examples = dataset->num_examples();
  return dataset;
}

std::shared_ptr<SftDataset> load_sft_dataset(const std::string& path, const Tokenizer& tokenizer,
                                             const SftOptions& options) {
  const ChatTemplate chat_template =
      load_chat_template(options.chat_template.empty() ? std::string("chatml") : options.chat_template);
  SftFile file;
  if (path == kBuiltinArithmeticSft) {
    file.examples = builtin_arithmetic_sft_examples();
  } else {
    const std::string_view suffix = ".jsonl";
    if (path.size() < suffix.size() ||
        path.compare(path.size() - suffix.size(), suffix.size(), suffix) != 0) {
      throw std::runtime_error(path + ": expected a .jsonl file of SFT records or " +
                               std::string(kBuiltinArithmeticSft));
    }
    file = read_sft_jsonl(path, options.skip_bad_lines);
    if (file.skipped_lines > 0) {
      std::cerr << path << ": skipped " << file.skipped_lines
                << " bad line(s); the first: " << file.first_skipped_error << "\n";
    }
  }
  std::shared_ptr<SftDataset> dataset =
      tokenize_sft_examples(path, file.examples, tokenizer, chat_template, options);
  dataset->stats.skipped_lines = file.skipped_lines;
  dataset->stats.first_skipped_error = file.first_skipped_error;
  return dataset;
}

}  // namespace llm::data
