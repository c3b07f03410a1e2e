// Chat templates as code, not Jinja: the formats of the model families we train, rendered exactly as their
// tokenizer_config.json chat_template renders them with transformers' apply_chat_template, plus where each
// assistant turn lies (for loss masking).
//
//   ChatML   (Qwen2, Qwen2.5, plain ChatML)
//            [<|im_start|>system\nDEFAULT<|im_end|>\n]   when default_system is set and messages[0] is not
//            system
//            <|im_start|>ROLE\nCONTENT<|im_end|>\n        for every message
//            <|im_start|>assistant\n                      generation prompt
//   Llama-3  (Llama-3-Instruct)
//            BOS before the first message, then
//            <|start_header_id|>ROLE<|end_header_id|>\n\nstrip(CONTENT)<|eot_id|> generation prompt
//            <|start_header_id|>assistant<|end_header_id|>\n\n
//   Llama-3.1 (Llama-3.1/3.2/3.3-Instruct, without tools): Llama-3 with a system header always first,
//            <|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n
//            Today Date: DATE\n\nstrip(SYSTEM)<|eot_id|>, SYSTEM being a leading system message (or empty).
//   Qwen3    ChatML without a default system prompt; assistant turns after the last user message get a
//            <think>\nREASONING\n</think>\n\n block (empty for the final turn when it has no reasoning),
//            earlier turns lose theirs; reasoning is read from "<think>...</think>" in the content. The
//            generation prompt is <|im_start|>assistant\n, followed by an empty <think>\n\n</think>\n\n
//            block when enable_thinking is false.
//
// Assistant spans cover what the model must learn to write: the content and the end-of-turn token
// (<|im_end|> or <|eot_id|>), not the role header, and not the newline after <|im_end|>. For Qwen3 an
// empty think block is part of the prompt (it is what the generation prompt holds with thinking off), a
// non-empty one belongs to the span.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "data/tokenizer.h"

namespace llm::data {

enum class ChatFormat { kChatML, kLlama3, kQwen3 };

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

struct ChatTemplate {
  ChatFormat format = ChatFormat::kChatML;
  std::string name;            // "chatml", "qwen2", "qwen2.5", "llama3" or "qwen3": for messages
  std::string default_system;  // ChatML: the system turn added when the conversation has none
  std::string bos_token;       // Llama-3: written before the first message
  std::string date;            // Llama-3.1: the "Today Date" of its system header ("" for Llama-3.0)
  // Llama-3.2: transformers renders the day of the run (strftime_now); we write `date` (the template's
  // fallback), so that a run renders its data the same way every day and resumes bit for bit.
  bool date_from_clock = false;
};

struct RenderOptions {
  bool add_generation_prompt = false;
  bool enable_thinking = false;  // Qwen3 only: false adds the empty think block to the generation prompt
};

struct TextSpan {
  size_t begin = 0;  // [begin, end): bytes of the rendered text, or token indices
  size_t end = 0;
};

struct RenderedChat {
  std::string text;
  std::vector<TextSpan> assistant_spans;  // one per assistant message, in order
};

struct TokenizedChat {
  std::vector<int32_t> ids;
  std::vector<uint8_t> assistant_mask;          // 1 for the tokens of assistant spans
  std::vector<TextSpan> assistant_token_spans;  // token index ranges, one per assistant message
};

// "chatml" (no default system prompt), "qwen2" ("You are a helpful assistant."), "qwen2.5" ("You are Qwen,
// created by Alibaba Cloud. You are a helpful assistant."), "llama3" (bos "<|begin_of_text|>"), "llama3.1"
// and "llama3.2" (Llama-3 with the system header of date "26 Jul 2024"), "qwen3".
// Throws std::invalid_argument listing the names for anything else.
ChatTemplate chat_template_by_name(std::string_view name);

// Recognises a tokenizer_config.json chat_template (the Jinja source) by its distinctive parts:
// "<|start_header_id|>" and "<|eot_id|>" -> Llama-3, or with "Cutting Knowledge Date" Llama-3.1 (its date
// read from the template: a "Today Date: ..." literal or date_string's literal default; "strftime_now"
// makes it "llama3.2"); "<|im_start|>" with "enable_thinking" -> Qwen3; "<|im_start|>" without "<think>" ->
// ChatML, with the default system prompt read from its "<|im_start|>system\n...<|im_end|>" literal, if any.
// bos_token is the tokenizer's (Llama-3 writes it; empty means "<|begin_of_text|>"). Throws
// std::runtime_error starting with source for a template it cannot render exactly.
ChatTemplate chat_template_from_jinja(std::string_view jinja, std::string_view bos_token = "",
                                      const std::string& source = "chat_template");

// spec is a name (above) or the tokenizer path given to make_tokenizer (a folder or its tokenizer.json):
// its chat_template.jinja, else the chat_template of tokenizer_config.json ("default" when it is a list of
// named templates), with bos_token from the same config. Throws std::runtime_error naming the file.
ChatTemplate load_chat_template(const std::string& spec);

// Throws std::invalid_argument for an empty conversation or a role other than system/user/assistant.
RenderedChat render_chat(const ChatTemplate& chat_template, const std::vector<ChatMessage>& messages,
                         const RenderOptions& options = {});

// Tokenizes a rendered chat piece by piece, cutting at the assistant span boundaries, so each token lies
// wholly inside or outside a span and the prompt ends on the same tokens generation would start from.
// This equals encoding the whole text except where an assistant message begins with whitespace.
TokenizedChat tokenize_chat(const Tokenizer& tokenizer, const RenderedChat& chat);

}  // namespace llm::data
