// ./train_pretrain -c cfg.json [--resume PATH] [--max-steps N] [--no-optimizer-state] [--set key=value ...]
#include <cstdio>
#include <exception>

#include "train/command_line.h"
#include "train/trainer.h"

int main(int argc, char** argv) {
  const llm::TrainCommandLine cl = llm::parse_train_command_line(argc, argv, "train_pretrain", false);
  if (cl.exit_code >= 0) return cl.exit_code;
  try {
    const llm::TrainConfig config = llm::load_train_config(cl.config_path, cl.overrides);
    llm::RunOptions options = cl.run;
    if (!config.load_optimizer_state) options.load_optimizer_state = false;
    return llm::run_pretraining(config, options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
