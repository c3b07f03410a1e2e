// SFT end to end on the CPU: the config's keys and errors, a packed batch has the same loss and
// gradients as the same examples unpacked, prompt positions contribute nothing to the gradient, a killed
// and re-run job resumes bitwise, and the example configs run (LoRA and QLoRA) on a small Hugging Face
// folder, writing PEFT adapters whose merge reproduces the trained model.
#include <gtest/gtest.h>

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "data/byte_tokenizer.h"
#include "data/chat_template.h"
#include "data/sft_dataset.h"
#include "data/sft_loader.h"
#include "llm/hf_model.h"
#include "llm/lora.h"
#include "llm/lora_adapter.h"
#include "llm/model.h"
#include "tests/train/sft_test_helpers.h"
#include "train/checkpoint.h"
#include "train/cpu_backend.h"
#include "train/sft.h"
#include "train/sft_config.h"
#include "train/trainer.h"

namespace {

namespace fs = std::filesystem;
using llm::json;
using llm::test::checkpoint_params;
using llm::test::quiet;

std::string temp_dir(const std::string& name) {
  return llm::test::fresh_temp_dir("llm_test_sft", name);
}

json tiny_model_json() {
  return llm::test::tiny_sft_model_json();
}

llm::ModelConfig tiny_model() {
  return llm::model_config_from_json(tiny_model_json(), "test");
}

std::string error_of(const json& object) {
  try {
    llm::sft_config_from_json(object, "cfg.json");
  } catch (const llm::ConfigError& e) {
    return e.what();
  }
  return "";
}

TEST(SftConfig, DefaultsAndSpellings) {
  const llm::SftConfig c = llm::sft_config_from_json(json{{"model", tiny_model_json()}}, "cfg.json");
  EXPECT_DOUBLE_EQ(c.train.lr, 5e-6);
  EXPECT_DOUBLE_EQ(c.train.weight_decay, 0.01);
  EXPECT_EQ(c.train.batch_size, 4);
  EXPECT_EQ(c.train.gradient_accumulation_steps, 16);
  EXPECT_EQ(c.train.output_dir, "sft_checkpoints");
  EXPECT_FALSE(c.lora.enabled);
  EXPECT_EQ(c.lora.preset, "minimal");
  EXPECT_EQ(c.lora.r, 8);
  EXPECT_DOUBLE_EQ(c.lora.alpha, 16.0);
  EXPECT_DOUBLE_EQ(c.lora.dropout, 0.05);
  EXPECT_TRUE(c.data.completion_only_loss);

  const llm::SftConfig d = llm::sft_config_from_json(json{{"model", tiny_model_json()},
                                                          {"learning_rate", 2e-4},
                                                          {"max_grad_norm", 0.5},
                                                          {"use_lora", true},
                                                          {"load_in_4bit", true},
                                                          {"bnb_4bit_use_double_quant", false}},
                                                     "cfg.json");
  EXPECT_DOUBLE_EQ(d.train.lr, 2e-4);
  EXPECT_DOUBLE_EQ(d.train.grad_clip, 0.5);
  EXPECT_TRUE(d.quant.nf4);
  EXPECT_FALSE(d.quant.double_quant);
}

TEST(SftConfig, ErrorsNameTheKey) {
  const json m = tiny_model_json();
  EXPECT_NE(error_of(json{{"train_file", "x.jsonl"}}).find("base_model"), std::string::npos);
  EXPECT_NE(error_of(json{{"model", m}, {"lr", 1e-4}, {"learning_rate", 1e-4}}).find("learning_rate"),
            std::string::npos);
  EXPECT_NE(error_of(json{{"model", m}, {"lora_r", 16}}).find("has no effect without \"use_lora\""),
            std::string::npos);
  EXPECT_EQ(error_of(json{{"model", m}, {"lora_r", nullptr}, {"lr", nullptr}, {"learning_rate", 1e-4}}), "");
  EXPECT_NE(error_of(json{{"model", m}, {"load_in_4bit", true}}).find("use_lora"), std::string::npos);
  EXPECT_NE(
      error_of(json{{"model", m}, {"use_lora", true}, {"lora_preset", "custom"}}).find("lora_target_modules"),
      std::string::npos);
  EXPECT_NE(error_of(json{{"model", m}, {"use_lora", true}, {"lora_r", 0}}).find("lora_r"),
            std::string::npos);
  EXPECT_NE(error_of(json{{"model", m}, {"bnb_4bit_quant_type", "fp4"}}).find("only \"nf4\""),
            std::string::npos);
  EXPECT_NE(error_of(json{{"model", m}, {"max_length", 500}}).find("max_seq_len"), std::string::npos);
  EXPECT_NE(error_of(json{{"model", m}, {"lora_rank", 8}}).find("lora_r"), std::string::npos);  // nearest key
  EXPECT_NE(error_of(json{{"model", m}, {"warmup_ratio", 1.5}}).find("warmup_ratio"), std::string::npos);
}

// PEFT's spellings of the target modules: one string or a list, "all-linear" for all seven projections,
// and target modules alone meaning the custom preset.
TEST(SftConfig, TargetModulesAsPeftGivesThem) {
  const json m = tiny_model_json();
  const auto modules_of = [&m](const json& extra) {
    json object{{"model", m}, {"use_lora", true}};
    object.update(extra);
    const llm::SftConfig c = llm::sft_config_from_json(object, "cfg.json");
    EXPECT_EQ(c.lora.preset, "custom");
    return llm::lora_preset_modules(c.lora.preset, c.lora.target_modules);
  };
  EXPECT_EQ(modules_of(json{{"lora_target_modules", "all-linear"}}), llm::lora_module_names());
  EXPECT_EQ(modules_of(json{{"lora_preset", "custom"}, {"lora_target_modules", {"v_proj", "all-linear"}}}),
            (std::vector<std::string>{"v_proj", "q_proj", "k_proj", "o_proj", "gate_proj", "up_proj",
                                      "down_proj"}));
  EXPECT_EQ(modules_of(json{{"lora_target_modules", "down_proj"}}), std::vector<std::string>{"down_proj"});
  EXPECT_EQ(modules_of(json{{"lora_target_modules", {"q_proj", "up_proj"}}}),
            (std::vector<std::string>{"q_proj", "up_proj"}));
  // A preset given beside them is still refused, and an unknown name is named.
  EXPECT_NE(error_of(json{{"model", m},
                          {"use_lora", true},
                          {"lora_preset", "all"},
                          {"lora_target_modules", "all-linear"}})
                .find("is used only with \"lora_preset\": \"custom\""),
            std::string::npos);
  EXPECT_NE(error_of(json{{"model", m}, {"use_lora", true}, {"lora_target_modules", "lm_head"}})
                .find("unknown module \"lm_head\"; expected \"all-linear\" or one of q_proj"),
            std::string::npos);
}

// A recipe pasted from transformers/TRL/PEFT names keys their way: each such key is an error that gives
// this trainer's name for it, not a guess at a near spelling.
TEST(SftConfig, KeysOfTrlAndPeftGetThisTrainersName) {
  const json m = tiny_model_json();
  const auto error_for = [&m](const char* key, const json& value) {
    return error_of(json{{"model", m}, {"use_lora", true}, {key, value}});
  };
  const auto expect_hint = [&](const char* key, const json& value, const std::string& hint) {
    const std::string e = error_for(key, value);
    EXPECT_NE(e.find("cfg.json: unknown key \"" + std::string(key) + "\": " + hint), std::string::npos) << e;
    EXPECT_EQ(e.find("did you mean"), std::string::npos) << e;
  };
  expect_hint("per_device_train_batch_size", 4, "this trainer calls it \"batch_size\"");
  expect_hint("lr_scheduler_type", "cosine", "this trainer calls it \"scheduler\" (none, cosine");
  expect_hint("logging_steps", 10, "this trainer calls it \"log_every\"");
  expect_hint("save_steps", 50, "this trainer calls it \"save_every\"");
  expect_hint("eval_strategy", "steps", "this trainer calls it \"eval_every\" (evaluation every N steps");
  expect_hint("gradient_checkpointing", true, "this trainer calls it \"recompute\"");
  expect_hint("optim", "adamw_8bit", "this trainer calls it \"optimizer\"");
  expect_hint("max_seq_length", 1024, "this trainer calls it \"max_length\"");
  expect_hint("target_modules", "all-linear", "this trainer calls it \"lora_target_modules\"");
  expect_hint("r", 32, "this trainer calls it \"lora_r\"");
  expect_hint("bf16", true, "on a GPU the CUDA backend always trains in bf16");
  expect_hint("bnb_4bit_compute_dtype", "bfloat16", "NF4 weights are always dequantised to bf16");
  // The names LLM-Lab's SFT shares with TRL are accepted as they are.
  EXPECT_EQ(error_for("learning_rate", 1e-4), "");
  EXPECT_EQ(error_for("max_grad_norm", 0.5), "");
  // A plain typo still gets the nearest key.
  EXPECT_NE(error_for("lora_alpah", 16).find("did you mean \"lora_alpha\""), std::string::npos);
}

// The first `count` built-in arithmetic chats, tokenised with ChatML and the byte tokenizer.
std::shared_ptr<llm::data::SftDataset> small_dataset(int count, bool completion_only = true) {
  static const llm::data::ByteTokenizer tokenizer;
  llm::data::SftOptions options;
  options.max_length = 256;
  options.completion_only_loss = completion_only;
  return llm::data::tokenize_sft_examples("test", llm::data::arithmetic_sft_examples(count, 3), tokenizer,
                                          llm::data::chat_template_by_name("chatml"), options);
}

struct Gradients {
  double loss = 0.0;
  int targets = 0;
  std::vector<double> grads;
};

Gradients run_batch(const llm::data::SftBatch& b, int max_batch) {
  llm::Model<double> model(tiny_model(), llm::ModelOptions(max_batch, 256, false));
  model.init_weights(5);
  model.set_training(false);
  Gradients g;
  g.loss = model.forward(b.inputs.data(), b.targets.data(), b.B, b.T, b.positions.data(), b.doc_ids.data());
  g.targets = model.target_count();
  model.zero_grad();
  model.backward_mean_cross_entropy();
  g.grads = model.gradients();
  return g;
}

TEST(SftTraining, PackedBatchHasTheLossAndGradientsOfTheSameExamplesUnpacked) {
  const auto data = small_dataset(6);
  llm::data::SftLoaderOptions unpacked;
  unpacked.B = 6;
  unpacked.shuffle = false;
  llm::data::SftLoaderOptions packed = unpacked;
  packed.packing = true;
  llm::data::SftLoader u(data, unpacked), p(data, packed);
  const llm::data::SftBatch ub = u.next(), pb = p.next();
  ASSERT_EQ(u.steps_per_epoch(), 1);
  ASSERT_EQ(p.steps_per_epoch(), 1);
  EXPECT_LT(p.bins_per_epoch(), 6);  // several documents really share a row
  EXPECT_EQ(ub.num_target_tokens, pb.num_target_tokens);
  const Gradients a = run_batch(ub, 6), b = run_batch(pb, 6);
  EXPECT_EQ(a.targets, b.targets);
  EXPECT_NEAR(a.loss, b.loss, 1e-12 * std::fabs(a.loss));
  ASSERT_EQ(a.grads.size(), b.grads.size());
  for (size_t i = 0; i < a.grads.size(); ++i) ASSERT_NEAR(a.grads[i], b.grads[i], 1e-12) << i;
}

TEST(SftTraining, PromptPositionsContributeNoGradient) {
  // Completion-only targets against the full-sequence targets of the same chats, with the upstream
  // gradient of the full forward put only on the assistant positions: the two gradients are equal, so
  // the prompt positions add exactly nothing.
  const auto masked = small_dataset(3, true), full = small_dataset(3, false);
  llm::data::SftLoaderOptions o;
  o.B = 3;
  o.shuffle = false;
  llm::data::SftLoader lm(masked, o), lf(full, o);
  const llm::data::SftBatch bm = lm.next(), bf = lf.next();
  ASSERT_EQ(bm.inputs, bf.inputs);
  EXPECT_GT(bf.num_target_tokens, 2 * bm.num_target_tokens);  // the prompts are longer than the replies

  const Gradients expected = run_batch(bm, 3);
  llm::Model<double> model(tiny_model(), llm::ModelOptions(3, 256, false));
  model.init_weights(5);
  model.set_training(false);
  model.forward(bf.inputs.data(), bf.targets.data(), bf.B, bf.T, bf.positions.data(), bf.doc_ids.data());
  std::vector<double> upstream(bf.targets.size(), 0.0);
  int count = 0;
  for (size_t n = 0; n < upstream.size(); ++n) count += bm.targets[n] != -100;
  for (size_t n = 0; n < upstream.size(); ++n) {
    if (bm.targets[n] != -100) {
      ASSERT_EQ(bm.targets[n], bf.targets[n]);
      upstream[n] = -1.0 / count;  // d(mean of -logprob) / d logprob
    }
  }
  model.zero_grad();
  model.backward(upstream.data());
  ASSERT_EQ(model.gradients().size(), expected.grads.size());
  for (size_t i = 0; i < expected.grads.size(); ++i)
    ASSERT_NEAR(model.gradients()[i], expected.grads[i], 1e-12) << i;
}

json tiny_run_config(const std::string& out) {
  return llm::test::tiny_sft_run_config(tiny_model_json(), out, "cpu");
}

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

int64_t first_logged_step(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  if (!std::getline(in, line)) return -1;
  return json::parse(line).at("step").get<int64_t>();
}

TEST(SftTraining, RerunAfterAKillResumesBitwise) {
  const std::string a = temp_dir("uninterrupted"), b = temp_dir("killed");
  ASSERT_EQ(llm::run_sft(llm::sft_config_from_json(tiny_run_config(a), "a.json"), quiet()), 0);
  // The killed run: everything up to its step-4 checkpoint, which it wrote as latest.ckpt before dying.
  fs::copy_file(a + "/step_00000004.ckpt", b + "/latest.ckpt");
  ASSERT_EQ(llm::run_sft(llm::sft_config_from_json(tiny_run_config(b), "b.json"), quiet()), 0);
  EXPECT_EQ(checkpoint_params(a + "/latest.ckpt"), checkpoint_params(b + "/latest.ckpt"));
  EXPECT_EQ(file_bytes(a + "/final_lora_adapters/adapter_model.safetensors"),
            file_bytes(b + "/final_lora_adapters/adapter_model.safetensors"));
  // It resumed (its metrics start after step 4) rather than starting over, and did train.
  EXPECT_EQ(first_logged_step(b + "/metrics.jsonl"), 5);
  EXPECT_NE(checkpoint_params(a + "/latest.ckpt"), checkpoint_params(a + "/step_00000004.ckpt"));
  // --fresh ignores the checkpoint: a rerun in place reproduces the same result from scratch.
  llm::SftRunOptions fresh = quiet();
  fresh.fresh = true;
  ASSERT_EQ(llm::run_sft(llm::sft_config_from_json(tiny_run_config(b), "b.json"), fresh), 0);
  EXPECT_EQ(first_logged_step(b + "/metrics.jsonl"), 1);
  EXPECT_EQ(checkpoint_params(a + "/latest.ckpt"), checkpoint_params(b + "/latest.ckpt"));
  fs::remove_all(a);
  fs::remove_all(b);
}

// The training losses (entries with "loss") of a run's metrics, in step order.
std::vector<double> training_losses(const std::string& dir) {
  std::ifstream in(dir + "/metrics.jsonl");
  std::vector<double> losses;
  for (std::string line; std::getline(in, line);) {
    const json entry = json::parse(line);
    if (entry.contains("loss")) losses.push_back(entry["loss"].get<double>());
  }
  return losses;
}

// NEFTune: the noise changes the training losses from the first step on, and is drawn again on resume
// (it is keyed by the micro-step), so a killed run still resumes bit for bit.
TEST(SftTraining, NeftuneChangesTrainingAndResumesBitwise) {
  const std::string plain = temp_dir("neftune_off"), a = temp_dir("neftune_uninterrupted"),
                    b = temp_dir("neftune_killed");
  const auto with_neftune = [](const std::string& out) {
    json c = tiny_run_config(out);
    c["neftune_noise_alpha"] = 5.0;
    return llm::sft_config_from_json(c, "neftune.json");
  };
  ASSERT_EQ(llm::run_sft(llm::sft_config_from_json(tiny_run_config(plain), "plain.json"), quiet()), 0);
  ASSERT_EQ(llm::run_sft(with_neftune(a), quiet()), 0);
  const std::vector<double> off = training_losses(plain), on = training_losses(a);
  ASSERT_EQ(off.size(), 6u);
  ASSERT_EQ(on.size(), 6u);
  EXPECT_NE(on[0], off[0]);
  fs::copy_file(a + "/step_00000004.ckpt", b + "/latest.ckpt");
  ASSERT_EQ(llm::run_sft(with_neftune(b), quiet()), 0);
  EXPECT_EQ(first_logged_step(b + "/metrics.jsonl"), 5);
  EXPECT_EQ(checkpoint_params(a + "/latest.ckpt"), checkpoint_params(b + "/latest.ckpt"));
  // A negative alpha is refused.
  json bad = tiny_run_config(b);
  bad["neftune_noise_alpha"] = -1.0;
  EXPECT_THROW(llm::sft_config_from_json(bad, "bad.json"), llm::ConfigError);
  fs::remove_all(plain);
  fs::remove_all(a);
  fs::remove_all(b);
}

// QLoRA: the checkpoint holds the adapters; the rerun quantises the base again and resumes bit for bit.
TEST(SftTraining, QloraRerunAfterAKillResumesBitwise) {
  const std::string a = temp_dir("qlora_uninterrupted"), b = temp_dir("qlora_killed");
  const auto qlora = [](const std::string& out) {
    json c = tiny_run_config(out);
    c["load_in_4bit"] = true;
    return llm::sft_config_from_json(c, "qlora.json");
  };
  ASSERT_EQ(llm::run_sft(qlora(a), quiet()), 0);
  const llm::Checkpoint ck = llm::read_checkpoint(a + "/step_00000004.ckpt");
  EXPECT_EQ(ck.meta["frozen_base"]["nf4"], true);
  EXPECT_EQ(ck.meta["frozen_base"]["source"], "random init");
  fs::copy_file(a + "/step_00000004.ckpt", b + "/latest.ckpt");
  ASSERT_EQ(llm::run_sft(qlora(b), quiet()), 0);
  EXPECT_EQ(first_logged_step(b + "/metrics.jsonl"), 5);
  EXPECT_EQ(checkpoint_params(a + "/latest.ckpt"), checkpoint_params(b + "/latest.ckpt"));
  EXPECT_EQ(file_bytes(a + "/final_lora_adapters/adapter_model.safetensors"),
            file_bytes(b + "/final_lora_adapters/adapter_model.safetensors"));
  // The same checkpoint on a base that is not quantised: refused.
  fs::remove_all(b);
  fs::create_directories(b);
  fs::copy_file(a + "/step_00000004.ckpt", b + "/latest.ckpt");
  try {
    llm::run_sft(llm::sft_config_from_json(tiny_run_config(b), "lora.json"), quiet());
    ADD_FAILURE() << "a QLoRA checkpoint resumed without NF4";
  } catch (const llm::CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("another frozen base"), std::string::npos) << e.what();
  }
  fs::remove_all(a);
  fs::remove_all(b);
}

