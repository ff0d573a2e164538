#!/usr/bin/env bash
# Generate Python stubs with .pyi types from protos/ into OUT; the only recipe for them.
set -euo pipefail
py=$1
out=$2
rm -rf "$out"
mkdir -p "$out"
bin=$(dirname "$py")
"$py" -m grpc_tools.protoc -I protos \
  --plugin=protoc-gen-mypy="$bin/protoc-gen-mypy" --plugin=protoc-gen-mypy_grpc="$bin/protoc-gen-mypy_grpc" \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  protos/mlserving/v1/*.proto
# Only import lines change: serialized descriptors contain the package string and must not.
sed -i 's/^from mlserving\.v1 import/from . import/' "$out"/mlserving/v1/*.py "$out"/mlserving/v1/*.pyi
echo '"""Generated from protos/ by scripts/gen_proto.sh; never edit by hand."""' > "$out/__init__.py"
touch "$out/mlserving/__init__.py" "$out/mlserving/v1/__init__.py"
