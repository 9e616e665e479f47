#!/usr/bin/env bash
# Regenerates the protobuf/gRPC modules from ca.proto (run from anywhere; needs grpcio-tools,
# which is in the project's test extras). The sed makes the generated service module import its
# message module package-relatively, because credentials/proto is a package, not a top-level path.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
"$py" -m grpc_tools.protoc -I "$here" --python_out="$here" --pyi_out="$here" --grpc_python_out="$here" "$here/ca.proto"
sed -i 's/^import ca_pb2 as ca__pb2$/from . import ca_pb2 as ca__pb2/' "$here/ca_pb2_grpc.py"
# Generated code is not ours to type-check (pyproject excludes the directory, but mypy still
# follows imports into it).
for f in ca_pb2_grpc.py ca_pb2.pyi; do
  grep -q '^# mypy: ignore-errors' "$here/$f" || sed -i '1i # mypy: ignore-errors' "$here/$f"
done