TEST(SftTraining, EarlyStoppingEndsTheRunAndKeepsALatestCheckpoint) {
  const std::string out = temp_dir("early");
  json c = tiny_run_config(out);
  c["max_steps"] = 12;
  c["eval_every"] = 2;
  c["early_stopping_patience"] = 2;
  c["early_stopping_threshold"] = 100.0;  // no evaluation can beat the first by that much
  ASSERT_EQ(llm::run_sft(llm::sft_config_from_json(c, "early.json"), quiet()), 0);
  // Evaluations at steps 2 (best), 4 and 6 (no new best): the run stops at step 6.
  EXPECT_EQ(llm::read_checkpoint(out + "/latest.ckpt").meta["step"].get<int64_t>(), 6);
  EXPECT_EQ(llm::read_checkpoint(out + "/best.ckpt").meta["step"].get<int64_t>(), 2);
  fs::remove_all(out);
}

// A small Qwen2-style Hugging Face folder with the fixture BPE tokenizer and random weights.
std::string small_hf_folder(llm::ModelConfig& config, uint64_t seed = 21, const std::string& name = "base") {
  const std::string dir = temp_dir(name);
  config = llm::ModelConfig{};
  config.vocab_size = 912;
  config.d_model = 32;
  config.n_heads = 4;
  config.n_kv_heads = 2;
  config.attention_type = "gqa";
  config.d_ff = 64;
  config.n_layers = 2;
  config.max_seq_len = 128;
  config.attention_bias = true;
  config.tie_word_embeddings = true;
  llm::Model<float> model(config, llm::ModelOptions(1, 8, false));
  model.init_weights(seed);
  llm::HfExportOptions options;
  options.source_dir = std::string(LLM_SOURCE_DIR) + "/tests/fixtures/tokenizers/qwen2";
  llm::save_hf_model(dir, model, options);
  return dir;
}

