#!/usr/bin/env bash
# Builds the benchmark anchor of issue 3 on a GPU machine: mamba_ssm's CUDA selective scan (`selective_scan_cuda`)
# for sm_90, and an import path for its Python interfaces, from a checkout of state-spaces/mamba that stays outside
# the repository (or in an ignored folder). Nothing it builds may be committed.
#
#   bash experiments/kernels/build_mamba_ssm_anchor.sh MAMBA_SRC [BUILD_DIR]      (~3 min on 16 cores)
#   export PYTHONPATH=$PYTHONPATH:BUILD_DIR/py:BUILD_DIR                          (as printed at the end)
#
# MAMBA_SRC needs csrc/selective_scan and mamba_ssm/{ops,utils}, e.g.
#   git --git-dir=<fetched mirror> archive HEAD csrc/selective_scan mamba_ssm/ops mamba_ssm/utils | tar -x -C .work/mamba
# Why by hand and not `pip install`: no network on the GPU machines (no build isolation), and one nvcc per file in
# parallel for one architecture takes ~3 min where setup.py compiles every file for eight. Objects already built in
# BUILD_DIR are kept. The package's own __init__ imports the whole model zoo (and transformers); BUILD_DIR/py gets an
# empty one, so only the kernels' interfaces (selective_scan_interface, triton.ssd_combined) are imported. The
# benchmarks time the anchor when those imports work (ssm_selective_scan.py, ssm_ssd.py, ab_variants.py mamba_ssm).
set -eu
SRC=$(cd "${1:?usage: build_mamba_ssm_anchor.sh MAMBA_SRC [BUILD_DIR]}" && pwd)
B=${2:-/tmp/mamba_ssm_anchor}
mkdir -p "$B"
B=$(cd "$B" && pwd)
CUDA=${CUDA_HOME:-/usr/local/cuda}
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")"/torch_cuda_flags.sh
DEFS="-DTORCH_EXTENSION_NAME=selective_scan_cuda -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=$ABI"
# The flags of mamba_ssm's setup.py, for sm_90 only.
NV="-O3 -std=c++17 --expt-relaxed-constexpr --expt-extended-lambda --use_fast_math -lineinfo -Xcompiler -fPIC
  -gencode arch=compute_90,code=sm_90"
for t in HALF BFLOAT16 BFLOAT162; do NV="$NV -U__CUDA_NO_${t}_OPERATORS__ -U__CUDA_NO_${t}_CONVERSIONS__"; done
compile() {  # source, object, compiler command...
  local src=$1 obj=$2
  shift 2
  [ -f "$obj" ] && return 0
  if "$@" -c "$src" -o "$obj.tmp" >"$obj.log" 2>&1; then mv "$obj.tmp" "$obj"; else echo "FAILED $src (see $obj.log)"; fi
}
for f in "$SRC"/csrc/selective_scan/*.cu; do
  # shellcheck disable=SC2086
  compile "$f" "$B/$(basename "$f" .cu).o" "$CUDA/bin/nvcc" $NV $DEFS $INC &
done
# shellcheck disable=SC2086
compile "$SRC/csrc/selective_scan/selective_scan.cpp" "$B/selective_scan.o" g++ -O3 -std=c++17 -fPIC $DEFS $INC \
  "-I$CUDA/include" &
wait
TL=$(python3 -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
SUF=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
g++ -shared "$B"/*.o "-L$TL" "-Wl,-rpath,$TL" -lc10 -ltorch -ltorch_cpu -ltorch_python -lc10_cuda -ltorch_cuda \
  "-L$CUDA/lib64" -lcudart -o "$B/selective_scan_cuda$SUF"
rm -rf "$B/py" && mkdir -p "$B/py"
cp -r "$SRC/mamba_ssm" "$B/py/" && : >"$B/py/mamba_ssm/__init__.py"
echo "built $B/selective_scan_cuda$SUF; export PYTHONPATH=\$PYTHONPATH:$B/py:$B"
