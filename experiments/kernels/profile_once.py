"""Runs one op's fwd+bwd (or fwd) at its benchmark shape a few times: a target for Nsight Compute or XLA dumps.

Question: what do the kernels stall on, and what code does XLA's own Triton pipeline emit for them (wgmma or not,
ex2 flavour)? ``kernel_breakdown.py`` times each kernel; this script only executes them, so that a profiler wrapped
around it sees each kernel a known number of times:

    ncu --kernel-name regex:sliding_window --launch-count 3 --section SpeedOfLight --section WarpStateStats \\
        python experiments/kernels/profile_once.py --op swa
    XLA_FLAGS=--xla_dump_to=/tmp/dump python experiments/kernels/profile_once.py --op swa --fwd-only --iters 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without installing

from bench_common import with_vjp  # noqa: E402
from kernel_breakdown import OPS  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=sorted(OPS), required=True)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--fwd-only", action="store_true")
    parser.add_argument("--tiling", default="", help='overrides of the default tiling, e.g. "num_stages=3"')
    args = parser.parse_args(argv)
    from inspect_triton import parse_tiling

    _, _, make, base, _, make_inputs, label = OPS[args.op](False)
    fn = make(parse_tiling(base, args.tiling))
    inputs = make_inputs()
    f = jax.jit(fn if args.fwd_only else with_vjp(fn))
    args_in = inputs[:-1] if args.fwd_only else inputs
    for _ in range(args.iters):
        jax.block_until_ready(f(*args_in))
    print(f"ran {args.op} at {label} {args.iters} times ({'fwd' if args.fwd_only else 'fwd+bwd'})")


if __name__ == "__main__":
    main()