void run_example_config(const std::string& name, bool nf4) {
  llm::ModelConfig config;
  const std::string base = small_hf_folder(config);
  const std::string out = temp_dir(name);
  const llm::SftConfig c =
      llm::load_sft_config(std::string(LLM_SOURCE_DIR) + "/train/configs/" + name,
                           {"base_model=" + base, "output_dir=" + out, "max_steps=3", "batch_size=2",
                            "gradient_accumulation_steps=1", "max_length=128", "eval_every=3", "eval_steps=2",
                            "sample_prompts=[]", "device=cpu"});
  EXPECT_EQ(c.quant.nf4, nf4);
  ASSERT_EQ(llm::run_sft(c, quiet()), 0);
  for (const char* dir : {"/best_lora_adapters", "/final_lora_adapters"}) {
    EXPECT_TRUE(fs::exists(out + dir + "/adapter_config.json")) << dir;
    EXPECT_TRUE(fs::exists(out + dir + "/adapter_model.safetensors")) << dir;
  }
  // The adapter, merged into the base (through NF4 for QLoRA), gives the logits the trained model gives.
  const llm::PeftAdapter adapter = llm::load_peft_adapter(out + "/final_lora_adapters", config);
  EXPECT_EQ(adapter.settings.r, c.lora.r);
  std::vector<float> merged = llm::load_hf_parameters(base, config);
  if (nf4) llm::nf4_round_trip_base(config, c.quant, merged);
  llm::merge_lora_into(config, adapter, merged);
  llm::Model<float> merged_model(config, llm::ModelOptions(1, 16, false));
  std::copy(merged.begin(), merged.end(), merged_model.parameters().begin());

  // The trained model: the base (through NF4 for QLoRA) and the checkpoint's tensors, which are the
  // adapters alone, with the base named in the header.
  llm::Model<float> trained(config, llm::ModelOptions(1, 16, false, c.lora));
  std::vector<float> base_values = llm::load_hf_parameters(base, config);
  if (nf4) llm::nf4_round_trip_base(config, c.quant, base_values);
  std::copy(base_values.begin(), base_values.end(), trained.parameters().begin());
  const llm::Checkpoint ck = llm::read_checkpoint(out + "/latest.ckpt");
  EXPECT_EQ(ck.meta["frozen_base"]["source"], base);
  EXPECT_EQ(ck.meta["frozen_base"]["nf4"], nf4);
  size_t saved_tensors = 0;
  for (const auto& a : ck.arrays) {
    if (a.kind != "param") continue;
    EXPECT_NE(a.name.find(".lora_"), std::string::npos) << a.name << ": a base tensor in a LoRA checkpoint";
    const llm::TensorInfo& t = trained.layout().at(a.name);
    ASSERT_EQ(a.data.size(), static_cast<size_t>(t.numel)) << a.name;
    std::copy(a.data.begin(), a.data.end(), trained.parameters().begin() + t.offset);
    ++saved_tensors;
  }
  size_t adapter_tensors = 0;
  for (const auto& t : trained.layout().tensors()) adapter_tensors += t.trainable;
  EXPECT_EQ(saved_tensors, adapter_tensors);
  merged_model.set_training(false);
  trained.set_training(false);
  const std::vector<int32_t> ids{3, 17, 250, 9, 800, 41, 5, 77};
  merged_model.forward(ids.data(), nullptr, 1, 8);
  trained.forward(ids.data(), nullptr, 1, 8);
  double max_diff = 0.0, max_logit = 0.0;
  for (size_t i = 0; i < ids.size() * config.vocab_size; ++i) {
    max_diff =
        std::max(max_diff, static_cast<double>(std::fabs(merged_model.logits()[i] - trained.logits()[i])));
    max_logit = std::max(max_logit, static_cast<double>(std::fabs(trained.logits()[i])));
  }
  EXPECT_LT(max_diff, 1e-5 * std::max(1.0, max_logit)) << name;
  fs::remove_all(base);
  fs::remove_all(out);
}

