// Strict reading of JSON config files: every key known, every value of the expected type, every
// problem reported at once with the file and key, and malformed JSON reported by line and column.
//
// Usage: parse the file with parse_json_file, then read each known key through a KeyReader, then
// call finish(): it adds "unknown key" problems (with the nearest valid key suggested) and throws
// ConfigError listing every problem found, one per line.
#pragma once

#include <nlohmann/json.hpp>

#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace llm {

using json = nlohmann::json;

// Thrown for any bad configuration. what() holds one line per problem.
class ConfigError : public std::runtime_error {
 public:
  explicit ConfigError(const std::string& message) : std::runtime_error(message) {}
};

// Reads a JSON file. Throws ConfigError "FILE:LINE:COL: malformed JSON: ..." or "cannot open FILE".
json parse_json_file(const std::string& path);
// Parses JSON text; `origin` names it in errors (a file name, or "--set").
json parse_json_text(const std::string& text, const std::string& origin);

// Edit distance, used to suggest the nearest valid key.
int edit_distance(const std::string& a, const std::string& b);
// The nearest of `candidates` to `key`, or "" when none is close enough to be a plausible typo.
std::string nearest_key(const std::string& key, const std::vector<std::string>& candidates);

// Reads typed values from one JSON object and remembers which keys it was asked about.
class KeyReader {
 public:
  KeyReader(const json& object, std::string origin);

  // Each get_* leaves `value` unchanged (the default) when the key is absent or null, and records a
  // problem when the key is present with the wrong type. Returns true when the key was given.
  bool get(const std::string& key, int& value);
  bool get(const std::string& key, int64_t& value);
  bool get(const std::string& key, double& value);
  bool get(const std::string& key, bool& value);
  bool get(const std::string& key, std::string& value);
  bool get(const std::string& key, std::vector<std::string>& value);
  // One of `choices` (case-sensitive); anything else is a problem listing the choices.
  bool get_choice(const std::string& key, std::string& value, const std::vector<std::string>& choices);
  // Declares a key valid without reading it (read elsewhere, or passed through).
  void allow(const std::string& key);

  // Adds a problem about `key` (for checks that involve several keys).
  void problem(const std::string& key, const std::string& message);
  // Adds a problem that already names its keys.
  void problems_add(const std::string& message) { problems_.push_back(origin_ + ": " + message); }
  const std::vector<std::string>& problems() const { return problems_; }
  // Adds the unknown-key problems and throws ConfigError when there is any problem.
  void finish();

 private:
  const json* find(const std::string& key);
  void wrong_type(const std::string& key, const char* expected, const json& found);

  const json& object_;
  std::string origin_;
  std::vector<std::string> known_;
  std::vector<std::string> problems_;
};

// "a string", "an integer", ... for error messages.
std::string json_type_name(const json& value);

// Applies command-line overrides "key=value" to a JSON object. The value is parsed as JSON when it
// parses (numbers, true/false, null, quoted strings, arrays), else taken as a bare string. A dotted
// key ("model.d_model=64") sets a key of a nested object.
void apply_override(json& object, const std::string& assignment);

}  // namespace llm
