// ./tokenize --tokenizer PATH|byte --input FILE.jsonl|FILE.txt [--input ...] --output FILE.bin
//            [--threads N] [--skip-bad-lines]
// Tokenizes documents once into a binary shard (data/shards.h) that the loader reads without
// re-tokenizing: each document's tokens, then the tokenizer's eos. .txt files are split on
// "<|endoftext|>" lines, .jsonl files take each line's "text" field. Reports documents, tokens and the
// tokenization speed in MB of input text per second.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "data/shards.h"
#include "data/text_dataset.h"
#include "data/tokenizer_factory.h"

namespace {

void usage() {
  std::fprintf(
      stderr,
      "usage: ./tokenize --tokenizer PATH|byte --input FILE.jsonl|FILE.txt [--input FILE ...] "
      "--output FILE.bin [--threads N] [--skip-bad-lines]\n"
      "  --tokenizer: \"byte\", a model folder with tokenizer.json, or a tokenizer.json file\n"
      "  --threads: documents are split into N contiguous ranges tokenized in parallel (default 1);\n"
      "             the output does not depend on N\n");
}

int parse_threads(const char* text) {
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  if (*end != '\0' || value < 1 || value > 256) {
    std::fprintf(stderr, "error: --threads expects an integer in [1, 256], found \"%s\"\n", text);
    std::exit(2);
  }
  return static_cast<int>(value);
}

}  // namespace

int main(int argc, char** argv) {
  std::string tokenizer_spec, output;
  std::vector<std::string> inputs;
  int threads = 1;
  bool skip_bad_lines = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "error: %s needs a value\n", arg.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--tokenizer") {
      tokenizer_spec = value();
    } else if (arg == "--input") {
      inputs.emplace_back(value());
    } else if (arg == "--output") {
      output = value();
    } else if (arg == "--threads") {
      threads = parse_threads(value());
    } else if (arg == "--skip-bad-lines") {
      skip_bad_lines = true;
    } else if (arg == "-h" || arg == "--help") {
      usage();
      return 0;
    } else {
      std::fprintf(stderr, "error: unknown argument %s\n", arg.c_str());
      usage();
      return 2;
    }
  }
  if (tokenizer_spec.empty() || inputs.empty() || output.empty()) {
    usage();
    return 2;
  }
  try {
    const auto tokenizer = llm::data::make_tokenizer(tokenizer_spec);
    const int32_t eos = tokenizer->eos_id();
    if (eos < 0) {
      std::fprintf(stderr,
                   "error: tokenizer %s has no eos token to end documents with; set eos_token in its "
                   "tokenizer_config.json\n",
                   tokenizer_spec.c_str());
      return 1;
    }
    std::vector<std::string> documents;
    int64_t skipped = 0;
    for (const std::string& input : inputs) {
      llm::data::DocumentFile file = llm::data::read_documents(input, skip_bad_lines);
      if (file.skipped_lines > 0) {
        std::fprintf(stderr, "%s: skipped %lld bad lines; the first: %s\n", input.c_str(),
                     static_cast<long long>(file.skipped_lines), file.first_skipped_error.c_str());
      }
      skipped += file.skipped_lines;
      for (std::string& doc : file.documents) documents.push_back(std::move(doc));
    }
    int64_t bytes = 0;
    for (const std::string& doc : documents) bytes += static_cast<int64_t>(doc.size());

    // Each thread tokenizes a contiguous range of documents; ranges are joined in order.
    const auto start = std::chrono::steady_clock::now();
    const std::clock_t cpu_start = std::clock();
    const int workers = std::max(1, std::min<int>(threads, static_cast<int>(documents.size())));
    std::vector<std::vector<int32_t>> parts(workers);
    std::vector<std::exception_ptr> errors(workers);
    const auto work = [&](int w) {
      try {
        const size_t begin = documents.size() * w / workers, end = documents.size() * (w + 1) / workers;
        for (size_t d = begin; d < end; ++d) {
          const std::vector<int32_t> ids = tokenizer->encode(documents[d]);
          parts[w].insert(parts[w].end(), ids.begin(), ids.end());
          parts[w].push_back(eos);
        }
      } catch (...) {
        errors[w] = std::current_exception();
      }
    };
    std::vector<std::thread> pool;
    for (int w = 1; w < workers; ++w) pool.emplace_back(work, w);
    work(0);
    for (auto& t : pool) t.join();
    for (const auto& error : errors) {
      if (error) std::rethrow_exception(error);
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double cpu_seconds = static_cast<double>(std::clock() - cpu_start) / CLOCKS_PER_SEC;
    std::vector<int32_t> tokens;
    size_t total = 0;
    for (const auto& part : parts) total += part.size();
    tokens.reserve(total);
    for (const auto& part : parts) tokens.insert(tokens.end(), part.begin(), part.end());

    llm::data::write_token_shard(output, tokens, static_cast<uint32_t>(tokenizer->vocab_size()));
    std::printf(
        "%s: %zu documents, %zu tokens (%.2f bytes/token), %.2f MB of text in %.3f s (cpu %.3f s): %.2f "
        "MB/s, "
        "%.0f tokens/s, %d thread%s; tokenizer %s (vocab %d)%s\n",
        output.c_str(), documents.size(), tokens.size(),
        tokens.empty() ? 0.0 : static_cast<double>(bytes) / static_cast<double>(tokens.size()), bytes / 1e6,
        seconds, cpu_seconds, seconds > 0 ? bytes / 1e6 / seconds : 0.0,
        seconds > 0 ? tokens.size() / seconds : 0.0, workers, workers == 1 ? "" : "s",
        tokenizer->name().c_str(), tokenizer->vocab_size(),
        skipped > 0 ? (", " + std::to_string(skipped) + " bad lines skipped").c_str() : "");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