// LoRA checkpoints hold the adapters alone and name their frozen base by a fingerprint of its values (the
// streamed base's, equal to the whole arena's). A rerun on changed base weights is refused, and so is one
// from a moved folder (its path names the tokenizer); on the same base it resumes bitwise. A checkpoint
// with every tensor and no frozen_base resumes too, unless its frozen tensors are not this run's base.
// A base given as our checkpoint: its tensors in layout order, every one checked (known, right shape,
// once, none missing), with the file named in each error.
TEST(SftTraining, CheckpointBaseIsReadAndChecked) {
  const llm::ModelConfig config = tiny_model();
  llm::Model<float> model(config, llm::ModelOptions(1, 8, false));
  model.init_weights(7);
  llm::Checkpoint ck;
  ck.meta["model"] = config.to_json();
  for (const auto& t : model.layout().tensors()) {
    llm::CheckpointArray a;
    a.name = t.name;
    a.kind = "param";
    a.shape = t.shape;
    a.data.assign(model.parameters().begin() + t.offset, model.parameters().begin() + t.offset + t.numel);
    ck.arrays.push_back(a);
  }
  const std::string dir = temp_dir("ckpt_base");
  const auto load = [&](const llm::Checkpoint& checkpoint) {
    const std::string file = dir + "/base.ckpt";
    llm::write_checkpoint(file, checkpoint);
    llm::ModelConfig read_config;
    std::string tokenizer;
    return llm::load_base_model(file, read_config, tokenizer);
  };
  const auto error_of_load = [&](const llm::Checkpoint& checkpoint) -> std::string {
    try {
      load(checkpoint);
    } catch (const llm::CheckpointError& e) {
      return e.what();
    }
    return "";
  };
  // Stored in reverse order, read back in layout order.
  llm::Checkpoint reversed = ck;
  std::reverse(reversed.arrays.begin(), reversed.arrays.end());
  EXPECT_EQ(load(reversed), model.parameters());

  llm::Checkpoint missing = ck;
  missing.arrays.pop_back();
  EXPECT_NE(error_of_load(missing).find("base.ckpt: some parameter tensors are missing"), std::string::npos);
  llm::Checkpoint twice = missing;
  twice.arrays.push_back(twice.arrays.front());
  EXPECT_NE(error_of_load(twice).find("base.ckpt: tensor " + ck.arrays.front().name + " appears twice"),
            std::string::npos);
  llm::Checkpoint misshapen = ck;
  misshapen.arrays[0].shape = {misshapen.arrays[0].shape[0] * misshapen.arrays[0].shape[1]};
  EXPECT_NE(error_of_load(misshapen).find("has the wrong shape"), std::string::npos);
  llm::Checkpoint foreign = ck;
  foreign.arrays[0].name = "model.layers.9.self_attn.q_proj.weight";
  EXPECT_NE(error_of_load(foreign).find("is not part of the base model"), std::string::npos);
}

