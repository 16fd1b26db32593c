"""Where the time of a Pallas op goes: each of its kernels timed alone, inside the op's own jitted fwd+bwd.

Question: which kernel of an op's forward + backward dominates, and how far is each from the rest?

Method: the op's fwd+bwd program (output and the VJP of a random cotangent, one jit) is traced once per kernel with
every OTHER ``pallas_call`` of the backend module replaced by zeros of its output shape (made to depend on one
element of each operand, so that kernels upstream of a stub are not dead code), so the program keeps the
XLA glue and exactly one live kernel. "glue" is the program with every kernel stubbed; "all" the real program. The
time of kernel K alone is ``t(only K) - t(glue)``. Each program is compiled, warmed up and timed as the median of
``--runs`` synchronised calls (bench_common.time_ms). Zero inputs do not change the work a kernel does (no
data-dependent control flow in these kernels). Optionally (``--sweep``) alternative tilings of the op are timed too.

    python experiments/kernels/kernel_breakdown.py --op ssd --out DIR [--sweep]
    python experiments/kernels/kernel_breakdown.py --op ssd --out DIR --smoke    # tiny, interpret mode, CPU

Writes DIR/breakdown_<op>.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without installing

from bench_common import run_meta, time_ms, with_vjp  # noqa: E402


@dataclasses.dataclass
class Settings:
    op: str
    runs: int
    sweep: bool
    smoke: bool


@contextlib.contextmanager
def only_kernels(module, keep):
    """Within the block, ``module.pl.pallas_call`` runs only the kernels whose ``name`` is in ``keep``.

    The others return zeros of their ``out_shape``. Caches are cleared on entry and exit so that no trace made
    under one setting is reused under another.
    """
    real = module.pl

    def pallas_call(kernel, *args, name=None, out_shape=None, **kwargs):
        if name in keep:
            return real.pallas_call(kernel, *args, name=name, out_shape=out_shape, **kwargs)

        def stub(*operands):
            # Zeros that depend on one element of every operand: upstream kernels stay live (not dead code) and
            # XLA cannot constant-fold the glue downstream (folding (8, 24, 16, 16, 16) arrays takes minutes).
            dep = sum(op.ravel()[0].astype(jnp.float32) for op in operands if op is not None) * 0.0
            return jax.tree.map(lambda s: jnp.full(s.shape, dep, s.dtype), out_shape)

        return stub

    proxy = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
    proxy.pallas_call = pallas_call
    jax.clear_caches()
    module.pl = proxy
    try:
        yield
    finally:
        module.pl = real
        jax.clear_caches()


# ------------------------------------------------------------------------------------------------------------------
# Ops: the backend module, its kernel names, fn(tiling), default and swept tilings, an inputs() maker (the
# function's inputs then a cotangent), a label


def ssd_case(smoke: bool):
    import ssm_ssd

    from pallas_kernels.ssd import pallas_gpu

    cfg = ssm_ssd.smoke_config() if smoke else ssm_ssd.Config()
    case = cfg.cases[0]  # the target shape (B8 T4096 H24 P64 N128 G1 bf16)

    def inputs():
        args, ct = ssm_ssd.make_inputs(jax.random.key(0), case)
        return (*args, ct)

    def make(tiling):
        return ssm_ssd.tiling_fn(tiling, cfg)

    base, *sweep = ssm_ssd.sweep_tilings()
    kernels = ["ssd_state_fwd", "ssd_fwd", "ssd_state_bwd", "ssd_bwd_dx", "ssd_bwd_dc"]
    label = f"{case.label} chunk {cfg.chunk}"
    return pallas_gpu, kernels, make, base, sweep, inputs, label


def selective_scan_case(smoke: bool):
    import ssm_selective_scan

    from pallas_kernels.selective_scan import pallas_gpu

    cfg = ssm_selective_scan.smoke_config() if smoke else ssm_selective_scan.Config()
    b, t, d = cfg.cases[0]  # B4 T4096 D1536, the target shape
    n = cfg.n

    def inputs():
        args, ct = ssm_selective_scan.make_inputs(jax.random.key(0), b, t, d, n)
        return (*args, ct)

    def make(config):
        return ssm_selective_scan.config_fn(config, cfg)

    base, *sweep = ssm_selective_scan.sweep_configs()
    kernels = [
        "selective_scan_chunk_state",
        "selective_scan_chunk_carry",
        "selective_scan_fwd",
        "selective_scan_chunk_adjoint",
        "selective_scan_chunk_carry_bwd",
        "selective_scan_bwd",
    ]
    label = f"B{b} T{t} D{d} N{n} bf16, D, z, bias, softplus"
    return pallas_gpu, kernels, make, base, sweep, inputs, label


def swa_case(smoke: bool):
    import attention

    from pallas_kernels.sliding_window_attention import pallas_gpu

    cfg = attention.smoke_config() if smoke else attention.Config()
    b, t, h, e, w = cfg.batch, cfg.sel_length, cfg.heads, cfg.head_dim, cfg.window  # T32768 w2048: the target

    def inputs():
        return attention.make_inputs(jax.random.key(0), cfg, t)

    def make(tiling):
        return attention.swa_tiling_fn(tiling, cfg)

    base, *sweep = attention.sweep_tilings()
    kernels = ["sliding_window_attention_fwd", "sliding_window_attention_bwd_dq", "sliding_window_attention_bwd_dkv"]
    label = f"B{b} T{t} H{h} E{e} window {w} bf16"
    return pallas_gpu, kernels, make, base, sweep, inputs, label


OPS = {"ssd": ssd_case, "selective_scan": selective_scan_case, "swa": swa_case}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=sorted(OPS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-only", action="store_true", help="the tiling sweep without the breakdown")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    runs = 2 if args.smoke else args.runs

    module, kernels, make, base, sweep, make_inputs, label = OPS[args.op](args.smoke)
    inputs = make_inputs()
    fwd_inputs = inputs[:-1]

    def timed(fn, keep, backward=True):
        with only_kernels(module, keep):
            f = jax.jit(with_vjp(fn) if backward else fn)
            return time_ms(f, [inputs if backward else fwd_inputs], runs)

    rows = {}
    if not args.sweep_only:
        fn = make(base)
        rows = {"all": timed(fn, set(kernels)), "glue": timed(fn, set())}
        rows["fwd only"] = timed(fn, set(kernels), backward=False)
        for name in kernels:
            rows[name] = timed(fn, {name}) - rows["glue"]
        print(f"{args.op} at {label}: fwd+bwd breakdown, median of {runs}, ms")
        print("| part | ms |\n|---|---|")
        for name, ms in rows.items():
            print(f"| {name} | {ms:.3f} |", flush=True)

    swept = []
    if args.sweep or args.sweep_only:
        print("\ntiling sweep: fwd / fwd+bwd ms (every kernel live)")
        for tiling in [base, *sweep]:
            fn = make(tiling)
            row = {"tiling": dataclasses.asdict(tiling)}
            try:
                row["fwd_ms"] = timed(fn, set(kernels), backward=False)
                row["fwdbwd_ms"] = timed(fn, set(kernels))
            except Exception as err:  # a tiling that does not compile is a result
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            swept.append(row)
            print(row, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"breakdown_{args.op}.json"
    meta = run_meta(Settings(args.op, runs, args.sweep, args.smoke))
    path.write_text(json.dumps({"meta": meta, "op": args.op, "case": label, "ms": rows, "sweep": swept}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
