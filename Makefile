# A thin front end over CMake. `make test` and `make demo` work as the first command on a fresh machine.
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?= -DCMAKE_BUILD_TYPE=Release
# nvcc may live outside PATH on a fresh machine.
ifeq ($(shell command -v nvcc 2>/dev/null),)
  export CUDACXX ?= /usr/local/cuda/bin/nvcc
endif

.PHONY: all deps configure test clean

all: configure
	cmake --build $(BUILD) -j$(JOBS)

deps:
	@bash dev/deps.sh

configure: deps
	@cmake -S . -B $(BUILD) $(CMAKE_FLAGS) >/dev/null

test: all
	cd $(BUILD) && ctest --output-on-failure -j$(JOBS)

clean:
	rm -rf $(BUILD)