TEST(SftTraining, LoraCheckpointsHoldOnlyTheAdaptersAndNameTheirBase) {
  llm::ModelConfig config;
  const std::string base = small_hf_folder(config);
  const std::string a = temp_dir("adapters_a"), b = temp_dir("adapters_b");
  const auto run_config = [](const std::string& out, const std::string& base_dir) {
    json c = tiny_run_config(out);
    c.erase("model");
    c["base_model"] = base_dir;
    c["max_length"] = 128;
    return llm::sft_config_from_json(c, "adapters.json");
  };
  ASSERT_EQ(llm::run_sft(run_config(a, base), quiet()), 0);
  const llm::Checkpoint ck = llm::read_checkpoint(a + "/step_00000004.ckpt");
  const llm::ParameterLayout base_layout(config);
  size_t adapters = 0;
  for (const auto& array : ck.arrays) {
    if (array.kind != "param") continue;
    EXPECT_FALSE(base_layout.contains(array.name)) << array.name << ": a base tensor in a LoRA checkpoint";
    ++adapters;
  }
  EXPECT_EQ(adapters, 2u * 7u * 2u);  // A and B of 7 modules in each of 2 layers
  EXPECT_EQ(ck.meta["frozen_base"]["source"], base);
  EXPECT_EQ(ck.meta["frozen_base"]["nf4"], false);
  {  // the streamed fingerprint is the whole arena's
    const llm::Model<float> lora_model(config, llm::ModelOptions(1, 8, false, run_config(a, base).lora));
    const std::vector<float> base_values = llm::load_hf_parameters(base, config);
    EXPECT_EQ(ck.meta["frozen_base"]["fingerprint"],
              llm::frozen_tensors_fingerprint(lora_model.layout(), base_values.data(), base_values.size()));
  }
  const std::string final_adapter = "/final_lora_adapters/adapter_model.safetensors";

  // The base folder's weights replaced by others of the same shapes: the automatic resume is refused,
  // saying why and what to do.
  fs::copy_file(a + "/step_00000004.ckpt", b + "/latest.ckpt");
  small_hf_folder(config, 22, "base");
  try {
    llm::run_sft(run_config(b, base), quiet());
    ADD_FAILURE() << "resumed on another base";
  } catch (const llm::CheckpointError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("another frozen base"), std::string::npos) << what;
    EXPECT_NE(what.find("--fresh"), std::string::npos) << what;
  }
  // The base folder moved: its path names the tokenizer, and the refusal says so.
  small_hf_folder(config, 21, "base");  // the original weights again
  const std::string moved = temp_dir("moved_base");
  fs::copy(base, moved, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  try {
    llm::run_sft(run_config(b, moved), quiet());
    ADD_FAILURE() << "resumed with another tokenizer path";
  } catch (const llm::CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("made with the tokenizer"), std::string::npos) << e.what();
  }
  // The original base: the result is the uninterrupted run's, bit for bit.
  ASSERT_EQ(llm::run_sft(run_config(b, base), quiet()), 0);
  EXPECT_EQ(first_logged_step(b + "/metrics.jsonl"), 5);
  EXPECT_EQ(checkpoint_params(a + "/latest.ckpt"), checkpoint_params(b + "/latest.ckpt"));
  EXPECT_EQ(file_bytes(a + final_adapter), file_bytes(b + final_adapter));

  // A checkpoint with every tensor and no frozen_base resumes too.
  llm::Checkpoint full = ck;
  full.meta.erase("frozen_base");
  const std::vector<float> base_values = llm::load_hf_parameters(base, config);
  for (const auto& t : base_layout.tensors()) {
    full.arrays.push_back(
        {t.name, "param", t.shape,
         std::vector<float>(base_values.begin() + t.offset, base_values.begin() + t.offset + t.numel)});
  }
  fs::remove_all(b);
  fs::create_directories(b);
  // ... unless its frozen tensors are not this run's base.
  llm::Checkpoint other_base = full;
  other_base.arrays.back().data[0] += 1.0f;
  llm::write_checkpoint(b + "/latest.ckpt", other_base);
  try {
    llm::run_sft(run_config(b, base), quiet());
    ADD_FAILURE() << "resumed a checkpoint trained on another base";
  } catch (const llm::CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("differs from this run's base"), std::string::npos) << e.what();
  }
  llm::write_checkpoint(b + "/latest.ckpt", full);
  ASSERT_EQ(llm::run_sft(run_config(b, base), quiet()), 0);
  EXPECT_EQ(first_logged_step(b + "/metrics.jsonl"), 5);
  EXPECT_EQ(checkpoint_params(a + "/latest.ckpt"), checkpoint_params(b + "/latest.ckpt"));
  EXPECT_EQ(file_bytes(a + final_adapter), file_bytes(b + final_adapter));
  for (const std::string& dir : {base, moved, a, b}) fs::remove_all(dir);
}

