// Chat templates against transformers' apply_chat_template (tests/fixtures/tokenizers/chat_templates.json,
// written by dev/reference/tokenizer_fixtures.py): the rendered text, the token ids, and the assistant spans.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/bpe_tokenizer.h"
#include "data/chat_template.h"
#include "data/tokenizer_factory.h"

namespace llm::data {
namespace {

using json = nlohmann::json;

const std::string kFixtures = std::string(LLM_SOURCE_DIR) + "/tests/fixtures/tokenizers";

const json& fixture() {
  static const json data = [] {
    std::ifstream in(kFixtures + "/chat_templates.json");
    return json::parse(in);
  }();
  return data;
}

std::vector<ChatMessage> messages_of(const json& list) {
  std::vector<ChatMessage> messages;
  for (const json& m : list)
    messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
  return messages;
}

RenderOptions options_of(const json& c) {
  RenderOptions options;
  options.add_generation_prompt = c["add_generation_prompt"].get<bool>();
  options.enable_thinking = c.value("enable_thinking", false);
  return options;
}

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

const std::string& end_of_turn(ChatFormat format) {
  static const std::string im_end = "<|im_end|>", eot = "<|eot_id|>";
  return format == ChatFormat::kLlama3 ? eot : im_end;
}

void check_template(const json& entry, const ChatTemplate& chat_template) {
  const std::string label = entry["name"].get<std::string>();
  const auto tokenizer = make_tokenizer(kFixtures + "/" + entry["tokenizer"].get<std::string>());
  ASSERT_GE(entry["cases"].size(), 8u);
  for (const json& c : entry["cases"]) {
    const std::vector<ChatMessage> messages = messages_of(c["messages"]);
    const RenderedChat chat = render_chat(chat_template, messages, options_of(c));
    const std::string context =
        label + ": " + c["messages"].dump() + " gen=" + c["add_generation_prompt"].dump();
    EXPECT_EQ(chat.text, c["text"].get<std::string>()) << context;

    // One span per assistant message, each ending with the end-of-turn token.
    size_t assistants = 0;
    for (const ChatMessage& m : messages) assistants += m.role == "assistant";
    ASSERT_EQ(chat.assistant_spans.size(), assistants) << context;
    for (const TextSpan& span : chat.assistant_spans) {
      const std::string piece = chat.text.substr(span.begin, span.end - span.begin);
      EXPECT_TRUE(ends_with(piece, end_of_turn(chat_template.format))) << context << " span: " << piece;
      EXPECT_EQ(piece.find("<|im_start|>"), std::string::npos) << context;
      EXPECT_EQ(piece.find("<|start_header_id|>"), std::string::npos) << context;
    }

    // Tokens: the same ids as `tokenizers` on the whole text unless an assistant message starts with
    // whitespace (tokenize_chat cuts there); the mask covers exactly the span tokens.
    const TokenizedChat tokens = tokenize_chat(*tokenizer, chat);
    EXPECT_EQ(tokenizer->decode(tokens.ids), chat.text) << context;
    bool cut_inside_whitespace = false;
    for (const TextSpan& span : chat.assistant_spans) {
      const char first = chat.text[span.begin];
      cut_inside_whitespace |= first == ' ' || first == '\n' || first == '\t';
    }
    if (!cut_inside_whitespace) {
      EXPECT_EQ(tokens.ids, c["ids"].get<std::vector<int32_t>>()) << context;
    }
    ASSERT_EQ(tokens.assistant_mask.size(), tokens.ids.size());
    ASSERT_EQ(tokens.assistant_token_spans.size(), chat.assistant_spans.size());
    size_t masked = 0;
    for (size_t k = 0; k < chat.assistant_spans.size(); ++k) {
      const TextSpan& t = tokens.assistant_token_spans[k];
      const TextSpan& s = chat.assistant_spans[k];
      const std::vector<int32_t> span_ids(tokens.ids.begin() + static_cast<std::ptrdiff_t>(t.begin),
                                          tokens.ids.begin() + static_cast<std::ptrdiff_t>(t.end));
      EXPECT_EQ(tokenizer->decode(span_ids), chat.text.substr(s.begin, s.end - s.begin)) << context;
      EXPECT_EQ(span_ids.back(), tokenizer->token_to_id(end_of_turn(chat_template.format))) << context;
      for (size_t i = t.begin; i < t.end; ++i) EXPECT_EQ(tokens.assistant_mask[i], 1);
      masked += t.end - t.begin;
    }
    size_t ones = 0;
    for (const uint8_t bit : tokens.assistant_mask) ones += bit;
    EXPECT_EQ(ones, masked) << context;
  }
}

const json& entry_named(const std::string& name) {
  for (const json& entry : fixture()["templates"]) {
    if (entry["name"] == name) return entry;
  }
  throw std::runtime_error("no fixture entry " + name);
}

TEST(ChatTemplate, RecognisedTemplatesMatchTransformers) {
  for (const json& entry : fixture()["templates"]) {
    const std::string bos = entry["bos_token"].is_string() ? entry["bos_token"].get<std::string>() : "";
    const ChatTemplate t = chat_template_from_jinja(entry["chat_template"].get<std::string>(), bos);
    EXPECT_EQ(t.name, entry["name"].get<std::string>());
    check_template(entry, t);
  }
}

TEST(ChatTemplate, NamedTemplatesMatchTransformers) {
  for (const char* name : {"chatml", "qwen2.5", "llama3", "llama3.1", "llama3.2", "qwen3"})
    check_template(entry_named(name), chat_template_by_name(name));
}

TEST(ChatTemplate, RecognisesFormats) {
  const ChatTemplate qwen25 =
      chat_template_from_jinja(entry_named("qwen2.5")["chat_template"].get<std::string>());
  EXPECT_EQ(qwen25.format, ChatFormat::kChatML);
  EXPECT_EQ(qwen25.default_system, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.");
  // Qwen2's template inserts its default system prompt inside a loop.
  const ChatTemplate qwen2 = chat_template_from_jinja(
      "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
      "'<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
      "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}");
  EXPECT_EQ(qwen2.name, "qwen2");
  EXPECT_EQ(qwen2.default_system, "You are a helpful assistant.");
  EXPECT_EQ(
      chat_template_from_jinja(entry_named("chatml")["chat_template"].get<std::string>()).default_system, "");
  const ChatTemplate llama =
      chat_template_from_jinja(entry_named("llama3")["chat_template"].get<std::string>());
  EXPECT_EQ(llama.format, ChatFormat::kLlama3);
  EXPECT_EQ(llama.bos_token, "<|begin_of_text|>");
  EXPECT_EQ(chat_template_from_jinja(entry_named("qwen3")["chat_template"].get<std::string>()).format,
            ChatFormat::kQwen3);

  EXPECT_THROW(chat_template_from_jinja("{{ messages }}"), std::runtime_error);
  // Llama-3.1: the date from date_string's default, from a literal, or the clock (3.2, with the fallback).
  const ChatTemplate llama31 =
      chat_template_from_jinja(entry_named("llama3.1")["chat_template"].get<std::string>());
  EXPECT_EQ(llama31.name, "llama3.1");
  EXPECT_EQ(llama31.date, "26 Jul 2024");
  EXPECT_FALSE(llama31.date_from_clock);
  const ChatTemplate llama32 =
      chat_template_from_jinja(entry_named("llama3.2")["chat_template"].get<std::string>());
  EXPECT_EQ(llama32.name, "llama3.2");
  EXPECT_EQ(llama32.date, "26 Jul 2024");
  EXPECT_TRUE(llama32.date_from_clock);
  const ChatTemplate literal = chat_template_from_jinja(
      "{{- bos_token }}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: "
      "December 2023\\nToday Date: 26 July 2024\\n\\n' }}{{- '<|eot_id|>' }}");
  EXPECT_EQ(literal.date, "26 July 2024");
  EXPECT_EQ(
      render_chat(literal, {{"user", "Hi"}}).text,
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December "
      "2023\nToday Date: 26 July 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>");
  // A Llama-3.1-style template whose date cannot be read is refused.
  EXPECT_THROW(chat_template_from_jinja("<|start_header_id|> Cutting Knowledge Date <|eot_id|>"),
               std::runtime_error);
  EXPECT_THROW(chat_template_from_jinja("<|im_start|>assistant\\n<think>\\n"), std::runtime_error);
  EXPECT_THROW(chat_template_by_name("vicuna"), std::invalid_argument);
}

TEST(ChatTemplate, LoadsFromTokenizerFolders) {
  const ChatTemplate qwen = load_chat_template(kFixtures + "/qwen2");
  EXPECT_EQ(qwen.name, "qwen2.5");
  const ChatTemplate llama = load_chat_template(kFixtures + "/llama3/tokenizer.json");
  EXPECT_EQ(llama.format, ChatFormat::kLlama3);
  EXPECT_EQ(llama.bos_token, "<|begin_of_text|>");
  EXPECT_EQ(load_chat_template("qwen3").format, ChatFormat::kQwen3);
  // gpt2's tokenizer_config.json has no chat_template.
  EXPECT_THROW(load_chat_template(kFixtures + "/gpt2"), std::runtime_error);
}

TEST(ChatTemplate, Qwen3SpansAndThinkBlocks) {
  const ChatTemplate t = chat_template_by_name("qwen3");
  const RenderedChat chat = render_chat(
      t, {{"user", "Q1"}, {"assistant", "<think>r1</think>A1"}, {"user", "Q2"}, {"assistant", "A2"}});
  // The earlier turn loses its reasoning; the final one gets an empty think block outside its span.
  EXPECT_EQ(
      chat.text,
      "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
      "<|im_start|>assistant\n<think>\n\n</think>\n\nA2<|im_end|>\n");
  ASSERT_EQ(chat.assistant_spans.size(), 2u);
  EXPECT_EQ(chat.text.substr(chat.assistant_spans[0].begin,
                             chat.assistant_spans[0].end - chat.assistant_spans[0].begin),
            "A1<|im_end|>");
  EXPECT_EQ(chat.text.substr(chat.assistant_spans[1].begin,
                             chat.assistant_spans[1].end - chat.assistant_spans[1].begin),
            "A2<|im_end|>");
  // Kept reasoning belongs to the span.
  const RenderedChat thought = render_chat(t, {{"user", "Q"}, {"assistant", "<think>\nr\n</think>\n\nA"}});
  EXPECT_EQ(thought.text.substr(thought.assistant_spans[0].begin), "<think>\nr\n</think>\n\nA<|im_end|>\n");
  EXPECT_TRUE(ends_with(render_chat(t, {{"user", "Q"}}, {true, false}).text,
                        "<|im_start|>assistant\n<think>\n\n</think>\n\n"));
  EXPECT_TRUE(ends_with(render_chat(t, {{"user", "Q"}}, {true, true}).text, "<|im_start|>assistant\n"));
}

TEST(ChatTemplate, RejectsBadConversations) {
  const ChatTemplate t = chat_template_by_name("chatml");
  EXPECT_THROW(render_chat(t, {}), std::invalid_argument);
  try {
    render_chat(t, {{"user", "hi"}, {"tool", "{}"}});
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("\"tool\""), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace llm::data
