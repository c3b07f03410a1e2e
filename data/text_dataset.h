// Readers that turn text files into documents, and the dataset spec strings ("path | subset | weight")
// that name what to train on. Inputs are untrusted: bad lines are errors naming FILE:LINE unless the
// caller explicitly allows skipping them, and then the skips are counted so they can be reported.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace llm::data {

struct DocumentFile {
  std::vector<std::string> documents;
  int64_t skipped_lines = 0;        // bad JSONL lines dropped because skipping was allowed
  std::string first_skipped_error;  // the error the first skipped line would have raised
};

// The separator line of .txt files, and the path that selects the generated arithmetic corpus.
inline constexpr std::string_view kDocumentSeparator = "<|endoftext|>";
inline constexpr std::string_view kBuiltinArithmetic = "builtin:arithmetic";

// A .txt file: documents are separated by lines that are exactly "<|endoftext|>" (a trailing '\r' is
// allowed); a file without such a line is one document. Empty documents are dropped.
// Throws std::runtime_error naming the file when it cannot be read.
std::vector<std::string> read_text_documents(const std::string& path);

// A .jsonl file: one JSON object per line with a string field "text"; blank lines are skipped.
// A bad line throws std::runtime_error "FILE:LINE: expected a JSON object with a string field "text",
// found ...", or with skip_bad_lines is dropped and counted. Empty texts are dropped.
DocumentFile read_jsonl_documents(const std::string& path, bool skip_bad_lines);

// Reads a .txt or .jsonl file by its extension.
DocumentFile read_documents(const std::string& path, bool skip_bad_lines);

struct DatasetSpec {
  std::string spec;     // the string as given, for messages
  std::string path;     // a file, a folder, or kBuiltinArithmetic
  std::string subset;   // a sub-folder of path; empty for none
  double weight = 1.0;  // relative sampling weight, > 0
};

// Parses "path", "path | subset" or "path | subset | weight" (fields are positional and trimmed; an empty
// field keeps its default, so "path | | 2" sets only the weight). Throws std::invalid_argument naming the
// spec for an empty path, a weight that is not a finite number > 0, or more than three fields.
DatasetSpec parse_dataset_spec(const std::string& spec);

// The files a spec names, sorted by name so the order never depends on the file system: path itself when
// it is a file, else the .txt, .jsonl and .bin files directly inside path/subset. Throws
// std::runtime_error naming the spec when the path is missing, a subset is given for a file, or a folder
// holds no such files.
std::vector<std::string> dataset_files(const DatasetSpec& spec);

}  // namespace llm::data
