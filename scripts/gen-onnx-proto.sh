#!/usr/bin/env bash
# Regenerates the protobuf-c code for Schemas/onnx.proto into Sources/COnnxProto.
# Needs protoc-c (Debian: protobuf-c-compiler). The output is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
protoc-c --proto_path=Schemas --c_out="$out" onnx.proto
mkdir -p Sources/COnnxProto/include/onnx
cp "$out/onnx.pb-c.h" Sources/COnnxProto/include/onnx/onnx.pb-c.h
# The .c includes "onnx.pb-c.h"; point it at the header's place under include/onnx/.
sed 's|#include "onnx.pb-c.h"|#include "onnx/onnx.pb-c.h"|' "$out/onnx.pb-c.c" > Sources/COnnxProto/onnx.pb-c.c
echo "regenerated Sources/COnnxProto from Schemas/onnx.proto ($(protoc-c --version 2>&1 | head -1))"
