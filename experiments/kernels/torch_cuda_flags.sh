# Sourced by the build scripts of the PyTorch anchors (build_mamba_ssm_anchor.sh, ../throughput/build_peers.sh):
# sets INC (torch's CUDA include flags and Python's) and ABI (torch's _GLIBCXX_USE_CXX11_ABI), as setup.py's
# extension builds would pass them. Exits with one line when torch has no CUDA include paths.
INC=$(python3 - <<'PY'
import sysconfig
from torch.utils import cpp_extension as ce
try:
    paths = ce.include_paths(device_type="cuda")
except TypeError:  # older torch
    paths = ce.include_paths(cuda=True)
print(" ".join("-I" + p for p in paths + [sysconfig.get_paths()["include"]]))
PY
) || { echo "$(basename "$0"): no CUDA include paths from torch (a CUDA build of torch is needed)" >&2; exit 2; }
ABI=$(python3 -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
