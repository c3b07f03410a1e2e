#include "llm/json_config.h"

#include <algorithm>
#include <fstream>
#include <sstream>

namespace llm {

namespace {

// Converts a byte offset into 1-based line and column numbers.
void line_and_column(const std::string& text, size_t offset, size_t* line, size_t* column) {
  *line = 1;
  *column = 1;
  for (size_t i = 0; i < offset && i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++*line;
      *column = 1;
    } else {
      ++*column;
    }
  }
}

}  // namespace

json parse_json_text(const std::string& text, const std::string& origin) {
  // Configs are shallow; a depth limit keeps hostile nesting from overflowing the stack later, when
  // the value is copied, compared or printed.
  constexpr int kMaxDepth = 64;
  const json::parser_callback_t limit_depth = [&origin](int depth, json::parse_event_t, json&) {
    if (depth > kMaxDepth) {
      throw ConfigError(origin + ": malformed JSON: nested deeper than " + std::to_string(kMaxDepth) +
                        " levels");
    }
    return true;
  };
  try {
    return json::parse(text, limit_depth);
  } catch (const json::parse_error& e) {
    // nlohmann reports the byte position just past the offending character.
    size_t line = 0, column = 0;
    const size_t offset = e.byte > 0 ? e.byte - 1 : 0;
    line_and_column(text, offset, &line, &column);
    std::string reason = e.what();
    const size_t colon = reason.find("syntax error");
    if (colon != std::string::npos) reason = reason.substr(colon);
    throw ConfigError(origin + ":" + std::to_string(line) + ":" + std::to_string(column) +
                      ": malformed JSON: " + reason);
  } catch (const json::exception& e) {  // e.g. a number too large for a double (1e999)
    throw ConfigError(origin + ": malformed JSON: " + e.what());
  }
}

json parse_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("cannot open config file " + path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return parse_json_text(buffer.str(), path);
}

int edit_distance(const std::string& a, const std::string& b) {
  std::vector<int> previous(b.size() + 1), current(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) previous[j] = static_cast<int>(j);
  for (size_t i = 1; i <= a.size(); ++i) {
    current[0] = static_cast<int>(i);
    for (size_t j = 1; j <= b.size(); ++j) {
      const int substitute = previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      current[j] = std::min({previous[j] + 1, current[j - 1] + 1, substitute});
    }
    std::swap(previous, current);
  }
  return previous[b.size()];
}

std::string nearest_key(const std::string& key, const std::vector<std::string>& candidates) {
  std::string best;
  int best_distance = 1 << 30;
  for (const auto& candidate : candidates) {
    const int d = edit_distance(key, candidate);
    if (d < best_distance) {
      best_distance = d;
      best = candidate;
    }
  }
  // A plausible typo changes at most a third of the key (and at least allows two edits).
  const int allowed = std::max(2, static_cast<int>(key.size()) / 3);
  return best_distance <= allowed ? best : "";
}

std::string json_type_name(const json& value) {
  switch (value.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return "a boolean (" + value.dump() + ")";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
      return "an integer (" + value.dump() + ")";
    case json::value_t::number_float:
      return "a number (" + value.dump() + ")";
    case json::value_t::string:
      return "a string (" + value.dump() + ")";
    case json::value_t::array:
      return "an array";
    case json::value_t::object:
      return "an object";
    default:
      return "an unsupported value";
  }
}

KeyReader::KeyReader(const json& object, std::string origin) : object_(object), origin_(std::move(origin)) {
  if (!object_.is_object()) {
    problems_.push_back(origin_ + ": expected a JSON object at the top level, found " +
                        json_type_name(object_));
  }
}

const json* KeyReader::find(const std::string& key) {
  known_.push_back(key);
  if (!object_.is_object()) return nullptr;
  auto it = object_.find(key);
  if (it == object_.end() || it->is_null()) return nullptr;
  return &*it;
}

void KeyReader::wrong_type(const std::string& key, const char* expected, const json& found) {
  problem(key, std::string("expected ") + expected + ", found " + json_type_name(found));
}

void KeyReader::problem(const std::string& key, const std::string& message) {
  problems_.push_back(origin_ + ": key \"" + key + "\": " + message);
}

bool KeyReader::get(const std::string& key, int& value) {
  const json* v = find(key);
  if (!v) return false;
  if (!v->is_number_integer() || v->get<int64_t>() < INT32_MIN || v->get<int64_t>() > INT32_MAX) {
    wrong_type(key, "an integer", *v);
    return true;
  }
  value = v->get<int>();
  return true;
}

bool KeyReader::get(const std::string& key, int64_t& value) {
  const json* v = find(key);
  if (!v) return false;
  if (!v->is_number_integer()) {
    wrong_type(key, "an integer", *v);
    return true;
  }
  value = v->get<int64_t>();
  return true;
}

bool KeyReader::get(const std::string& key, double& value) {
  const json* v = find(key);
  if (!v) return false;
  if (!v->is_number()) {
    wrong_type(key, "a number", *v);
    return true;
  }
  value = v->get<double>();
  return true;
}

bool KeyReader::get(const std::string& key, bool& value) {
  const json* v = find(key);
  if (!v) return false;
  if (!v->is_boolean()) {
    wrong_type(key, "true or false", *v);
    return true;
  }
  value = v->get<bool>();
  return true;
}

bool KeyReader::get(const std::string& key, std::string& value) {
  const json* v = find(key);
  if (!v) return false;
  if (!v->is_string()) {
    wrong_type(key, "a string", *v);
    return true;
  }
  value = v->get<std::string>();
  return true;
}

