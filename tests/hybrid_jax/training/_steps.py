"""Runs a few training steps of a tiny config and prints losses and compiled shardings as JSON (for subprocesses).

Used by the sharding and multi-process tests, because the number of CPU devices and the distributed runtime are fixed
when a process starts its backend:

    python tests/hybrid_jax/training/_steps.py --devices 8 --mesh "8,1,1;2,2,2" --steps 5 --data_dir DIR
    python tests/hybrid_jax/training/_steps.py --devices 4 --mesh 2,2,2 --process 0 --num_processes 2 --port P ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def tiny_config(mesh_shape, steps: int, data_dir: str, accum: int = 1, period=("sal", "mlp")):
    from hybrid_jax.training import preset_config

    config = preset_config("taipan", "tiny")
    # Two periods exercise the scanned "layers" axis; a SAL + SwiGLU period compiles in seconds (a Mamba-2 layer's
    # chunked SSD takes ~4x longer), its Gumbel gate checks that sharded noise equals unsharded noise.
    config.model.period = tuple(period)
    config.model.n_periods = 2
    config.data.seq_len = 64
    config.data.batch_size = 8
    config.data.data_dir = data_dir
    config.data.num_threads = 0
    config.train.steps = steps
    config.train.grad_accum_steps = accum
    config.optim.warmup_steps = 0
    config.mesh.shape = tuple(mesh_shape)
    config.eval.batch_size = 8
    config.eval.max_batches = 1
    config.logging.progress_bar = False
    config.logging.tensorboard = False
    return config


def run_steps(config, workdir: str) -> dict:
    """Losses of ``config.train.steps`` steps and the compiled step's parameter / optimizer-state PartitionSpecs."""
    import flax.linen as nn
    import jax

    from hybrid_jax.training import Trainer

    trainer = Trainer(config, workdir)
    B = config.data.batch_size
    losses = []
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        compiled = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch(B)).compile()
        state = trainer.init_state()
        for _ in range(config.train.steps):
            state, metrics = compiled(state, trainer.global_batch(next(trainer.train_iter), B))
            losses.append(float(metrics["loss"]))
    state_in = compiled.input_shardings[0][0]
    state_out = compiled.output_shardings[0]

    def specs(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(p, simple=True, separator="/"): str(s.spec) for p, s in leaves}

    return {
        "losses": losses,
        "params_in": specs(state_in.params),
        "params_out": specs(state_out.params),
        "mu_in": specs(state_in.opt_state[1][0].mu),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }


def run_full(config, workdir: str) -> dict:
    """The whole ``train_and_evaluate`` (checkpoints, evaluation, sample); losses read back from metrics.jsonl."""
    import jax

    from hybrid_jax.training import train_and_evaluate

    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.eval.sample_tokens = 4
    result = train_and_evaluate(config, workdir)
    out = {"status": result["status"], "eval_loss": result["eval"]["loss"], "processes": jax.process_count(),
           "devices": jax.device_count()}  # fmt: skip
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            out["losses"] = [json.loads(line)["loss"] for line in f]
        out["checkpoints"] = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--mesh", default="1,1,1")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--period", default="sal,mlp")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--process", type=int, default=None)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="run train_and_evaluate (workdir shared by processes)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per process (NCCL) instead of CPU devices (gloo)")
    args = parser.parse_args()
    import jax

    if args.gpu:
        jax.config.update("jax_default_matmul_precision", "highest")  # fp32 dots, not TF32: comparable losses
    else:
        jax.config.update("jax_num_cpu_devices", args.devices)
    if args.process is not None:
        extra = {"local_device_ids": [args.process]} if args.gpu else {}
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process,
            **extra,
        )
    for i, text in enumerate(args.mesh.split(";")):  # several meshes: one RESULT line each
        mesh = tuple(int(x) for x in text.split(","))
        config = tiny_config(mesh, args.steps, args.data_dir, args.accum, args.period.split(","))
        if args.full:
            out = run_full(config, os.path.join(args.workdir, str(i)))
        else:
            out = run_steps(config, os.path.join(args.workdir, str(i)))
        sys.stdout.write("RESULT " + json.dumps({"mesh": list(mesh), **out}) + "\n")
        sys.stdout.flush()
    if args.process is not None:
        jax.distributed.shutdown()
    os._exit(0)  # skip slow interpreter teardown of grain / orbax threads


if __name__ == "__main__":
    main()
