// The command line the training programs share:
//   ./train_X -c cfg.json [--resume PATH] [--max-steps N] [--no-optimizer-state] [--set key=value ...]
// plus --fresh for the programs that resume on their own (train_sft).
#pragma once

#include <string>
#include <vector>

#include "train/trainer.h"

namespace llm {

struct TrainCommandLine {
  std::string config_path;
  std::vector<std::string> overrides;  // --set key=value, in order
  RunOptions run;
  bool fresh = false;  // --fresh
  int exit_code = -1;  // >= 0: exit now with it (help printed, or a usage error reported)
};

// Parses argv. `program` names the binary in the usage text; `with_fresh` accepts --fresh. Usage
// errors print a message and the usage on stderr and set exit_code 2; -h sets 0.
TrainCommandLine parse_train_command_line(int argc, char** argv, const std::string& program, bool with_fresh);

}  // namespace llm
