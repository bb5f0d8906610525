#!/usr/bin/env bash
# Fuzzes every reader of hostile input under AddressSanitizer (Swift and C) and UndefinedBehavior-
# Sanitizer traps (C: the kernels, protobuf-c's generated code, libyaml inside Yams), FUZZ_SECONDS
# per target (default 30). The seed corpus is made by scripts/make-fuzz-corpus.py; inputs libFuzzer
# finds interesting are kept in .cache/fuzz-corpus/TARGET, crashes in .cache/fuzz-artifacts/.
# Exit status: 0 when no target crashed, leaked, timed out or ran out of memory.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${FUZZ_SECONDS:-30}
TARGETS=${FUZZ_TARGETS:-"safetensors safetensors-header pickle zip npy npz pytorch onnx gguf policy compressed-tensors"}
CORPUS=.cache/fuzz-corpus
ARTIFACTS=.cache/fuzz-artifacts

swift build -c debug --scratch-path .build-fuzz --product qconvert-fuzz \
  -Xswiftc -sanitize=fuzzer,address -Xswiftc -DQCONVERT_FUZZ -Xswiftc -use-ld=lld \
  -Xcc -fsanitize=fuzzer-no-link,address,undefined -Xcc -fsanitize-trap=undefined 2>&1 \
  | grep -v "Cannot export local symbol" | tail -1
BIN=.build-fuzz/debug/qconvert-fuzz

if [ ! -d "$CORPUS/policy" ] || [ ! -d "$CORPUS/gguf" ] || [ ! -d "$CORPUS/compressed-tensors" ]; then
  .venv/bin/python scripts/make-fuzz-corpus.py "$CORPUS"
fi
mkdir -p "$ARTIFACTS"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1}
# a Swift trap must reach libFuzzer as the crash it is, not run the backtracer under ASan
export SWIFT_BACKTRACE=enable=no
status=0
for t in $TARGETS; do
  log="$ARTIFACTS/$t.log"
  if "$BIN" "$t" "$CORPUS/$t" -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
       -max_len=65536 -print_final_stats=1 -artifact_prefix="$ARTIFACTS/$t-" >"$log" 2>&1; then
    result=ok
  else
    result=FAILED
    status=1
  fi
  runs=$(grep -o "stat::number_of_executed_units: *[0-9]*" "$log" | grep -o "[0-9]*$" || echo "?")
  printf "fuzz %-20s %10s inputs in %ss  %s\n" "$t" "$runs" "$SECONDS_PER_TARGET" "$result"
  if [ "$result" = FAILED ]; then grep -E "ERROR|SUMMARY|Test unit written|deadly signal" "$log" | head -8; fi
done
exit $status
