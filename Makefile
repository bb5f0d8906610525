# The two commands of the README:
#   make demo   installs what it needs, builds qconvert and quantizes the bundled sample
#   make test   installs everything the tests need and runs all of them
SWIFT ?= swift
BIN = .build/release/qconvert
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: demo test setup build release swift-test interop bench clean sample fuzz format lint

setup:
	scripts/setup.sh

build:
	$(SWIFT) build

release:
	$(SWIFT) build -c release --product qconvert

demo:
	scripts/setup.sh --no-python
	$(SWIFT) build -c release --product qconvert
	@mkdir -p out
	$(BIN) Samples/tiny-transformer.safetensors -o out/tiny-transformer.quantized.safetensors \
	  --policy Samples/policy.cfg --report out/tiny-transformer.report.json
	$(BIN) inspect out/tiny-transformer.quantized.safetensors

# The build must have no warnings in our own code (a clean build shows them all).
swift-test: lint
	@mkdir -p .build
	$(SWIFT) build 2>&1 | tee .build/build.log
	@if grep -E "(Sources|Tests)/[^ ]*: warning:|^warning: '[^']*': found .* unhandled" .build/build.log; then echo "the build has warnings"; exit 1; fi
	$(SWIFT) test

interop:
	$(SWIFT) build -c release --product qconvert
	QCONVERT=$(abspath $(BIN)) .venv/bin/python -m pytest -q Tests/Interop

test: setup swift-test interop

bench:
	scripts/setup.sh
	$(SWIFT) build -c release --product qconvert
	.venv/bin/python Benchmarks/safetensors_int8.py
	.venv/bin/python Benchmarks/onnx_int8.py
	.venv/bin/python Benchmarks/pytorch_int8.py
	.venv/bin/python Benchmarks/batch_zoo.py
	.venv/bin/python Benchmarks/calibration.py --only int8-channel

# swift-format with the committed .swift-format: `make format` rewrites, `make lint` checks (CI).
format:
	$(SWIFT) format --in-place --recursive --parallel Sources Tests Package.swift

lint:
	$(SWIFT) format lint --strict --recursive --parallel Sources Tests Package.swift

# Fuzzes every hostile-format reader under ASan + UBSan, FUZZ_SECONDS per target (default 30).
fuzz: setup
	scripts/fuzz.sh

sample:
	python3 Samples/make_sample.py Samples/tiny-transformer.safetensors

clean:
	rm -rf .build out
