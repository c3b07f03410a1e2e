#include "train/command_line.h"

#include <cstdio>
#include <cstdlib>

namespace llm {

namespace {

void usage(const std::string& program, bool with_fresh) {
  std::fprintf(stderr, "usage: ./%s -c cfg.json [options]\n", program.c_str());
  if (with_fresh) {
    std::fprintf(
        stderr,
        "  --resume PATH          continue from a checkpoint (model, optimizer, data position, step);\n"
        "                         by default a run continues from output_dir/latest.ckpt when there is one\n"
        "  --fresh                start over even when output_dir/latest.ckpt exists\n");
  } else {
    std::fprintf(
        stderr,
        "  --resume PATH          continue from a checkpoint (model, optimizer, data position, step)\n");
  }
  std::fprintf(
      stderr,
      "  --max-steps N          train to step N (e.g. longer than the config's max_steps on resume)\n"
      "  --no-optimizer-state   resume with fresh optimizer state (needed to switch optimizers)\n"
      "  --set key=value        override a config key (repeatable), e.g. --set lr=1e-3\n");
}

}  // namespace

TrainCommandLine parse_train_command_line(int argc, char** argv, const std::string& program,
                                          bool with_fresh) {
  TrainCommandLine cl;
  auto fail = [&](const std::string& message) {
    std::fprintf(stderr, "error: %s\n", message.c_str());
    usage(program, with_fresh);
    cl.exit_code = 2;
    return cl;
  };
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool takes_value =
        arg == "-c" || arg == "--config" || arg == "--resume" || arg == "--max-steps" || arg == "--set";
    if (takes_value && i + 1 >= argc) return fail(arg + " needs a value");
    if (arg == "-c" || arg == "--config") {
      cl.config_path = argv[++i];
    } else if (arg == "--resume") {
      cl.run.resume_path = argv[++i];
    } else if (arg == "--max-steps") {
      const std::string text = argv[++i];
      char* end = nullptr;
      cl.run.max_steps_override = std::strtoll(text.c_str(), &end, 10);
      if (text.empty() || *end != '\0' || cl.run.max_steps_override <= 0) {
        return fail("--max-steps expects a positive integer, found \"" + text + "\"");
      }
    } else if (arg == "--no-optimizer-state") {
      cl.run.load_optimizer_state = false;
    } else if (arg == "--fresh" && with_fresh) {
      cl.fresh = true;
    } else if (arg == "--set") {
      cl.overrides.push_back(argv[++i]);
    } else if (arg == "-h" || arg == "--help") {
      usage(program, with_fresh);
      cl.exit_code = 0;
      return cl;
    } else {
      return fail("unknown argument " + arg);
    }
  }
  if (cl.config_path.empty()) return fail("no config: give -c cfg.json");
  return cl;
}

}  // namespace llm
