"""The recall experiments at --size=tiny (EXPERIMENTS.md: every experiment's tiny run is in the suite), the runner's
resume and failure records, and one-line errors for bad arguments."""

import importlib.util
import json
import math
import os

import pytest

from hybrid_jax.experiments import EvalSpec, Job, load_results, run_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _experiment(name):
    spec = importlib.util.spec_from_file_location(f"exp_{name}", os.path.join(ROOT, "experiments", name, "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name, tmp_path, *extra):
    module = _experiment(name)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--size=tiny", f"--out={out}", f"--workdir={work}", "--no-progress", *extra]
    return module, module.main(module.EXPERIMENT, argv), out


def _check_rows(results, models, evals_per_job):
    done = {k: j for k, j in results["jobs"].items() if j["status"] == "done"}
    assert sorted(j["tags"]["model"] for j in done.values()) == sorted(models)
    for key, job in done.items():
        rows = [r for r in results["rows"] if r["job"] == key]
        assert len(rows) == len(job["members"]) * evals_per_job
        for r in rows:
            assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["loss"]) and r["steps"] == job["steps"]
            assert r["num_params"] == job["num_params"] > 0


def test_mqar_tiny_learns_the_easiest_cell_and_resumes(tmp_path):
    module, results, out = _run("mqar", tmp_path)
    models = module.SIZES["tiny"]["models"]
    _check_rows(results, models, evals_per_job=2)
    chance = 1 / 32  # 32 values
    attention = [r for r in results["rows"] if r["model"] == "attention" and r["K"] == 2]
    assert max(r["accuracy"] for r in attention) > 4 * chance
    taipan = results["jobs"]["taipan_c0.3/d32/L32"]["extra"]
    assert set(taipan["by_role"][0][0]) == {"key", "value", "query", "filler", "overall"}
    assert taipan["rate_curve"] and all(k.startswith(("step", "sal_selection_rate/")) for k in taipan["rate_curve"][0])
    for name in ("tiny.json", "tiny.md", "tiny_accuracy.png", "tiny_selection_rate.png", "tiny_selection_roles.png"):
        assert (out / name).stat().st_size > 0
    # A rerun finds every job done and trains nothing: the rows are the same objects' values.
    before = json.loads((out / "tiny.json").read_text())
    _, again, _ = _run("mqar", tmp_path)
    assert again["rows"] == before["rows"]


@pytest.mark.parametrize(
    "name,evals",
    [("joint_recall", 1), ("selective_copying", 1), ("induction_heads", 2)],
)
def test_recall_experiment_tiny_runs(tmp_path, name, evals):
    module, results, out = _run(name, tmp_path)
    _check_rows(results, module.SIZES["tiny"]["models"], evals_per_job=evals)
    assert (out / "tiny.md").read_text().count("|") > 10
    assert any(p.suffix == ".png" and p.stat().st_size > 0 for p in out.iterdir())
    if name == "induction_heads":
        # Restricting the argmax to a set that holds the answer can only turn a miss into a hit, and a predicted
        # trigger is never a hit of the full argmax.
        rows = module.with_breakdown(results)
        assert all("accuracy_ordinary" in r for r in rows)
        for r in rows:
            assert r["accuracy"] <= r["accuracy_ordinary"] + 1e-9 and r["accuracy"] + r["predicts_trigger"] <= 1 + 1e-9
            assert r["answers"] == r["eval_tokens"]


def test_induction_answer_breakdown_counts_designed_logits():
    """answer_breakdown on a stub trainer whose model returns chosen logits: 4 rows with answers, vocab 6 (ordinary
    0-3, trigger 4, no-op 5), answers 1, 2, 3, 0; at the answer position the full argmax is 1 (hit), 4 (trigger;
    ordinary argmax 2: hit), 4 (trigger; ordinary argmax 0: miss), 5 (no-op; ordinary argmax 0: hit). Every other
    position predicts the answer outright, so reading a wrong position would show. Row 5 is padding."""
    import jax.numpy as jnp
    import numpy as np

    module = _experiment("induction_heads")
    t, vocab = 6, 6
    answer_at = np.array([5, 3, 5, 2])
    answers = np.array([1, 2, 3, 0])
    targets = np.zeros((5, t), np.int32)
    targets[np.arange(4), answer_at] = answers
    mask = np.zeros((5, t), np.float32)
    mask[np.arange(4), answer_at] = 1.0
    logits = np.full((5, t, vocab), -5.0, np.float32)
    logits[np.arange(4), :, answers] = 9.0  # every position but the answer's (overwritten below) predicts the answer
    for row, (top, second) in enumerate([(1, 0), (4, 2), (4, 0), (5, 0)]):
        logits[row, answer_at[row]] = -5.0
        logits[row, answer_at[row], top], logits[row, answer_at[row], second] = 3.0, 1.0

    class Model:
        def apply(self, variables, tokens, segment_ids, positions, logits_at):
            return jnp.take_along_axis(jnp.asarray(logits), logits_at[:, :, None], axis=1) * variables["params"]

    class Trainer:
        model, members = Model(), [(1e-3, 0), (1e-3, 1)]

        def eval_batches_for(self, source, seq_len, max_batches, batch_size):
            zeros = np.zeros((5, t), np.int32)
            yield {"inputs": zeros, "targets": targets, "mask": mask, "segment_ids": zeros + 1, "positions": zeros}

    # The second member's parameter 0 makes every logit 0: ties go to id 0, a hit only for the row whose answer is 0.
    out = module.answer_breakdown(Trainer(), jnp.array([1.0, 0.0]), {"L=6": EvalSpec()}, vocab)
    assert out["L=6"] == [
        {"accuracy_ordinary": 0.75, "predicts_trigger": 0.5, "answers": 4.0},
        {"accuracy_ordinary": 0.25, "predicts_trigger": 0.0, "answers": 4.0},
    ]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--models=mamba,transformerx"], "--models: unknown model(s) ['transformerx']"),
        (["--seeds=0,0"], "--seeds=0,0: seeds must be distinct integers >= 0"),
        (["--seeds=a"], "--seeds: 'a' is not a comma-separated list of int"),
        (["--size=huge"], "--size: invalid choice: 'huge'"),
        (["--out=/proc/no/such/dir"], "--out: output '/proc/no/such/dir/tiny.json' is not writable"),
        (["--jobs=attention/d32/*,mamba/*"], "--jobs: 'mamba/*' matches none of this run's jobs (attention/d32/L32, "),
        (["--kernels=attention=xla"], "kernels 'attention=xla': unknown op 'attention' (known: causal_conv1d, "),
        (["--kernels=ssd=fast"], "kernels 'ssd=fast': 'fast' is not one of ('auto', 'reference', 'xla', "),
    ],
)
def test_bad_arguments_give_one_line(tmp_path, capsys, argv, message):
    module = _experiment("mqar")
    with pytest.raises(SystemExit) as e:
        module.main(module.EXPERIMENT, [f"--workdir={tmp_path}", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_jobs_patterns_select_one_models_jobs_of_one_width(tmp_path):
    from hybrid_jax.experiments.cli import parse_args, select_jobs

    module = _experiment("mqar")
    args = parse_args(module.EXPERIMENT, ["--size=full", f"--out={tmp_path}", f"--workdir={tmp_path}"])
    jobs = module.EXPERIMENT.build(args)
    assert len(jobs) == len(module.MODELS) * 2 * 2  # two widths, two lengths
    picked = select_jobs(jobs, ["attention/d128/*", "mamba/*/L512"])
    # In the build's order (length, width, model), not the patterns'.
    want = ["attention/d128/L256", "mamba/d64/L512", "attention/d128/L512", "mamba/d128/L512"]
    assert [j.key for j in picked] == want
    assert select_jobs(jobs, None) == jobs


def test_kernels_option_sets_every_selected_jobs_kernels(tmp_path):
    from hybrid_jax.experiments.cli import build_jobs, parse_args
    from hybrid_jax.training import model_config

    module = _experiment("mqar")
    argv = ["--size=full", f"--out={tmp_path}", f"--workdir={tmp_path}", "--jobs=attention/d128/*"]
    default = build_jobs(module.EXPERIMENT, parse_args(module.EXPERIMENT, argv))
    assert {j.config.kernels.sliding_window_attention for j in default} == {"auto"}
    args = parse_args(module.EXPERIMENT, [*argv, "--kernels=sliding_window_attention=xla"])
    jobs = build_jobs(module.EXPERIMENT, args)
    assert [j.key for j in jobs] == ["attention/d128/L256", "attention/d128/L512"]
    for job in jobs:
        kernels = model_config(job.config, vocab_size=64).kernels
        assert kernels.sliding_window_attention == "xla"
        assert kernels.ssd == "auto"  # only the named op changed


def test_an_impossible_grid_value_gives_one_line(tmp_path, capsys, monkeypatch):
    module = _experiment("mqar")
    monkeypatch.setitem(module.SIZES["tiny"], "grid", {32: (2, 40)})  # 40 pairs cannot fit in 32 tokens
    with pytest.raises(SystemExit) as e:
        module.main(module.EXPERIMENT, [f"--out={tmp_path}", f"--workdir={tmp_path}", "--no-progress"])
    assert e.value.code == 2
    assert "num_kv_pairs=40" in capsys.readouterr().err


def _tiny_job(key, tmp_path, analyze=None, source="mqar?seq_len=16&num_kv_pairs=2&vocab_size=32&num_train=64"):
    from hybrid_jax.experiments.recall import recall_config

    config = recall_config(
        "mamba2",
        16,
        16,
        source=f"{source}&num_eval=16&prepare=false",
        steps=2,
        batch_size=8,
        learning_rates=(1e-3,),
        seeds=(0,),
        eval_batch_size=8,
        progress=False,
    )
    return Job(
        key=key, config=config, evals={"K=2": EvalSpec(tags={"K": 2})}, tags={"model": "mamba2"}, analyze=analyze
    )


def test_runner_records_failures_and_retries_errors_only(tmp_path):
    calls = []

    def boom(trainer, params):
        calls.append(1)
        raise RuntimeError("analysis failed\nsecond line")

    def oom(trainer, params):
        raise MemoryError("RESOURCE_EXHAUSTED: out of memory")

    path = str(tmp_path / "r.json")
    jobs = [_tiny_job("ok", tmp_path), _tiny_job("err", tmp_path, boom), _tiny_job("oom", tmp_path, oom)]
    data = run_sweep("t", jobs, path, workdir=str(tmp_path / "w"), progress=False)
    assert {k: j["status"] for k, j in data["jobs"].items()} == {"ok": "done", "err": "error", "oom": "oom"}
    assert data["jobs"]["err"]["error"] == "RuntimeError: analysis failed"
    assert [r["job"] for r in data["rows"]] == ["ok"]
    assert load_results(path)["jobs"] == data["jobs"]
    # A rerun retries only the error (done and out-of-memory jobs are final).
    run_sweep("t", jobs, path, workdir=str(tmp_path / "w"), progress=False)
    assert len(calls) == 2
    with pytest.raises(ValueError, match=r"duplicate job keys \['ok'\]"):
        run_sweep("t", [jobs[0], jobs[0]], path, workdir=str(tmp_path / "w"), progress=False)


def test_a_preempted_job_stops_the_sweep_and_resumes(tmp_path, monkeypatch):
    """SIGTERM reaches the trainer of the running job, which saves and returns "preempted": the sweep must stop there
    (before, it recorded an error and went on to the next job, so a timed-out sweep never ended)."""
    from hybrid_jax.experiments import runner

    real_run = runner.Trainer.run
    started = []

    def preempted_run(self):
        started.append(self.workdir)
        return {"status": "preempted", "step": 0, "eval": None, "sample": None}

    path = str(tmp_path / "r.json")
    jobs = [_tiny_job("first", tmp_path), _tiny_job("second", tmp_path)]
    monkeypatch.setattr(runner.Trainer, "run", preempted_run)
    data = run_sweep("t", jobs, path, workdir=str(tmp_path / "w"), progress=False)
    assert len(started) == 1
    assert {k: j["status"] for k, j in data["jobs"].items()} == {"first": "preempted"}
    assert "stopped early (preempted) at step 0" in data["jobs"]["first"]["error"]
    assert load_results(path)["jobs"] == data["jobs"]
    # The rerun (no signal this time) runs both jobs to the end.
    monkeypatch.setattr(runner.Trainer, "run", real_run)
    data = run_sweep("t", jobs, path, workdir=str(tmp_path / "w"), progress=False)
    assert {k: j["status"] for k, j in data["jobs"].items()} == {"first": "done", "second": "done"}
    assert sorted({r["job"] for r in data["rows"]}) == ["first", "second"]


def test_merge_results_takes_final_jobs_with_their_rows(tmp_path):
    from hybrid_jax.experiments import merge_results
    from hybrid_jax.experiments.runner import RESULTS_VERSION

    def results(name, jobs, machine):
        data = {"version": RESULTS_VERSION, "experiment": "mqar", "machines": [machine], "jobs": {}, "rows": []}
        for key, status in jobs.items():
            data["jobs"][key] = {"status": status}
            if status == "done":
                data["rows"].append({"job": key, "accuracy": f"{name}-{key}"})
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        return str(path)

    a = results("a", {"x": "done", "y": "preempted", "w": "preempted"}, {"host": "1"})
    b = results("b", {"y": "done", "z": "error"}, {"host": "2"})
    c = results(
        "c", {"x": "preempted", "w": "preempted"}, {"host": "1"}
    )  # an unfinished copy never replaces a finished job
    for path, step in ((a, 900), (c, 200)):  # of two unfinished copies, the one that got further is kept
        data = json.loads(open(path).read())
        data["jobs"]["w"]["step"] = step
        open(path, "w").write(json.dumps(data))
    target = str(tmp_path / "full.json")
    data = merge_results(target, [a, b, c])
    assert {k: j["status"] for k, j in data["jobs"].items()} == {
        "x": "done",
        "y": "done",
        "z": "error",
        "w": "preempted",
    }
    assert data["jobs"]["w"]["step"] == 900
    assert sorted(r["accuracy"] for r in data["rows"]) == ["a-x", "b-y"]
    assert data["machines"] == [{"host": "1"}, {"host": "2"}]
    assert load_results(target) == data
    with pytest.raises(ValueError, match="no results file"):
        merge_results(target, [str(tmp_path / "missing.json")])
    other = json.loads(open(a).read())
    other["experiment"] = "joint_recall"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="holds experiment 'joint_recall', not 'mqar'"):
        merge_results(target, [str(tmp_path / "other.json")])


def test_cli_merge_reports_and_rejects_a_missing_part(tmp_path, capsys):
    module = _experiment("mqar")
    with pytest.raises(SystemExit):
        module.main(module.EXPERIMENT, ["--size=tiny", f"--out={tmp_path}", f"--merge={tmp_path}/none.json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"experiments/mqar/run.py: error: --merge: merge_results: no results file {tmp_path}/none.json"]


def test_an_evaluation_batch_size_changes_the_batches_not_the_metrics(tmp_path):
    """EvalSpec.batch_size (fewer rows at long lengths): the same 16 test rows in batches of 8 or 2 give the same
    loss and accuracy; a batch size below 1 is refused."""
    from hybrid_jax.training import Trainer

    config = _tiny_job("eval", tmp_path).config
    trainer = Trainer(config, str(tmp_path / "w"))
    trainer.run()
    params = trainer.final_state.params
    source = "mqar?seq_len=16&num_kv_pairs=2&vocab_size=32&num_eval=16&prepare=false"
    with trainer.context():
        by8 = trainer.evaluate(params, trainer.eval_batches_for(source, max_batches=0))
        small = trainer.eval_batches_for(source, max_batches=0, batch_size=2)
        assert [b["inputs"].shape[0] for b in small] == [2] * 8
        by2 = trainer.evaluate(params, trainer.eval_batches_for(source, max_batches=0, batch_size=2))
    (by8,), (by2,) = by8, by2  # a population of one member
    assert by8["eval_tokens"] == by2["eval_tokens"] == 32
    assert by2["loss"] == pytest.approx(by8["loss"], rel=1e-5)
    assert by2["accuracy"] == by8["accuracy"]
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        trainer.eval_batches_for(source, batch_size=0)
