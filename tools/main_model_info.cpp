// ./model_info -c model.json [--batch B] [--seq T] [--recompute] [--optimizer-bytes N]
// Validates a model config, then prints its parameter count by kind and the training-memory plan
// (parameters, gradients, optimizer state, activations) for a batch and sequence length, as the fp32
// CPU backend allocates it.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "llm/config.h"
#include "llm/memory_plan.h"
#include "llm/params.h"

namespace {

void usage() {
  std::fprintf(stderr,
               "usage: ./model_info -c model.json [--batch B] [--seq T] [--recompute] [--optimizer-bytes N]\n"
               "  --optimizer-bytes: optimizer state per trainable parameter (AdamW 8, the default)\n");
}

int parse_int(const char* flag, const char* text) {
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  if (*end != '\0' || value <= 0 || value > (1 << 30)) {
    std::fprintf(stderr, "error: %s expects a positive integer, found \"%s\"\n", flag, text);
    std::exit(2);
  }
  return static_cast<int>(value);
}

}  // namespace

int main(int argc, char** argv) {
  std::string config_path;
  int batch = 1, seq = 0;
  bool recompute = false;
  double optimizer_bytes = 8.0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "error: %s needs a value\n", arg.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "-c" || arg == "--config") {
      config_path = value();
    } else if (arg == "--batch") {
      batch = parse_int("--batch", value());
    } else if (arg == "--seq") {
      seq = parse_int("--seq", value());
    } else if (arg == "--recompute") {
      recompute = true;
    } else if (arg == "--optimizer-bytes") {
      optimizer_bytes = std::atof(value());
    } else if (arg == "-h" || arg == "--help") {
      usage();
      return 0;
    } else {
      std::fprintf(stderr, "error: unknown argument %s\n", arg.c_str());
      usage();
      return 2;
    }
  }
  if (config_path.empty()) {
    usage();
    return 2;
  }
  try {
    const llm::ModelConfig config = llm::load_model_config(config_path);
    if (seq == 0) seq = config.max_seq_len;
    const llm::ParameterCount count = llm::count_parameters(config);
    std::printf("model %s: %d layers, d_model %d, %d heads (%d K/V), head_dim %d, d_ff %d, vocab %d\n",
                config_path.c_str(), config.n_layers, config.d_model, config.n_heads, config.n_kv_heads,
                config.resolved_head_dim(), config.d_ff, config.vocab_size);
    std::printf(
        "parameters: %.3fM total | embedding %.3fM | attention %.3fM | mlp %.3fM | norms %.3fM | "
        "lm_head %.3fM%s\n",
        count.total() / 1e6, count.embedding / 1e6, count.attention / 1e6, count.mlp / 1e6, count.norms / 1e6,
        count.lm_head / 1e6, config.tie_word_embeddings ? " (tied)" : "");
    const size_t params = static_cast<size_t>(count.total());
    const llm::MemoryPlan cpu =
        llm::plan_memory(config, batch, seq, recompute, params, params, 4, optimizer_bytes);
    std::printf("training memory for batch %d x seq %d%s:\n", batch, seq, recompute ? " with recompute" : "");
    std::printf("  fp32 (cpu backend): %s\n", cpu.describe().c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
