# A thin front end over CMake. `make demo` and `make test` work as the first command on a fresh machine:
# they install missing Debian packages (as root) and configure the build on the way.
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?= -DCMAKE_BUILD_TYPE=Release
# nvcc may live outside PATH on a fresh machine.
ifeq ($(shell command -v nvcc 2>/dev/null),)
  export CUDACXX ?= /usr/local/cuda/bin/nvcc
endif

PROGRAMS := train_pretrain train_sft merge_lora convert tokenize model_info

.PHONY: all deps configure test demo demo_sft profile clean $(PROGRAMS)

all: configure
	cmake --build $(BUILD) -j$(JOBS)

deps:
	@bash dev/deps.sh

configure: deps
	@cmake -S . -B $(BUILD) $(CMAKE_FLAGS) >/dev/null

# Binaries land at the repository root, as in llm.c.
$(PROGRAMS): configure
	cmake --build $(BUILD) -j$(JOBS) --target $@

# The main job on built-in data: a small Llama-style model trained from scratch on the CPU on the
# generated arithmetic corpus, with falling train/validation loss and samples at the end.
demo: train_pretrain
	./train_pretrain -c train/configs/demo.json

# LoRA SFT on top of the demo's model: teaches it the ChatML turn format on built-in arithmetic chats.
demo_sft: train_sft
	@test -f demo_out/best.ckpt || $(MAKE) demo
	./train_sft -c train/configs/demo_sft.json --fresh

# ./train_pretrain built with -lineinfo (same code, source lines for Nsight Compute), for
# dev/profile/README.md. Binaries land at the repository root, so it replaces the plain build's.
PROFILE_BUILD ?= build-profile
profile: deps
	@cmake -S . -B $(PROFILE_BUILD) $(CMAKE_FLAGS) -DCMAKE_CUDA_FLAGS=-lineinfo >/dev/null
	cmake --build $(PROFILE_BUILD) -j$(JOBS) --target train_pretrain

test: all
	cd $(BUILD) && ctest --output-on-failure -j$(JOBS)

clean:
	rm -rf $(BUILD)
