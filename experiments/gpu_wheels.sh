#!/usr/bin/env bash
# Downloads, on a CPU machine with the package registries, the wheels of the packages the GPU machine lacks
# (ml_collections, grain, tensorflow_datasets and those of their dependencies its image does not have) into DIR
# (default .whl, ignored by git), for Python 3.12 on x86_64 Linux. A device call carries DIR and starts with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
# The GPU image already has jax, flax, optax, orbax, chex, numpy, torch (and with it fsspec, typing_extensions),
# tqdm, safetensors, attrs, wrapt, requests (environment.md); those are not downloaded. 21 wheels, ~12 MB
# (2026-12-06). `promise` has no wheel on the index: it is built here from its sdist (pure Python).
set -euo pipefail
DIR=${1:-.whl}
mkdir -p "$DIR"
PLAT=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$DIR" \
  ml_collections grain array_record cloudpickle etils absl_py portpicker protobuf pyyaml zipp importlib_resources \
  tensorflow_datasets==4.9.10 dm-tree immutabledict simple_parsing tensorflow-metadata termcolor toml \
  docstring_parser googleapis-common-protos
python3 -m pip wheel -q --no-deps -w "$DIR" promise
ls "$DIR" | wc -l
