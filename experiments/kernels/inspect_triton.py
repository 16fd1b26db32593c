"""Registers, spills and instruction mix of an op's Triton kernels for the H100 (sm_90a), without a GPU.

Question: before spending GPU time on a tiling or a kernel change, does any kernel spill registers, and how many
instructions (MUFU, shuffles, loads) does it issue? The SSD reverse state pass that cost 25.6 of 31.7 ms on the H100
was a register spill (NOTES.md): this tool shows such a spill on a CPU machine.

Method: the op's fwd+bwd program (``jax.value_and_grad`` of the sum of the output, at the benchmark shapes of
``kernel_breakdown.py``, abstract inputs) is exported for ``cuda`` with ``jax.export``; the Triton IR of every
``pallas_call`` is taken from the custom calls' backend configs (with the num_warps / num_stages Pallas chose) and
compiled by the ``triton`` package (its sm_90a pipeline), then ``ptxas -v`` reports registers and spill bytes and
``nvdisasm`` gives the SASS instruction histogram. Static counts: a loop body counts once.

Needs the ``triton`` Python package (3.6 was used; ``pip install triton`` on a Linux x86-64 machine, CPU is enough,
it ships ptxas / nvdisasm), importable or given with ``--triton-path``.

    python experiments/kernels/inspect_triton.py --op ssd [--tiling "state_block_p=32,heads_per_program=4"]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without installing

from kernel_breakdown import OPS  # noqa: E402

SHOWN = ("MUFU", "SHFL", "LDG", "LDGSTS", "STG", "LDS", "STS", "LDL", "STL", "HGMMA", "HMMA", "BAR", "FFMA", "BRA")


def triton_calls(exported) -> list[dict]:
    """``{name, ir, num_warps, num_stages}`` of every Triton custom call in an exported module."""
    from jax._src.interpreters import mlir as jmlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    calls = []
    ctx = jmlir.make_ir_context()
    tt_dialect.register_dialect(ctx)
    with ctx:
        module = ir.Module.parse(exported.mlir_module())

        def walk(op):
            for region in op.regions:
                for block in region.blocks:
                    for o in block.operations:
                        attrs = o.operation.attributes
                        if o.operation.name == "stablehlo.custom_call" and "mhlo.backend_config" in attrs:
                            if ir.StringAttr(attrs["call_target_name"]).value == "__gpu$xla.gpu.triton":
                                cfg = ir.DictAttr(attrs["mhlo.backend_config"])
                                calls.append(
                                    {
                                        "name": ir.StringAttr(cfg["name"]).value,
                                        "ir": str(ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes)),
                                        "num_warps": ir.IntegerAttr(cfg["num_warps"]).value,
                                        "num_stages": ir.IntegerAttr(cfg["num_stages"]).value,
                                    }
                                )
                        walk(o.operation)

        walk(module.operation)
    return calls


def compile_for_sm90(ttir: str, num_warps: int, num_stages: int, workdir: Path, name: str) -> dict:
    """Compiles Triton IR text with the triton package; registers, spills, shared memory, SASS histogram."""
    import triton
    from triton._C.libtriton import ir as tir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compiler

    path = workdir / f"{name}.ttir"
    path.write_text(ttir)
    target = GPUTarget("cuda", 90, 32)
    backend = compiler.make_backend(target)
    options = backend.parse_options(dict(num_warps=num_warps, num_stages=num_stages))
    context = tir.context()
    src = compiler.IRSource(str(path), context, backend)
    stages = {}
    backend.add_stages(stages, options, src.language)
    metadata = {"hash": "0" * 64, "target": target, **options.__dict__, "triton_version": triton.__version__}
    module = src.make_ir(target, options, None, None, context)
    outputs = {}
    for ext, stage in stages.items():
        module = stage(module, metadata)
        outputs[ext] = module
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptx = workdir / f"{name}.ptx"
    ptx.write_text(outputs["ptx"])
    cubin = workdir / f"{name}.cubin"
    cubin.write_bytes(outputs["cubin"])
    info = subprocess.run(
        [str(bin_dir / "ptxas"), "-v", "-arch=sm_90a", str(ptx), "-o", os.devnull], capture_output=True, text=True
    ).stderr
    sass = subprocess.run([str(bin_dir / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
    (workdir / f"{name}.sass").write_text(sass)
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m:
            ops[m.group(2).split(".")[0]] += 1
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_store_bytes": int(spill.group(1)) if spill else None,
        "spill_load_bytes": int(spill.group(2)) if spill else None,
        "shared_bytes": metadata.get("shared"),
        "instructions": sum(ops.values()),
        "ops": {k: ops[k] for k in SHOWN if ops[k]},
    }


def parse_tiling(base, text: str):
    """``base`` with ``k=v`` overrides (ints) from ``"k=v,k=v"``."""
    if not text:
        return base
    fields = {}
    for item in text.split(","):
        key, value = item.split("=")
        fields[key.strip()] = int(value)
    return dataclasses.replace(base, **fields)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=sorted(OPS), required=True)
    parser.add_argument("--tiling", default="", help='overrides of the default tiling, e.g. "block=32,num_stages=3"')
    parser.add_argument("--triton-path", default=None, help="a folder holding the triton package, if not installed")
    parser.add_argument("--keep", default=None, help="a folder to keep each kernel's ttir / ptx / cubin / sass in")
    args = parser.parse_args(argv)
    if args.triton_path:
        sys.path.insert(0, args.triton_path)

    _, _, make, base, _, make_inputs, label = OPS[args.op](False)
    tiling = parse_tiling(base, args.tiling)
    *inputs, _ = jax.eval_shape(make_inputs)
    fn = make(tiling)

    def loss(*a):
        return jnp.sum(fn(*a).astype(jnp.float32))

    floats = tuple(i for i, a in enumerate(inputs) if jnp.issubdtype(a.dtype, jnp.floating))
    program = jax.jit(jax.value_and_grad(loss, argnums=floats))
    from jax import export

    no_check = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = export.export(program, platforms=("cuda",), disabled_checks=no_check)(*inputs)
    print(f"{args.op} at {label}, tiling {tiling}")
    head = "| kernel | warps | stages | registers | spill st/ld bytes | shared KB | SASS instr | "
    print(head + " | ".join(SHOWN) + " |")
    print("|---" * (7 + len(SHOWN)) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for call in triton_calls(exported):
            r = compile_for_sm90(call["ir"], call["num_warps"], call["num_stages"], workdir, call["name"])
            cells = [str(r["ops"].get(k, 0)) for k in SHOWN]
            shared = "-" if r["shared_bytes"] is None else f"{r['shared_bytes'] / 1024:.0f}"
            print(
                f"| {call['name']} | {call['num_warps']} | {call['num_stages']} | {r['registers']} "
                f"| {r['spill_store_bytes']}/{r['spill_load_bytes']} | {shared} | {r['instructions']} | "
                + " | ".join(cells)
                + " |",
                flush=True,
            )


if __name__ == "__main__":
    main()
