#!/usr/bin/env bash
# Builds the PyTorch peers of issue 19 on a GPU machine (no network, no pip install): mamba_ssm with its fused paths,
# i.e. its CUDA selective scan (`selective_scan_cuda`, by experiments/kernels/build_mamba_ssm_anchor.sh) and
# Dao-AILab/causal-conv1d's `causal_conv1d_cuda` (here), both for sm_90 only, one nvcc per file, all in parallel.
# Nothing it builds may be committed.
#
#   bash experiments/throughput/build_peers.sh SRC_DIR [BUILD_DIR]        (~3-4 min on 16 cores; a rerun that finds
#                                                                          the objects in BUILD_DIR only relinks)
#   python experiments/throughput/peers.py --peers_build BUILD_DIR         (or source BUILD_DIR/env.sh first)
#
# SRC_DIR holds two source trees taken from the fetched mirrors (state-spaces/mamba, Dao-AILab/causal-conv1d) into an
# ignored folder of the checkout (.work/ is ignored; ~1.5 MB, carried to the machine):
#   mkdir -p .work/peers_src/mamba .work/peers_src/causal-conv1d
#   git --git-dir=<mamba mirror> archive HEAD csrc/selective_scan mamba_ssm | tar -x -C .work/peers_src/mamba
#   git --git-dir=<causal-conv1d mirror> archive HEAD csrc causal_conv1d | tar -x -C .work/peers_src/causal-conv1d
#   git --git-dir=<mamba mirror> rev-parse HEAD >.work/peers_src/mamba/COMMIT       (optional: recorded in the JSON)
#   git --git-dir=<causal-conv1d mirror> rev-parse HEAD >.work/peers_src/causal-conv1d/COMMIT
#
# BUILD_DIR (default .work/peers_build) then holds:
#   mamba/     the anchor script's build: selective_scan_cuda*.so and py/mamba_ssm (the whole package with an empty
#              __init__: the package's own one imports Mamba-3's optional kernels and the generation utilities
#              eagerly; the model classes still import through mamba_ssm.models.mixer_seq_simple)
#   conv/      causal_conv1d_cuda*.so, its objects and logs, and py/causal_conv1d (the package as shipped)
#   env.sh     `export PYTHONPATH=...` with the four folders
#   sources.txt  the COMMIT files of SRC_DIR, if any (peers.py records it)
# setup.py's nvcc flags are kept (-O3, the half/bf16 operator undefs, relaxed constexpr, extended lambdas, fast math,
# lineinfo) with one -gencode (compute_90, sm_90) instead of eleven; setup.py's --threads 4 only helps with several
# architectures and is dropped. Keep BUILD_DIR out of a device call's carry list: a carried path replaces the
# folder on the machine, and with it the objects that make a rerun fast.
set -eu
SRC=$(cd "${1:?usage: build_peers.sh SRC_DIR [BUILD_DIR]}" && pwd)
B=${2:-.work/peers_build}
mkdir -p "$B/mamba" "$B/conv"
B=$(cd "$B" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
CUDA=${CUDA_HOME:-/usr/local/cuda}
for need in "$SRC/mamba/csrc/selective_scan" "$SRC/mamba/mamba_ssm" "$SRC/causal-conv1d/csrc" \
  "$SRC/causal-conv1d/causal_conv1d"; do
  [ -d "$need" ] || { echo "build_peers.sh: missing $need (see the header of this script)" >&2; exit 2; }
done
[ -x "$CUDA/bin/nvcc" ] || { echo "build_peers.sh: no nvcc at $CUDA/bin/nvcc (set CUDA_HOME)" >&2; exit 2; }
t0=$(date +%s)

# mamba_ssm's selective scan: the existing anchor build, in the background while causal-conv1d compiles.
bash "$HERE/../kernels/build_mamba_ssm_anchor.sh" "$SRC/mamba" "$B/mamba" >"$B/mamba.log" 2>&1 &
anchor=$!

# shellcheck source=/dev/null
source "$HERE/../kernels"/torch_cuda_flags.sh
CC="$SRC/causal-conv1d/csrc"
DEFS="-DTORCH_EXTENSION_NAME=causal_conv1d_cuda -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=$ABI -I$CC"
NV="-O3 -std=c++17 --expt-relaxed-constexpr --expt-extended-lambda --use_fast_math -lineinfo -Xcompiler -fPIC
  -gencode arch=compute_90,code=sm_90"
for t in HALF BFLOAT16 BFLOAT162; do NV="$NV -U__CUDA_NO_${t}_OPERATORS__ -U__CUDA_NO_${t}_CONVERSIONS__"; done
compile() {  # source, object, compiler command... (an object that exists is kept)
  local src=$1 obj=$2
  shift 2
  [ -f "$obj" ] && return 0
  if "$@" -c "$src" -o "$obj.tmp" >"$obj.log" 2>&1; then mv "$obj.tmp" "$obj"; else echo "FAILED $src (see $obj.log)"; fi
}
pids=()
for f in "$CC"/*.cu; do
  # shellcheck disable=SC2086
  compile "$f" "$B/conv/$(basename "$f" .cu).o" "$CUDA/bin/nvcc" $NV $DEFS $INC &
  pids+=($!)
done
# shellcheck disable=SC2086
compile "$CC/causal_conv1d.cpp" "$B/conv/causal_conv1d.o" g++ -O3 -std=c++17 -fPIC $DEFS $INC "-I$CUDA/include" &
pids+=($!)
status=0
wait "${pids[@]}"
for f in causal_conv1d causal_conv1d_fwd causal_conv1d_bwd causal_conv1d_update; do
  [ -f "$B/conv/$f.o" ] || { echo "build_peers.sh: $f.o was not built:" >&2; tail -20 "$B/conv/$f.o.log" >&2; status=1; }
done
TL=$(python3 -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
SUF=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
if [ $status = 0 ]; then
  g++ -shared "$B"/conv/*.o "-L$TL" "-Wl,-rpath,$TL" -lc10 -ltorch -ltorch_cpu -ltorch_python -lc10_cuda -ltorch_cuda \
    "-L$CUDA/lib64" -lcudart -o "$B/conv/causal_conv1d_cuda$SUF"
fi
rm -rf "$B/conv/py" && mkdir -p "$B/conv/py" && cp -r "$SRC/causal-conv1d/causal_conv1d" "$B/conv/py/"
wait "$anchor" || { echo "build_peers.sh: the selective-scan build failed:" >&2; tail -20 "$B/mamba.log" >&2; status=1; }
grep FAILED "$B/mamba.log" >&2 && status=1

for d in mamba causal-conv1d; do
  echo "$d $(cat "$SRC/$d/COMMIT" 2>/dev/null || echo unknown)"
done >"$B/sources.txt"
PP="$B/mamba/py:$B/mamba:$B/conv/py:$B/conv"
echo "export PYTHONPATH=\${PYTHONPATH:+\$PYTHONPATH:}$PP" >"$B/env.sh"
# The import check: both extensions load (undefined symbols show up here, not at link time) and the model imports.
PYTHONPATH="$PP${PYTHONPATH:+:$PYTHONPATH}" python3 - <<'PY' || status=1
import torch  # noqa: F401  (loads libtorch before the extensions)
import causal_conv1d_cuda  # noqa: F401
import selective_scan_cuda  # noqa: F401
from causal_conv1d import causal_conv1d_fn  # noqa: F401
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: F401
import mamba_ssm.ops.selective_scan_interface as ssi
import mamba_ssm.ops.triton.ssd_combined as ssd
assert ssi.causal_conv1d_fwd_function is not None and ssi.selective_scan_cuda is not None, "mamba_inner_fn not fused"
assert ssd.causal_conv1d_fwd_function is not None, "mamba_split_conv1d_scan_combined not fused"
print("import check: causal_conv1d_cuda, selective_scan_cuda, MambaLMHeadModel, both fused paths: ok")
PY
echo "build_peers.sh: $(($(date +%s) - t0)) s, status $status; source $B/env.sh (or pass --peers_build $B)"
exit $status
