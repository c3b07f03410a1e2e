// The pretraining config: LLM-Lab's defaults, strict reading (unknown keys with a suggestion, wrong
// types, missing model), model_config resolved against the config file's folder, --set overrides, and
// the cross-key checks.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "train/train_config.h"

namespace {

namespace fs = std::filesystem;
using llm::ConfigError;
using llm::json;
using llm::TrainConfig;

const char* kTinyModel = R"({"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "n_layers": 2,
                             "vocab_size": 260, "max_seq_len": 16})";

json with_model(json object) {
  object["model"] = json::parse(kTinyModel);
  return object;
}

// The ConfigError message of reading `object`, or "" when it is accepted.
std::string error_of(const json& object) {
  try {
    llm::train_config_from_json(object, "cfg.json");
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

void expect_error(const json& object, const std::string& expected) {
  const std::string e = error_of(object);
  EXPECT_NE(e.find(expected), std::string::npos) << "expected \"" << expected << "\" in:\n" << e;
}

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "llm_traincfg_XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }
  std::string write(const std::string& name, const std::string& text) const {
    const fs::path file = path_ / name;
    fs::create_directories(file.parent_path());
    std::ofstream(file) << text;
    return file.string();
  }

 private:
  fs::path path_;
};

TEST(TrainConfig, DefaultsAreLlmLabs) {
  const TrainConfig c = llm::train_config_from_json(with_model(json::object()), "cfg.json");
  EXPECT_EQ(c.max_steps, 10000);
  EXPECT_DOUBLE_EQ(c.lr, 3e-4);
  EXPECT_DOUBLE_EQ(c.weight_decay, 0.1);
  EXPECT_EQ(c.scheduler, "cosine");
  EXPECT_EQ(c.warmup_steps, 1000);
  EXPECT_DOUBLE_EQ(c.min_lr_ratio, 0.0);
  EXPECT_EQ(c.batch_size, 1);
  EXPECT_EQ(c.gradient_accumulation_steps, 64);
  EXPECT_DOUBLE_EQ(c.grad_clip, 1.0);
  EXPECT_EQ(c.eval_every, 500);
  EXPECT_EQ(c.eval_steps, 100);
  EXPECT_EQ(c.log_every, 10);
  EXPECT_EQ(c.save_every, 500);
  EXPECT_TRUE(c.save_best_only);
  EXPECT_EQ(c.optimizer.name, "adamw");
  EXPECT_DOUBLE_EQ(c.optimizer.adamw_beta1, 0.9);
  EXPECT_DOUBLE_EQ(c.optimizer.adamw_beta2, 0.999);
  EXPECT_DOUBLE_EQ(c.optimizer.adamw_eps, 1e-8);
  EXPECT_EQ(c.device, "auto");
  EXPECT_EQ(c.seq_len, 0);
  EXPECT_EQ(c.resolved_seq_len(), 16);  // the model's max_seq_len
  EXPECT_EQ(c.datasets, std::vector<std::string>({"builtin:arithmetic"}));
  EXPECT_TRUE(c.load_optimizer_state);

  // The schedule the trainer uses carries the same values.
  const llm::ScheduleConfig s = c.schedule();
  EXPECT_EQ(s.scheduler, "cosine");
  EXPECT_DOUBLE_EQ(s.lr, 3e-4);
  EXPECT_EQ(s.warmup_steps, 1000);
  EXPECT_EQ(s.total_steps, 10000);
}

TEST(TrainConfig, ReadsEveryGivenKey) {
  const TrainConfig c =
      llm::train_config_from_json(with_model({{"max_steps", 300},
                                              {"lr", 3e-3},
                                              {"scheduler", "polynomial"},
                                              {"polynomial_power", 2.0},
                                              {"min_lr_ratio", 0.1},
                                              {"batch_size", 16},
                                              {"seq_len", 8},
                                              {"gradient_accumulation_steps", 2},
                                              {"optimizer", "lion"},
                                              {"lion_beta1", 0.95},
                                              {"datasets", {"a.jsonl | sub | 2", "builtin:arithmetic"}},
                                              {"save_best_only", false},
                                              {"seed", 7},
                                              {"device", "cpu"}}),
                                  "cfg.json");
  EXPECT_EQ(c.max_steps, 300);
  EXPECT_DOUBLE_EQ(c.lr, 3e-3);
  EXPECT_EQ(c.scheduler, "polynomial");
  EXPECT_DOUBLE_EQ(c.schedule().polynomial_power, 2.0);
  EXPECT_DOUBLE_EQ(c.schedule().min_lr_ratio, 0.1);
  EXPECT_EQ(c.batch_size, 16);
  EXPECT_EQ(c.resolved_seq_len(), 8);
  EXPECT_EQ(c.gradient_accumulation_steps, 2);
  EXPECT_EQ(c.optimizer.name, "lion");
  EXPECT_DOUBLE_EQ(c.optimizer.lion_beta1, 0.95);
  EXPECT_EQ(c.datasets.size(), 2u);
  EXPECT_FALSE(c.save_best_only);
  EXPECT_EQ(c.seed, 7u);
  EXPECT_EQ(c.device, "cpu");
  EXPECT_EQ(c.model.d_model, 32);
}

TEST(TrainConfig, UnknownKeySuggestsNearest) {
  expect_error(with_model({{"max_step", 5}}),
               "cfg.json: unknown key \"max_step\" (did you mean \"max_steps\"?)");
  expect_error(with_model({{"warmup_step", 5}}), "did you mean \"warmup_steps\"");
  expect_error(with_model({{"optimiser", "adamw"}}), "did you mean \"optimizer\"");
  expect_error(with_model({{"gradient_accumulation_step", 2}}),
               "did you mean \"gradient_accumulation_steps\"");
  // transformers' names get this trainer's name; pretraining has no "learning_rate" spelling.
  expect_error(with_model({{"learning_rate", 1e-3}}),
               "cfg.json: unknown key \"learning_rate\": this trainer calls it \"lr\"");
  expect_error(with_model({{"max_grad_norm", 1.0}}), "this trainer calls it \"grad_clip\"");
  // A hint whose key this config lacks is not given: LoRA's names are SFT keys.
  expect_error(with_model({{"target_modules", "all-linear"}}), "cfg.json: unknown key \"target_modules\"");
  EXPECT_EQ(error_of(with_model({{"target_modules", "all-linear"}})).find("lora_target_modules"),
            std::string::npos);
  // Inside the model the model's keys are the candidates.
  json object = with_model(json::object());
  object["model"]["n_layer"] = 2;
  expect_error(object, "did you mean \"n_layers\"");
  // Every problem is reported at once.
  const std::string e = error_of(with_model({{"max_step", 5}, {"lr", "fast"}}));
  EXPECT_NE(e.find("max_step"), std::string::npos) << e;
  EXPECT_NE(e.find("key \"lr\""), std::string::npos) << e;
}

TEST(TrainConfig, WrongTypes) {
  expect_error(with_model({{"lr", "fast"}}), "key \"lr\": expected a number, found a string");
  expect_error(with_model({{"max_steps", 1.5}}), "key \"max_steps\": expected an integer");
  expect_error(with_model({{"save_best_only", 1}}), "key \"save_best_only\": expected true or false");
  expect_error(with_model({{"datasets", 3}}), "key \"datasets\": expected a list of strings, found");
  expect_error(with_model({{"datasets", {1, 2}}}), "key \"datasets\": expected");
  expect_error(with_model({{"output_dir", 3}}), "key \"output_dir\": expected a string");
  expect_error(json::array({1, 2}), "expected a JSON object");
}

TEST(TrainConfig, SingleStringIsAListOfOne) {
  const TrainConfig c = llm::train_config_from_json(with_model({{"datasets", "data.txt"}}), "cfg.json");
  EXPECT_EQ(c.datasets, std::vector<std::string>({"data.txt"}));
}

TEST(TrainConfig, RangeChecks) {
  expect_error(with_model({{"batch_size", 0}}), "key \"batch_size\": must be at least 1, found 0");
  expect_error(with_model({{"gradient_accumulation_steps", 0}}), "gradient_accumulation_steps");
  expect_error(with_model({{"max_steps", 0}}), "key \"max_steps\": must be at least 1");
  expect_error(with_model({{"lr", 0.0}}), "key \"lr\": must be positive");
  expect_error(with_model({{"lr", -1e-3}}), "key \"lr\": must be positive");
  expect_error(with_model({{"min_lr_ratio", 1.5}}), "key \"min_lr_ratio\": must be in [0, 1]");
  expect_error(with_model({{"val_fraction", 1.0}}), "key \"val_fraction\": must be in [0, 1)");
  expect_error(with_model({{"grad_clip", -1.0}}), "key \"grad_clip\"");
  expect_error(with_model({{"datasets", json::array()}}), "key \"datasets\": must name at least one dataset");
  expect_error(with_model({{"seed", -1}}), "key \"seed\": must not be negative");
}

TEST(TrainConfig, MissingModel) {
  expect_error(json{{"lr", 1e-3}}, "key \"model\": missing");
  expect_error(json{{"lr", 1e-3}}, "\"model_config\"");
  json both = with_model({{"model_config", "m.json"}});
  expect_error(both, "give either \"model\" or \"model_config\", not both");
  // A problem inside the model names it.
  json bad = with_model(json::object());
  bad["model"]["d_model"] = 30;
  expect_error(bad, "in \"model\"");
}

TEST(TrainConfig, ModelConfigIsRelativeToTheConfigFile) {
  TempDir dir;
  dir.write("configs/models/tiny.json", kTinyModel);
  const std::string cfg =
      dir.write("configs/train.json", R"({"model_config": "models/tiny.json", "lr": 1e-3})");
  // The working directory is elsewhere (the repository root under ctest), so only the config file's
  // folder can resolve the path.
  ASSERT_FALSE(fs::exists("models/tiny.json"));
  const TrainConfig c = llm::load_train_config(cfg);
  EXPECT_EQ(c.model.d_model, 32);
  EXPECT_EQ(c.model.max_seq_len, 16);
  EXPECT_EQ(c.model_config_path, "models/tiny.json");

  // An absolute path is used as it is.
  const std::string abs_cfg = dir.write(
      "other/train.json", json{{"model_config", (dir.path() / "configs/models/tiny.json").string()}}.dump());
  EXPECT_EQ(llm::load_train_config(abs_cfg).model.n_layers, 2);

  // A missing model file is an error naming the path it looked for.
  const std::string missing = dir.write("configs/missing.json", R"({"model_config": "nope.json"})");
  try {
    llm::load_train_config(missing);
    FAIL() << "a missing model_config was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find((dir.path() / "configs/nope.json").string()), std::string::npos)
        << e.what();
  }
}

TEST(TrainConfig, SetOverrides) {
  TempDir dir;
  const std::string cfg = dir.write("train.json", with_model({{"lr", 1e-3}, {"max_steps", 100}}).dump());
  const TrainConfig c =
      llm::load_train_config(cfg, {"lr=2e-4", "max_steps=50", "scheduler=linear", "save_best_only=false",
                                   R"(datasets=["a.txt", "b.jsonl | sub | 2"])",
                                   R"(sample_prompts=["1+1=", "2*3="])", "output_dir=runs/x"});
  EXPECT_DOUBLE_EQ(c.lr, 2e-4);
  EXPECT_EQ(c.max_steps, 50);
  EXPECT_EQ(c.scheduler, "linear");  // a bare word is taken as a string
  EXPECT_FALSE(c.save_best_only);
  EXPECT_EQ(c.datasets, std::vector<std::string>({"a.txt", "b.jsonl | sub | 2"}));
  EXPECT_EQ(c.sample_prompts, std::vector<std::string>({"1+1=", "2*3="}));
  EXPECT_EQ(c.output_dir, "runs/x");
  // The checkpoint keeps the config as overridden.
  EXPECT_DOUBLE_EQ(c.source["lr"].get<double>(), 2e-4);
  EXPECT_EQ(c.source["datasets"].size(), 2u);

  // Overrides are checked like the file: unknown keys, wrong types, malformed assignments.
  auto override_error = [&cfg](const std::string& assignment) {
    try {
      llm::load_train_config(cfg, {assignment});
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(override_error("max_step=5").find("did you mean \"max_steps\""), std::string::npos);
  EXPECT_NE(override_error("max_steps=many").find("key \"max_steps\": expected an integer"),
            std::string::npos);
  EXPECT_NE(override_error("datasets=[1]").find("key \"datasets\""), std::string::npos);
  EXPECT_NE(override_error("lr").find("expected key=value"), std::string::npos);
  EXPECT_NE(override_error("=1").find("expected key=value"), std::string::npos);
}

TEST(TrainConfig, SeqLenAboveModelMaxIsAnError) {
  expect_error(with_model({{"seq_len", 17}}), "key \"seq_len\": (17) exceeds the model's max_seq_len (16)");
  EXPECT_EQ(error_of(with_model({{"seq_len", 16}})), "");
  expect_error(with_model({{"seq_len", -1}}), "key \"seq_len\": must be at least 0");
}

TEST(TrainConfig, BadChoices) {
  expect_error(with_model({{"device", "gpu"}}),
               "key \"device\": expected one of auto, cpu, cuda; found \"gpu\"");
  expect_error(with_model({{"scheduler", "cosin"}}), "did you mean \"cosine\"");
  expect_error(with_model({{"optimizer", "adam"}}), "optimizer");
}

}  // namespace
