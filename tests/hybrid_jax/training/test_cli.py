"""The command line end to end: a falling loss, bitwise resume after SIGKILL, clean SIGTERM, one-line errors.

Every run here is ``python -m hybrid_jax.train --config=configs/taipan.py:size=tiny`` in a subprocess with a smaller
layer pattern (one SAL and its SwiGLU: the stochastic gate makes the resume test meaningful) and short rows; the
subprocesses share the suite's persistent compilation cache (tests/conftest.py), so identical programs compile once.
"""

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.child_env import child_env
from tests.run_once import once_per_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
STEPS = 40


def cli_args(workdir, data_dir, *extra):
    return [
        sys.executable, "-m", "hybrid_jax.train", "--config=configs/taipan.py:size=tiny", f"--workdir={workdir}",
        "--config.model.period=('sal','mlp')", "--config.model.n_periods=1",
        "--config.data.seq_len=64", "--config.data.batch_size=8", f"--config.data.data_dir={data_dir}",
        f"--config.train.steps={STEPS}", "--config.train.log_every=1", "--config.train.checkpoint_every=5",
        "--config.train.eval_every=0", "--config.eval.batch_size=8", "--config.eval.max_batches=1",
        "--config.eval.sample_tokens=8", "--config.logging.progress_bar=False", *extra,
    ]  # fmt: skip


def start(args, optimized: bool = False):
    env = child_env(optimized=optimized)  # with the suite's compilation cache (tests/conftest.py)
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records}


