// ./train_sft -c cfg.json [--resume PATH] [--fresh] [--max-steps N] [--no-optimizer-state] [--set key=value
// ...]
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "train/checkpoint.h"
#include "train/sft.h"

namespace {

void usage() {
  std::fprintf(
      stderr,
      "usage: ./train_sft -c cfg.json [options]\n"
      "  --resume PATH          continue from a checkpoint (model, optimizer, data position, step);\n"
      "                         by default a run continues from output_dir/latest.ckpt when there is one\n"
      "  --fresh                start over even when output_dir/latest.ckpt exists\n"
      "  --max-steps N          train to step N (e.g. longer than the config's max_steps on resume)\n"
      "  --no-optimizer-state   resume with fresh optimizer state (needed to switch optimizers)\n"
      "  --set key=value        override a config key (repeatable), e.g. --set lr=1e-3\n");
}

}  // namespace

int main(int argc, char** argv) {
  std::string config_path;
  std::vector<std::string> overrides;
  llm::SftRunOptions sft_options;
  llm::RunOptions& options = sft_options.run;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "error: %s needs a value\n", arg.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "-c" || arg == "--config") {
      config_path = value();
    } else if (arg == "--resume") {
      options.resume_path = value();
    } else if (arg == "--max-steps") {
      const std::string text = value();
      char* end = nullptr;
      options.max_steps_override = std::strtoll(text.c_str(), &end, 10);
      if (*end != '\0' || options.max_steps_override <= 0) {
        std::fprintf(stderr, "error: --max-steps expects a positive integer, found \"%s\"\n", text.c_str());
        return 2;
      }
    } else if (arg == "--fresh") {
      sft_options.fresh = true;
    } else if (arg == "--no-optimizer-state") {
      options.load_optimizer_state = false;
    } else if (arg == "--set") {
      overrides.push_back(value());
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
    const llm::SftConfig config = llm::load_sft_config(config_path, overrides);
    if (!config.train.load_optimizer_state) options.load_optimizer_state = false;
    return llm::run_sft(config, sft_options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
