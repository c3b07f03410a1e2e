// The chat formats of chat_template.h, written out as string building.
#include "data/chat_template.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

#include "data/tokenizer_factory.h"
#include "data/unicode_normalize.h"

namespace llm::data {
namespace {

using json = nlohmann::json;

constexpr std::string_view kQwen2System = "You are a helpful assistant.";
constexpr std::string_view kQwen25System =
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
constexpr std::string_view kLlama3Bos = "<|begin_of_text|>";
// Meta's Llama-3.1/3.2 templates fall back to this date when none is given.
constexpr std::string_view kLlama31Date = "26 Jul 2024";

bool contains(std::string_view text, std::string_view part) {
  return text.find(part) != std::string_view::npos;
}

// Python's str.isspace, which Jinja's trim filter (str.strip) uses.
bool is_python_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

std::string_view python_strip(std::string_view text) {
  size_t begin = 0;
  while (begin < text.size()) {
    char32_t cp = 0;
    const int n = utf8_decode(text, begin, &cp);
    if (n == 0 || !is_python_space(cp)) break;
    begin += n;
  }
  size_t end = text.size();
  while (end > begin) {
    size_t start = end - 1;
    while (start > begin && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80 && end - start < 4)
      --start;
    char32_t cp = 0;
    if (utf8_decode(text, start, &cp) != static_cast<int>(end - start) || !is_python_space(cp)) break;
    end = start;
  }
  return text.substr(begin, end - begin);
}

// Python's str.strip('\n'), lstrip('\n'), rstrip('\n').
std::string_view lstrip_newlines(std::string_view s) {
  const size_t begin = s.find_first_not_of('\n');
  return begin == std::string_view::npos ? std::string_view() : s.substr(begin);
}
std::string_view rstrip_newlines(std::string_view s) {
  const size_t end = s.find_last_not_of('\n');
  return end == std::string_view::npos ? std::string_view() : s.substr(0, end + 1);
}

void check_messages(const std::vector<ChatMessage>& messages) {
  if (messages.empty()) throw std::invalid_argument("chat: the conversation has no messages");
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& role = messages[i].role;
    if (role != "system" && role != "user" && role != "assistant") {
      throw std::invalid_argument("chat: message " + std::to_string(i) + " has role \"" + role +
                                  "\"; expected \"system\", \"user\" or \"assistant\"");
    }
  }
}

// A ChatML turn; assistant turns record their span (content and <|im_end|>).
void chatml_turn(RenderedChat& out, std::string_view role, std::string_view content) {
  out.text += "<|im_start|>";
  out.text += role;
  out.text += '\n';
  const size_t begin = out.text.size();
  out.text += content;
  out.text += "<|im_end|>";
  if (role == "assistant") out.assistant_spans.push_back({begin, out.text.size()});
  out.text += '\n';
}

RenderedChat render_chatml(const ChatTemplate& t, const std::vector<ChatMessage>& messages,
                           const RenderOptions& options) {
  RenderedChat out;
  if (!t.default_system.empty() && messages[0].role != "system") chatml_turn(out, "system", t.default_system);
  for (const ChatMessage& m : messages) chatml_turn(out, m.role, m.content);
  if (options.add_generation_prompt) out.text += "<|im_start|>assistant\n";
  return out;
}

// One Llama-3 turn: header, stripped content, <|eot_id|>; an assistant's content and <|eot_id|> form a span.
void llama3_turn(RenderedChat& out, const ChatMessage& m) {
  out.text += "<|start_header_id|>";
  out.text += m.role;
  out.text += "<|end_header_id|>\n\n";
  const size_t begin = out.text.size();
  out.text += python_strip(m.content);
  out.text += "<|eot_id|>";
  if (m.role == "assistant") out.assistant_spans.push_back({begin, out.text.size()});
}

RenderedChat render_llama3(const ChatTemplate& t, const std::vector<ChatMessage>& messages,
                           const RenderOptions& options) {
  RenderedChat out;
  out.text += t.bos_token;
  for (const ChatMessage& m : messages) llama3_turn(out, m);
  if (options.add_generation_prompt) out.text += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

// Llama-3.1: the system header (cutoff, date, the leading system message) first, then Llama-3's turns.
RenderedChat render_llama31(const ChatTemplate& t, const std::vector<ChatMessage>& messages,
                            const RenderOptions& options) {
  RenderedChat out;
  const bool leading_system = messages[0].role == "system";
  out.text += t.bos_token;
  out.text +=
      "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: ";
  out.text += t.date;
  out.text += "\n\n";
  if (leading_system) out.text += python_strip(messages[0].content);
  out.text += "<|eot_id|>";
  for (size_t i = leading_system ? 1 : 0; i < messages.size(); ++i) llama3_turn(out, messages[i]);
  if (options.add_generation_prompt) out.text += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

bool is_tool_response(std::string_view content) {
  constexpr std::string_view open = "<tool_response>", close = "</tool_response>";
  return content.size() >= open.size() && content.substr(0, open.size()) == open &&
         content.size() >= close.size() && content.substr(content.size() - close.size()) == close;
}

RenderedChat render_qwen3(const std::vector<ChatMessage>& messages, const RenderOptions& options) {
  RenderedChat out;
  const size_t n = messages.size();
  // The last user message that is a real query (not a wrapped tool response).
  size_t last_query = n - 1;
  for (size_t k = n; k-- > 0;) {
    if (messages[k].role == "user" && !is_tool_response(messages[k].content)) {
      last_query = k;
      break;
    }
  }
  for (size_t i = 0; i < n; ++i) {
    const ChatMessage& m = messages[i];
    if (m.role != "assistant") {
      out.text += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      continue;
    }
    std::string_view content = m.content;
    std::string_view reasoning;
    constexpr std::string_view close = "</think>", open = "<think>";
    const size_t first_close = content.find(close);
    if (first_close != std::string_view::npos) {
      // content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n')
      std::string_view before = rstrip_newlines(content.substr(0, first_close));
      const size_t last_open = before.rfind(open);
      if (last_open != std::string_view::npos) before = before.substr(last_open + open.size());
      reasoning = lstrip_newlines(before);
      // content.split('</think>')[-1].lstrip('\n')
      content = lstrip_newlines(content.substr(content.rfind(close) + close.size()));
    }
    out.text += "<|im_start|>assistant\n";
    size_t begin = out.text.size();
    if (i > last_query && (i + 1 == n || !reasoning.empty())) {
      const std::string_view stripped = lstrip_newlines(rstrip_newlines(reasoning));
      out.text += "<think>\n";
      out.text += stripped;
      out.text += "\n</think>\n\n";
      if (stripped.empty()) begin = out.text.size();  // the empty block is prompt, not model output
      content = lstrip_newlines(content);
    }
    out.text += content;
    out.text += "<|im_end|>";
    out.assistant_spans.push_back({begin, out.text.size()});
    out.text += '\n';
  }
  if (options.add_generation_prompt) {
    out.text += "<|im_start|>assistant\n";
    if (!options.enable_thinking) out.text += "<think>\n\n</think>\n\n";
  }
  return out;
}

// Jinja string-literal escapes in a captured literal.
std::string unescape_jinja(std::string_view text) {
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '\\' && i + 1 < text.size()) {
      const char e = text[++i];
      out.push_back(e == 'n' ? '\n' : e == 't' ? '\t' : e);
    } else {
      out.push_back(text[i]);
    }
  }
  return out;
}

// The literal of "<|im_start|>system\n...<|im_end|>" in a ChatML template, or "" when there is none.
std::string default_system_prompt(std::string_view jinja) {
  for (const std::string_view head :
       {std::string_view("<|im_start|>system\\n"), std::string_view("<|im_start|>system\n")}) {
    size_t pos = 0;
    while ((pos = jinja.find(head, pos)) != std::string_view::npos) {
      pos += head.size();
      const size_t end = jinja.find("<|im_end|>", pos);
      if (end == std::string_view::npos) break;
      const std::string_view literal = jinja.substr(pos, end - pos);
      if (!literal.empty() && literal.find_first_of("'\"{}+") == std::string_view::npos) {
        return unescape_jinja(literal);
      }
    }
  }
  return "";
}

// The date of a Llama-3.1 system header: a literal after "Today Date: " (Unsloth's copies write one), or
// else the literal default of date_string (Meta's templates: {%- set date_string = "26 Jul 2024" %}).
std::string llama31_date(std::string_view jinja) {
  const size_t today = jinja.find("Today Date: ");
  if (today != std::string_view::npos) {
    const size_t begin = today + std::string_view("Today Date: ").size();
    const size_t end = jinja.find_first_of("\\\n\"'", begin);  // up to an escaped \n, a newline or a quote
    if (end != std::string_view::npos && end > begin && (jinja[end] == '\\' || jinja[end] == '\n')) {
      return std::string(jinja.substr(begin, end - begin));
    }
  }
  for (const std::string_view head :
       {std::string_view("date_string = \""), std::string_view("date_string = '")}) {
    const size_t pos = jinja.find(head);
    if (pos == std::string_view::npos) continue;
    const size_t begin = pos + head.size();
    const size_t end = jinja.find(head.back(), begin);
    if (end != std::string_view::npos && end > begin) return std::string(jinja.substr(begin, end - begin));
  }
  return "";
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open file");
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

}  // namespace

ChatTemplate chat_template_by_name(std::string_view name) {
  ChatTemplate t;
  t.name = std::string(name);
  if (name == "chatml") {
    t.format = ChatFormat::kChatML;
  } else if (name == "qwen2") {
    t.format = ChatFormat::kChatML;
    t.default_system = std::string(kQwen2System);
  } else if (name == "qwen2.5") {
    t.format = ChatFormat::kChatML;
    t.default_system = std::string(kQwen25System);
  } else if (name == "llama3") {
    t.format = ChatFormat::kLlama3;
    t.bos_token = std::string(kLlama3Bos);
  } else if (name == "llama3.1" || name == "llama3.2") {
    t.format = ChatFormat::kLlama3;
    t.bos_token = std::string(kLlama3Bos);
    t.date = std::string(kLlama31Date);
  } else if (name == "qwen3") {
    t.format = ChatFormat::kQwen3;
  } else {
    throw std::invalid_argument(
        "unknown chat template \"" + std::string(name) +
        "\"; expected one of chatml, qwen2, qwen2.5, llama3, llama3.1, llama3.2, qwen3, or a tokenizer path");
  }
  return t;
}

ChatTemplate chat_template_from_jinja(std::string_view jinja, std::string_view bos_token,
                                      const std::string& source) {
  const std::string supported =
      "; supported: the templates of ChatML (Qwen2/2.5), Llama-3/3.1/3.2/3.3-Instruct and Qwen3, or a name: "
      "chatml, qwen2, qwen2.5, llama3, llama3.1, llama3.2, qwen3";
  if (contains(jinja, "<|start_header_id|>") && contains(jinja, "<|eot_id|>")) {
    if (contains(jinja, "Cutting Knowledge Date")) {
      const bool from_clock = contains(jinja, "strftime_now");
      ChatTemplate t = chat_template_by_name(from_clock ? "llama3.2" : "llama3.1");
      t.date = llama31_date(jinja);
      if (t.date.empty()) {
        throw std::runtime_error(source +
                                 ": a Llama-3.1-style template whose date is neither a \"Today Date: ...\" "
                                 "literal nor a literal default of date_string" +
                                 supported);
      }
      t.date_from_clock = from_clock;
      if (!bos_token.empty()) t.bos_token = std::string(bos_token);
      return t;
    }
    ChatTemplate t = chat_template_by_name("llama3");
    if (!bos_token.empty()) t.bos_token = std::string(bos_token);
    return t;
  }
  if (contains(jinja, "<|im_start|>")) {
    if (contains(jinja, "enable_thinking")) return chat_template_by_name("qwen3");
    if (contains(jinja, "<think>")) {
      throw std::runtime_error(source +
                               ": a ChatML template with <think> handling but no enable_thinking switch "
                               "is not supported" +
                               supported);
    }
    ChatTemplate t = chat_template_by_name("chatml");
    t.default_system = default_system_prompt(jinja);
    if (t.default_system == kQwen2System) t.name = "qwen2";
    if (t.default_system == kQwen25System) t.name = "qwen2.5";
    return t;
  }
  throw std::runtime_error(source + ": unrecognised chat_template" + supported);
}

ChatTemplate load_chat_template(const std::string& spec) {
  namespace fs = std::filesystem;
  std::error_code error;
  if (!fs::exists(fs::path(spec), error)) return chat_template_by_name(spec);
  const TokenizerFiles files = find_tokenizer_files(spec);
  const fs::path folder = fs::path(files.tokenizer_json).parent_path();
  json config;
  if (!files.tokenizer_config.empty()) {
    try {
      config = json::parse(read_text(files.tokenizer_config));
    } catch (const json::parse_error& e) {
      throw std::runtime_error(files.tokenizer_config + ": invalid JSON: " + e.what());
    }
  }
  std::string bos;
  if (config.is_object() && config.contains("bos_token")) {
    const json& b = config["bos_token"];
    if (b.is_string()) bos = b.get<std::string>();
    if (b.is_object() && b.contains("content") && b["content"].is_string())
      bos = b["content"].get<std::string>();
  }
  const fs::path jinja_file = folder / "chat_template.jinja";
  if (fs::is_regular_file(jinja_file, error)) {
    return chat_template_from_jinja(read_text(jinja_file.string()), bos, jinja_file.string());
  }
  if (files.tokenizer_config.empty()) {
    throw std::runtime_error(folder.string() +
                             ": no tokenizer_config.json or chat_template.jinja; name a chat "
                             "template instead (chatml, qwen2, qwen2.5, llama3, qwen3)");
  }
  const std::string source = files.tokenizer_config + " chat_template";
  const auto it = config.is_object() ? config.find("chat_template") : config.end();
  if (!config.is_object() || it == config.end() || it->is_null()) {
    throw std::runtime_error(files.tokenizer_config +
                             ": chat_template: missing; name a chat template instead "
                             "(chatml, qwen2, qwen2.5, llama3, qwen3)");
  }
  if (it->is_string()) return chat_template_from_jinja(it->get<std::string>(), bos, source);
  if (it->is_array()) {
    for (const json& entry : *it) {
      if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template") &&
          entry["template"].is_string()) {
        return chat_template_from_jinja(entry["template"].get<std::string>(), bos, source);
      }
    }
  }
  throw std::runtime_error(source + ": expected a string or a list with a \"default\" template, found " +
                           std::string(it->type_name()));
}