bool KeyReader::get(const std::string& key, std::vector<std::string>& value) {
  const json* v = find(key);
  if (!v) return false;
  if (v->is_string()) {  // a single string is a list of one
    value = {v->get<std::string>()};
    return true;
  }
  if (!v->is_array() || !std::all_of(v->begin(), v->end(), [](const json& e) { return e.is_string(); })) {
    wrong_type(key, "a list of strings", *v);
    return true;
  }
  value = v->get<std::vector<std::string>>();
  return true;
}

bool KeyReader::get_choice(const std::string& key, std::string& value,
                           const std::vector<std::string>& choices) {
  std::string chosen = value;
  if (!get(key, chosen)) return false;
  if (std::find(choices.begin(), choices.end(), chosen) == choices.end()) {
    std::string list;
    for (const auto& c : choices) list += (list.empty() ? "" : ", ") + c;
    std::string message = "expected one of " + list + "; found \"" + chosen + "\"";
    const std::string near = nearest_key(chosen, choices);
    if (!near.empty()) message += " (did you mean \"" + near + "\"?)";
    problem(key, message);
    return true;
  }
  value = chosen;
  return true;
}

void KeyReader::allow(const std::string& key) {
  known_.push_back(key);
}

namespace {

// Names that users bring from transformers' TrainingArguments, TRL's SFTConfig and PEFT's LoraConfig,
// with this project's key for the same thing (LLM-Lab's vocabulary). A hint is given only where the
// config being read has that key.
struct ForeignKey {
  const char* name;
  const char* ours;    // this project's key; "" when there is none
  const char* detail;  // without a key of ours: given where the config has the key `context`
  const char* context = "";
};
constexpr ForeignKey kForeignKeys[] = {
    {"per_device_train_batch_size", "batch_size", ""},
    {"per_device_eval_batch_size", "batch_size",
     " (evaluation uses the training batch size, in the memory a training step already has)"},
    {"lr_scheduler_type", "scheduler",
     " (none, cosine, linear, polynomial; transformers' \"constant_with_warmup\" is \"none\" with "
     "warmup_steps)"},
    {"logging_steps", "log_every", ""},
    {"save_steps", "save_every", ""},
    {"eval_strategy", "eval_every",
     " (evaluation every N steps; eval_steps is the number of validation batches)"},
    {"evaluation_strategy", "eval_every",
     " (evaluation every N steps; eval_steps is the number of validation batches)"},
    {"learning_rate", "lr", ""},
    {"max_grad_norm", "grad_clip", ""},
    {"gradient_checkpointing", "recompute", ""},
    {"optim", "optimizer", " (adamw, adamw_8bit, lion, muon, sophia, adafactor)"},
    {"max_seq_length", "max_length", ""},
    {"target_modules", "lora_target_modules", ""},
    {"r", "lora_r", ""},
    {"use_dora", "", "DoRA is not implemented; LoRA and rsLoRA are (use_rslora)", "use_lora"},
    {"bf16", "", "on a GPU the CUDA backend always trains in bf16 with fp32 master weights; remove the key",
     "max_steps"},
    {"fp16", "", "fp16 training is not supported; on a GPU the CUDA backend trains in bf16; remove the key",
     "max_steps"},
    {"bnb_4bit_compute_dtype", "",
     "NF4 weights are always dequantised to bf16 for the GEMMs on a GPU (fp32 on the CPU); remove the key",
     "load_in_4bit"},
};

}  // namespace

void KeyReader::finish() {
  if (object_.is_object()) {
    for (auto it = object_.begin(); it != object_.end(); ++it) {
      if (std::find(known_.begin(), known_.end(), it.key()) != known_.end()) continue;
      std::string message = origin_ + ": unknown key \"" + it.key() + "\"";
      std::string hint;
      for (const ForeignKey& f : kForeignKeys) {
        if (it.key() != f.name) continue;
        const std::string ours = f.ours;
        if (!ours.empty() && std::find(known_.begin(), known_.end(), ours) != known_.end()) {
          hint = ": this trainer calls it \"" + ours + "\"" + f.detail;
        } else if (ours.empty() && std::find(known_.begin(), known_.end(), f.context) != known_.end()) {
          hint = std::string(": ") + f.detail;
        }
      }
      if (hint.empty()) {
        const std::string near = nearest_key(it.key(), known_);
        if (!near.empty()) hint = " (did you mean \"" + near + "\"?)";
      }
      problems_.push_back(message + hint);
    }
  }
  if (problems_.empty()) return;
  std::string all;
  for (const auto& p : problems_) all += (all.empty() ? "" : "\n") + p;
  throw ConfigError(all);
}

void apply_override(json& object, const std::string& assignment) {
  const size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) {
    throw ConfigError("--set " + assignment + ": expected key=value");
  }
  const std::string key = assignment.substr(0, eq);
  const std::string text = assignment.substr(eq + 1);
  json value = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded()) value = text;
  // "model.d_model=64" reaches into the nested object.
  json* target = &object;
  size_t start = 0;
  for (size_t dot = key.find('.'); dot != std::string::npos; dot = key.find('.', start)) {
    const std::string part = key.substr(start, dot - start);
    if (part.empty()) throw ConfigError("--set " + assignment + ": empty key segment");
    if (!target->contains(part)) (*target)[part] = json::object();
    target = &(*target)[part];
    if (!target->is_object())
      throw ConfigError("--set " + assignment + ": \"" + part + "\" is not an object");
    start = dot + 1;
  }
  (*target)[key.substr(start)] = value;
}

}  // namespace llm