// With a base model the backend initialises only the adapters (init_base false): the same adapters as a
// full initialisation, and a base left at zero for the caller to write.
TEST(SftTraining, BackendWithoutBaseInitHasTheSameAdapters) {
  llm::ModelConfig config;
  config.vocab_size = 67;
  config.d_model = 16;
  config.n_heads = 2;
  config.n_kv_heads = 1;
  config.d_ff = 24;
  config.n_layers = 2;
  config.max_seq_len = 16;
  llm::BackendOptions o;
  o.max_batch = 1;
  o.max_seq = 8;
  o.seed = 5;
  o.lora.enabled = true;
  o.lora.preset = "all";
  o.lora.r = 4;
  const llm::OptimizerConfig opt;
  llm::CpuBackend full(config, opt, o);
  o.init_base = false;
  llm::CpuBackend adapters_only(config, opt, o);
  const std::vector<float> a = full.read_parameters(), b = adapters_only.read_parameters();
  ASSERT_EQ(a.size(), b.size());
  size_t lora_values = 0;
  for (const auto& t : full.layout().tensors()) {
    for (int64_t i = 0; i < t.numel; ++i) {
      if (t.trainable) {
        ASSERT_EQ(a[t.offset + i], b[t.offset + i]) << t.name;
        lora_values += a[t.offset + i] != 0.0f;
      } else {
        ASSERT_EQ(b[t.offset + i], 0.0f) << t.name;
      }
    }
  }
  EXPECT_GT(lora_values, 0u);  // the A matrices

  // The CPU backend's direct trainable and base copies agree with TrainBackend's generic ones.
  EXPECT_EQ(full.read_trainable_parameters(), full.TrainBackend::read_trainable_parameters());
  std::vector<float> adapters = full.read_trainable_parameters();
  for (float& v : adapters) v += 0.25f;
  const std::vector<float> base_values(full.layout().total_elements() - full.layout().trainable_elements(),
                                       0.5f);
  adapters_only.write_trainable_parameters(adapters);
  adapters_only.write_base_parameters(base_values);
  full.TrainBackend::write_trainable_parameters(adapters);
  full.TrainBackend::write_base_parameters(base_values);
  EXPECT_EQ(adapters_only.read_parameters(), full.read_parameters());
  EXPECT_THROW(adapters_only.write_trainable_parameters(std::vector<float>(3)), std::invalid_argument);
  EXPECT_THROW(adapters_only.write_base_parameters(std::vector<float>(a.size() + 1)), std::invalid_argument);
  EXPECT_THROW(adapters_only.write_base_parameters(std::vector<float>(3)), std::invalid_argument);

  // One tensor at a time (a base streamed from disk), and the fingerprint fed the same way.
  const llm::TensorInfo& embed = full.layout().at("model.embed_tokens.weight");
  const std::vector<float> embed_values(static_cast<size_t>(embed.numel), -0.75f);
  adapters_only.write_tensor(embed.name, embed_values);
  full.TrainBackend::write_tensor(embed.name, embed_values);
  EXPECT_EQ(adapters_only.read_parameters(), full.read_parameters());
  EXPECT_THROW(adapters_only.write_tensor(embed.name, std::vector<float>(3)), std::invalid_argument);
  EXPECT_THROW(adapters_only.write_tensor("no.such.weight", embed_values), std::invalid_argument);
  const std::vector<float> all = full.read_parameters();
  llm::FrozenFingerprint streamed;
  for (const auto& t : full.layout().tensors()) {
    if (!t.trainable) streamed.add(all.data() + t.offset, static_cast<size_t>(t.numel));
  }
  EXPECT_EQ(streamed.hex(), llm::frozen_tensors_fingerprint(full.layout(), all.data(), all.size()));
  // It sees every frozen value: one changed bit changes it.
  std::vector<float> changed = all;
  changed[embed.offset + 5] = std::nextafter(changed[embed.offset + 5], 1.0f);
  EXPECT_NE(llm::frozen_tensors_fingerprint(full.layout(), changed.data(), changed.size()), streamed.hex());
}