RenderedChat render_chat(const ChatTemplate& chat_template, const std::vector<ChatMessage>& messages,
                         const RenderOptions& options) {
  check_messages(messages);
  switch (chat_template.format) {
    case ChatFormat::kChatML:
      return render_chatml(chat_template, messages, options);
    case ChatFormat::kLlama3:
      return chat_template.date.empty() ? render_llama3(chat_template, messages, options)
                                        : render_llama31(chat_template, messages, options);
    case ChatFormat::kQwen3:
      return render_qwen3(messages, options);
  }
  throw std::invalid_argument("chat: unknown format");
}

TokenizedChat tokenize_chat(const Tokenizer& tokenizer, const RenderedChat& chat) {
  TokenizedChat out;
  const std::string_view text = chat.text;
  size_t position = 0;
  const auto append = [&](size_t begin, size_t end, bool assistant) {
    if (end <= begin) return;
    const std::vector<int32_t> ids = tokenizer.encode(text.substr(begin, end - begin));
    out.ids.insert(out.ids.end(), ids.begin(), ids.end());
    out.assistant_mask.insert(out.assistant_mask.end(), ids.size(), assistant ? 1 : 0);
  };
  for (const TextSpan& span : chat.assistant_spans) {
    if (span.begin < position || span.end < span.begin || span.end > text.size()) {
      throw std::invalid_argument(
          "tokenize_chat: assistant spans must be ordered, disjoint and inside the text");
    }
    append(position, span.begin, false);
    const size_t first = out.ids.size();
    append(span.begin, span.end, true);
    out.assistant_token_spans.push_back({first, out.ids.size()});
    position = span.end;
  }
  append(position, text.size(), false);
  return out;
}

}  // namespace llm::data
