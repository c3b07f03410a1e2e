// Text and JSONL readers and dataset spec parsing. Every error names the file (and line) or the spec string,
// says what was expected and what was found, so a user can fix the input from one message.
#include "data/text_dataset.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

namespace llm::data {
namespace fs = std::filesystem;
namespace {

std::ifstream open_for_reading(const std::string& path) {
  if (fs::is_directory(path)) throw std::runtime_error(path + ": expected a file, found a folder");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  return in;
}

bool ends_with(std::string_view text, std::string_view suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string_view trim(std::string_view text) {
  const char* kSpace = " \t\r\n";
  const size_t begin = text.find_first_not_of(kSpace);
  if (begin == std::string_view::npos) return {};
  const size_t end = text.find_last_not_of(kSpace);
  return text.substr(begin, end - begin + 1);
}

// A short, printable excerpt of an untrusted line for error messages.
std::string excerpt(std::string_view line) {
  constexpr size_t kMaxChars = 60;
  std::string out;
  for (size_t i = 0; i < line.size() && i < kMaxChars; ++i) {
    const unsigned char c = static_cast<unsigned char>(line[i]);
    out.push_back(c < 0x20 || c == 0x7f ? '?' : static_cast<char>(c));
  }
  if (line.size() > kMaxChars) out += "...";
  return out;
}

// Empty when the line holds a usable document, else what was found instead.
std::string describe_bad_jsonl_line(std::string_view line, std::string* text) {
  nlohmann::json value = nlohmann::json::parse(line.begin(), line.end(), nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded()) return "invalid JSON: " + excerpt(line);
  if (!value.is_object()) return std::string("a JSON ") + value.type_name() + ": " + excerpt(line);
  const auto field = value.find("text");
  if (field == value.end()) {
    std::string keys;
    for (const auto& item : value.items()) keys += (keys.empty() ? "" : ", ") + excerpt(item.key());
    return "an object without \"text\" (keys: " + (keys.empty() ? std::string("none") : keys) + ")";
  }
  if (!field->is_string()) return std::string("\"text\" of type ") + field->type_name();
  *text = field->get<std::string>();
  return {};
}

}  // namespace

std::vector<std::string> read_text_documents(const std::string& path) {
  std::ifstream in = open_for_reading(path);
  std::vector<std::string> documents;
  std::string current;
  std::string line;
  while (std::getline(in, line)) {
    const bool had_newline = !in.eof();
    std::string_view content = line;
    if (!content.empty() && content.back() == '\r') content.remove_suffix(1);
    if (content == kDocumentSeparator) {
      if (!current.empty()) documents.push_back(std::move(current));
      current.clear();
      continue;
    }
    current += line;
    if (had_newline) current.push_back('\n');
  }
  if (in.bad()) throw std::runtime_error(path + ": read error: " + std::strerror(errno));
  if (!current.empty()) documents.push_back(std::move(current));
  return documents;
}

DocumentFile read_jsonl_documents(const std::string& path, bool skip_bad_lines) {
  std::ifstream in = open_for_reading(path);
  DocumentFile result;
  std::string line;
  int64_t line_number = 0;
  while (std::getline(in, line)) {
    ++line_number;
    if (trim(line).empty()) continue;
    std::string text;
    const std::string found = describe_bad_jsonl_line(line, &text);
    if (found.empty()) {
      if (!text.empty()) result.documents.push_back(std::move(text));
      continue;
    }
    const std::string error = path + ":" + std::to_string(line_number) +
                              ": expected a JSON object with a string field \"text\", found " + found;
    if (!skip_bad_lines) throw std::runtime_error(error);
    if (result.skipped_lines == 0) result.first_skipped_error = error;
    ++result.skipped_lines;
  }
  if (in.bad()) throw std::runtime_error(path + ": read error: " + std::strerror(errno));
  return result;
}

DocumentFile read_documents(const std::string& path, bool skip_bad_lines) {
  if (ends_with(path, ".jsonl")) return read_jsonl_documents(path, skip_bad_lines);
  if (ends_with(path, ".txt")) return DocumentFile{read_text_documents(path), 0, {}};
  throw std::runtime_error(path + ": expected a .txt or .jsonl file");
}

DatasetSpec parse_dataset_spec(const std::string& spec) {
  std::vector<std::string> fields;
  std::stringstream stream(spec);
  std::string field;
  while (std::getline(stream, field, '|')) fields.emplace_back(trim(field));
  if (!spec.empty() && spec.back() == '|') fields.emplace_back();
  const std::string where = "dataset spec '" + spec + "'";
  if (fields.size() > 3) {
    throw std::invalid_argument(where + ": expected \"path | subset | weight\", found " +
                                std::to_string(fields.size()) + " fields");
  }
  DatasetSpec result;
  result.spec = spec;
  if (!fields.empty()) result.path = fields[0];
  if (result.path.empty()) throw std::invalid_argument(where + ": expected a path, found none");
  if (fields.size() > 1) result.subset = fields[1];
  if (fields.size() > 2 && !fields[2].empty()) {
    const std::string& text = fields[2];
    size_t used = 0;
    double weight = 0.0;
    try {
      weight = std::stod(text, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != text.size() || !std::isfinite(weight)) {
      throw std::invalid_argument(where + ": expected a number for the weight, found '" + text + "'");
    }
    if (weight <= 0.0) throw std::invalid_argument(where + ": expected a weight > 0, found " + text);
    result.weight = weight;
  }
  return result;
}

std::vector<std::string> dataset_files(const DatasetSpec& spec) {
  const std::string where = "dataset '" + spec.spec + "'";
  std::error_code error;
  if (!fs::exists(spec.path, error)) throw std::runtime_error(where + ": " + spec.path + " does not exist");
  if (!fs::is_directory(spec.path, error)) {
    if (!spec.subset.empty()) {
      throw std::runtime_error(where + ": subset '" + spec.subset + "' needs a folder, but " + spec.path +
                               " is a file (to give only a weight write 'path | | weight')");
    }
    if (!ends_with(spec.path, ".txt") && !ends_with(spec.path, ".jsonl") && !ends_with(spec.path, ".bin")) {
      throw std::runtime_error(where + ": expected a .txt, .jsonl or .bin file or a folder, found " +
                               spec.path);
    }
    return {spec.path};
  }
  const fs::path folder = spec.subset.empty() ? fs::path(spec.path) : fs::path(spec.path) / spec.subset;
  if (!fs::is_directory(folder, error)) {
    throw std::runtime_error(where + ": expected a folder " + folder.string() + " for subset '" +
                             spec.subset + "', found none (to give only a weight write 'path | | weight')");
  }
  std::vector<std::string> files;
  for (const fs::directory_entry& entry : fs::directory_iterator(folder)) {
    const std::string name = entry.path().string();
    if (!entry.is_regular_file()) continue;
    if (ends_with(name, ".txt") || ends_with(name, ".jsonl") || ends_with(name, ".bin"))
      files.push_back(name);
  }
  if (files.empty()) {
    throw std::runtime_error(where + ": expected .txt, .jsonl or .bin files in " + folder.string() +
                             ", found none");
  }
  std::sort(files.begin(), files.end());
  return files;
}

}  // namespace llm::data