// Full fine-tuning of a Hugging Face folder: every base tensor trains, the loss falls, and the result is
// written as a Hugging Face folder rather than adapters.
TEST(SftTraining, FullFineTuningOfAHuggingFaceFolder) {
  llm::ModelConfig config;
  const std::string base = small_hf_folder(config);
  const std::string out = temp_dir("full");
  json c{{"base_model", base},      {"max_length", 96},
         {"batch_size", 4},         {"gradient_accumulation_steps", 1},
         {"max_steps", 8},          {"lr", 3e-3},
         {"warmup_steps", 1},       {"packing", true},
         {"eval_every", 0},         {"save_every", 4},
         {"save_best_only", false}, {"val_fraction", 0.0},
         {"log_every", 1},          {"output_dir", out},
         {"device", "cpu"}};
  ASSERT_EQ(llm::run_sft(llm::sft_config_from_json(c, "full.json"), quiet()), 0);
  std::ifstream metrics(out + "/metrics.jsonl");
  std::vector<double> losses;
  for (std::string line; std::getline(metrics, line);)
    losses.push_back(json::parse(line).at("loss").get<double>());
  ASSERT_EQ(losses.size(), 8u);
  EXPECT_LT(losses.back(), losses.front());
  // Every tensor moved from the base's values (all are trainable), and there are no adapters.
  const std::vector<float> start = llm::load_hf_parameters(base, config);
  const std::vector<float> end = checkpoint_params(out + "/latest.ckpt");
  ASSERT_EQ(start.size(), end.size());
  const llm::ParameterLayout layout(config);
  for (const auto& t : layout.tensors()) {
    bool moved = false;
    for (int64_t i = 0; i < t.numel && !moved; ++i) moved = start[t.offset + i] != end[t.offset + i];
    EXPECT_TRUE(moved) << t.name;
  }
  EXPECT_FALSE(fs::exists(out + "/final_lora_adapters"));
  // The last step is also a Hugging Face folder (fp32, as the base), with the base's tokenizer.
  EXPECT_EQ(llm::load_hf_parameters(out + "/final_model", config), end);
  EXPECT_TRUE(fs::exists(out + "/final_model/tokenizer.json"));
  fs::remove_all(base);
  fs::remove_all(out);
}

TEST(SftTraining, QloraR64ExampleConfigRunsAndItsAdapterMerges) {
  run_example_config("sft_qlora_r64.json", true);
}
TEST(SftTraining, QloraR32ExampleConfigRunsAndItsAdapterMerges) {
  run_example_config("sft_qlora_r32_completion.json", true);
}

}  // namespace
