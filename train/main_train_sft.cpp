// ./train_sft -c cfg.json [--resume PATH] [--fresh] [--max-steps N] [--no-optimizer-state] [--set key=value]
#include <cstdio>
#include <exception>

#include "train/command_line.h"
#include "train/sft.h"

int main(int argc, char** argv) {
  const llm::TrainCommandLine cl = llm::parse_train_command_line(argc, argv, "train_sft", true);
  if (cl.exit_code >= 0) return cl.exit_code;
  try {
    const llm::SftConfig config = llm::load_sft_config(cl.config_path, cl.overrides);
    llm::SftRunOptions options;
    options.run = cl.run;
    options.fresh = cl.fresh;
    if (!config.train.load_optimizer_state) options.run.load_optimizer_state = false;
    return llm::run_sft(config, options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
