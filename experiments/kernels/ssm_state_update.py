"""Decode-step benchmark of selective_state_update (issue 17): the pallas_gpu kernel against the xla path.

Each timed call runs ``--steps`` decode steps in one ``lax.fori_loop`` carrying the float32 state (as a decode loop
does; both paths then update the carry in place), so the per-step time is the call's time / steps and the launch of
the call is amortised. Shapes: Mamba-2 1.3B (64 heads x 64 x 128, one group) and Mamba-1 1.4B (4096 channels x 16)
at batch 1, 16 and 64. Reported per step: host-clock and device (profiler) time, and the state traffic
(read + write, 8 B per element) over the device time against the copy ceiling (2.81 TB/s on the H100,
shared/docs/environment.md). Every contender is checked against the reference first.

    python experiments/kernels/ssm_state_update.py --out /tmp/ssu                     # GPU
    python experiments/kernels/ssm_state_update.py --out /tmp/ssu --sweep             # + block_p / num_warps sweep
    python experiments/kernels/ssm_state_update.py --out /tmp/ssu --smoke             # CPU, interpret mode
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import bench_common as bc
import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.selective_state_update import pallas_gpu as ssu_gpu
from pallas_kernels.selective_state_update import selective_state_update

# name: (h, p, n, g, per_channel)
MODELS = {"mamba2_1.3b": (64, 64, 128, 1, False), "mamba_1.4b": (1, 4096, 16, 1, True)}
SMOKE_MODELS = {"mamba2_tiny": (4, 8, 16, 1, False), "mamba_tiny": (1, 32, 4, 1, True)}


def inputs(key, b, h, p, n, g, per_channel, dtype):
    ks = jax.random.split(key, 9)
    dt_shape = (b, h, p) if per_channel else (b, h)
    normal = lambda k, shape, dt=dtype: jax.random.normal(k, shape, jnp.float32).astype(dt)  # noqa: E731
    return (
        normal(ks[0], (b, h, p, n), jnp.float32),
        normal(ks[1], (b, h, p)),
        normal(ks[2], dt_shape),
        -jnp.exp(normal(ks[3], (h, p, n) if per_channel else (h,), jnp.float32)),
        normal(ks[4], (b, g, n)),
        normal(ks[5], (b, g, n)),
        normal(ks[6], (h, p) if per_channel else (h,), jnp.float32),
        normal(ks[7], (b, h, p)),
        normal(ks[8], dt_shape[1:], jnp.float32),
    )


def stepper(impl, steps, interpret, config=None):
    def one(state, x, dt, A, B, C, D, z, bias):
        kw = dict(D=D, z=z, dt_bias=bias, dt_softplus=True)
        if impl == "pallas_gpu" and config is not None:
            return ssu_gpu.selective_state_update_pallas_gpu(
                state, x, dt, A, B, C, D, z, bias, dt_softplus=True, dt_limit=(0.0, float("inf")), config=config,
                interpret=interpret,
            )  # fmt: skip
        return selective_state_update(
            state, x, dt, A, B, C, **kw, implementation=impl, **bc.interpret_kwargs(impl, interpret)
        )

    @jax.jit
    def run(state, *rest):
        def body(_, carry):
            y_sum, s = carry
            y, s = one(s, *rest)
            return y_sum + y.astype(jnp.float32), s

        return lax.fori_loop(0, steps, body, (jnp.zeros(rest[0].shape, jnp.float32), state))

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, Pallas in interpret mode (CPU check)")
    parser.add_argument("--sweep", action="store_true", help="also time block_p x num_warps for pallas_gpu")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    on_gpu = bc.gpu_or_interpret(args.smoke)
    interpret = not on_gpu
    models = SMOKE_MODELS if args.smoke else MODELS
    batches = [2] if args.smoke else [int(b) for b in args.batches.split(",")]
    steps, runs = (2, 2) if args.smoke else (args.steps, args.runs)
    dtype = jnp.dtype(args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'model':>12} {'b':>3} {'impl':>22} {'host ms/step':>12} {'dev ms/step':>11} {'state TB/s':>10} err")
    for name, (h, p, n, g, per_channel) in models.items():
        for b in batches:
            args_ = inputs(jax.random.key(b), b, h, p, n, g, per_channel, dtype)
            state_bytes = b * h * p * n * 4
            ref = stepper("reference", 1, interpret)(*args_)
            contenders = [("xla", None), ("pallas_gpu", None)]
            if args.sweep:
                npow = ssu_gpu.next_power_of_2(n)
                for bp in (8, 16, 32, 64, 128, 256, 512):
                    if bp <= ssu_gpu.next_power_of_2(p) and 256 <= bp * npow <= 16384:
                        contenders += [("pallas_gpu", ssu_gpu.GpuConfig(bp, w)) for w in (1, 2, 4, 8)]
            for impl, config in contenders:
                label = impl if config is None else f"{impl}[{config.block_p}x{config.num_warps}w]"
                err = max(bc.rel_err(a, r) for a, r in zip(stepper(impl, 1, interpret, config)(*args_), ref))
                fn = stepper(impl, steps, interpret, config)
                host = bc.time_ms(fn, [args_], runs) / steps
                dev = bc.device_time_ms(fn, [args_], runs) if on_gpu else None
                dev = None if dev is None else dev / steps
                tbs = None if dev is None else 2 * state_bytes / (dev * 1e-3) / 1e12
                rows.append(dict(model=name, b=b, impl=label, host_ms=host, device_ms=dev, state_tb_s=tbs, err=err))
                print(f"{name:>12} {b:>3} {label:>22} {host:>12.4f} {bc.fmt(dev, 4):>11} {bc.fmt(tbs):>10} {err:.1e}")
    meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, steps=steps, runs=runs, dtype=str(dtype))
    (args.out / "ssm_state_update.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