def checkpoint_steps(workdir) -> list[int]:
    path = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def tree_digest(path) -> str:
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            h.update(os.path.relpath(p, path).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def baseline(data_dir, tmp_path_factory):
    """An uninterrupted run: (workdir, stdout, stderr), run once even when xdist splits this module's tests."""

    def run():
        workdir = str(tmp_path_factory.mktemp("baseline"))
        proc = start(cli_args(workdir, data_dir))
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        return workdir, out, err

    return tuple(once_per_run(tmp_path_factory, "cli_baseline", run))


def test_cli_run_records_itself_and_loss_falls(baseline):
    workdir, out, _ = baseline
    got = losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    first, last = sum(got[s] for s in range(1, 6)) / 5, sum(got[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < first - 0.5, (first, last)
    record = json.loads(open(os.path.join(workdir, "metrics.jsonl")).readline())
    for key in ("step", "loss", "learning_rate", "tokens_per_sec", "sal_selection_rate/0", "sal_constraint"):
        assert key in record
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["config"]["train"]["steps"] == STEPS
    assert config["kernels_chosen"]["ssd"] in ("xla", "reference", "pallas_gpu", "pallas_tpu")
    assert config["mesh"]["shape"] == {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}
    assert "git_revision" in config and config["model_config"]["vocab_size"] == 384
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
    assert checkpoint_steps(workdir) == [30, 35, 40]  # max_checkpoints=3
    final = [json.loads(line) for line in open(os.path.join(workdir, "eval.jsonl"))][-1]
    assert final["step"] == STEPS and "bits_per_byte" in final and "perplexity" in final
    assert "final evaluation at step 40" in out and "sample (8 tokens" in out


def test_sigkill_then_rerun_repeats_the_uninterrupted_losses_bitwise(baseline, data_dir, tmp_path):
    workdir = str(tmp_path / "killed")
    proc = start(cli_args(workdir, data_dir))
    deadline = time.time() + 240
    while not checkpoint_steps(workdir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    kept = checkpoint_steps(workdir)
    assert kept and kept[-1] < STEPS, f"the run was not killed mid-way (checkpoints {kept})"
    # What a save cut short leaves behind (orbax writes into a temporary directory and renames it when complete):
    # the restart must ignore it and resume from the last complete checkpoint.
    unfinished = os.path.join(workdir, "checkpoints", f"{STEPS - 1}.orbax-checkpoint-tmp-1234", "state")
    os.makedirs(unfinished)
    open(os.path.join(unfinished, "half_written"), "wb").write(b"\x00" * 100)
    proc = start(cli_args(workdir, data_dir))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    want = losses(baseline[0])
    got = losses(workdir)
    assert got == want  # exact float equality of every step, including the data order after the restart
    final = lambda w: [json.loads(line) for line in open(os.path.join(w, "eval.jsonl"))][-1]  # noqa: E731
    assert final(workdir)["loss"] == final(baseline[0])["loss"]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
    workdir = str(tmp_path / "preempted")
    proc = start(cli_args(workdir, data_dir, "--config.train.checkpoint_every=0"))
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(workdir, "metrics.jsonl")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    steps = checkpoint_steps(workdir)
    assert len(steps) == 1 and 1 <= steps[0] < STEPS, steps
    assert f"preempted: saved checkpoint step {steps[0]}" in out


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def test_bad_input_exits_with_one_line_and_keeps_checkpoints(baseline, data_dir, tmp_path):
    good = str(tmp_path / "good")
    shutil.copytree(baseline[0], good)
    corrupt = str(tmp_path / "corrupt")
    shutil.copytree(baseline[0], corrupt)
    latest = os.path.join(corrupt, "checkpoints", str(STEPS))
    for root, _, files in os.walk(os.path.join(latest, "state")):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.write(b"\x00garbage" * 8)
    digest_good, digest_corrupt = tree_digest(os.path.join(good, "checkpoints")), tree_digest(latest)
    cases = {
        "mistyped": (good, ["--config.model.mamba2.d_stat=64"], r"no such config field.*d_stat.*d_state"),
        "negative": (good, ["--config.train.steps=-5"], r"config: train.steps=-5 must be an integer >= 1"),
        "mesh": (good, ["--config.mesh.shape=(2,2,2)"], r"mesh.shape=\(2, 2, 2\) needs 8 devices but there are 1"),
        "dataset": (good, ["--config.data.source=dir:/no/such/corpus"], r"text directory '/no/such/corpus' does"),
        "corrupt": (corrupt, [], rf"checkpoint step {STEPS} in .* cannot be restored .*left in place"),
        "nan": (str(tmp_path / "nan"), ["--config.optim.learning_rate=1e9", "--config.train.checkpoint_every=1"],
                r"non-finite (loss|grad_norm)=\S+ at step (\d+): stopping without saving this state; the last good "
                r"checkpoint is step \d+"),
    }  # fmt: skip
    procs = {name: start(cli_args(w, data_dir, *extra)) for name, (w, extra, _) in cases.items()}
    lines = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, (name, err[-2000:])
        lines[name] = _error_line(err)
        assert lines[name].startswith("error: "), (name, lines[name])
        assert re.search(cases[name][2], lines[name]), (name, lines[name])
    assert tree_digest(os.path.join(good, "checkpoints")) == digest_good
    assert tree_digest(latest) == digest_corrupt  # the unreadable checkpoint is left as it was
    # The non-finite run saved only states after steps with a finite loss and gradient, none from the bad step on.
    nan_dir = cases["nan"][0]
    bad_step = int(re.search(r"at step (\d+)", lines["nan"]).group(1))
    saved = checkpoint_steps(nan_dir)
    assert saved and max(saved) < bad_step, (saved, bad_step)
    recorded = losses(nan_dir)
    assert all(math.isfinite(recorded[s]) for s in saved)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["taipan", "samba", "mamba2", "mamba", "transformer", "transformer_swa", "jamba"])
def test_every_preset_config_trains_at_size_tiny(name, data_dir, tmp_path):
    """The issue's acceptance run, ``--config=configs/<preset>.py:size=tiny`` at its defaults: the loss falls."""
    args = [sys.executable, "-m", "hybrid_jax.train", f"--config=configs/{name}.py:size=tiny", f"--workdir={tmp_path}",
            f"--config.data.data_dir={data_dir}", "--config.logging.progress_bar=False"]  # fmt: skip
    proc = start(args, optimized=True)  # 200 training steps: run time, not compile time
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    got = list(losses(str(tmp_path)).values())
    assert len(got) == 20 and sum(got[-5:]) / 5 < sum(got[:2]) / 2 - 1.0, got
    evals = [json.loads(line)["loss"] for line in open(tmp_path / "eval.jsonl")]
    assert evals[-1] < evals[0], evals
    assert "final evaluation at step 200" in out
