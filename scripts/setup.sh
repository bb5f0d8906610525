#!/usr/bin/env bash
# Installs what qconvert's build and tests need on a fresh Debian machine:
# the C libraries (apt) and a Python virtual environment with pinned versions.
# Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="pkg-config libzip-dev libprotobuf-c-dev protobuf-c-compiler unzip"
missing=""
for p in $APT_PACKAGES; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup: installing apt packages:$missing"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

if [ "${1:-}" = "--no-python" ]; then exit 0; fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] || ! cmp -s Tests/Interop/requirements.txt .venv/.requirements 2>/dev/null; then
  echo "setup: creating .venv with Tests/Interop/requirements.txt"
  rm -rf .venv
  "$PY" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r Tests/Interop/requirements.txt
  cp Tests/Interop/requirements.txt .venv/.requirements
fi

# llama.cpp's Python binding (the tests run qconvert's GGUF outputs in it) has no wheel for this
# machine: it is built from its sdist once (about 12 minutes on 2 cores) into .cache/wheels and
# installed from there afterwards, like the test models are cached.
LLAMA_VERSION=0.3.36
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  mkdir -p .cache/wheels
  if ! ls .cache/wheels/llama_cpp_python-$LLAMA_VERSION-*.whl >/dev/null 2>&1; then
    echo "setup: building llama-cpp-python $LLAMA_VERSION once (about 12 minutes; cached in .cache/wheels)"
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) .venv/bin/pip wheel -q --disable-pip-version-check --no-deps \
      "llama-cpp-python==$LLAMA_VERSION" -w .cache/wheels
  fi
  .venv/bin/pip install -q --disable-pip-version-check .cache/wheels/llama_cpp_python-$LLAMA_VERSION-*.whl
fi
