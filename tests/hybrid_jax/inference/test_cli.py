"""``python -m hybrid_jax.generate``: from a fresh training run, from a converted Hugging Face Mamba directory, and
one-line errors for bad input. The CLI's ``main`` runs in-process (its flags live in their own FlagValues); one
subprocess checks the module entry point and its exit status."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hybrid_jax.cli.generate import UsageError, main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _train(path):
    """A tiny Taipan trained for 2 steps on the standard-library text (byte tokenizer), by the training CLI."""
    args = [
        sys.executable, "-m", "hybrid_jax.train", "--config=configs/taipan.py:size=tiny", f"--workdir={path}",
        "--config.model.period=('mamba2','sal','mlp')", "--config.model.n_periods=1",
        "--config.data.seq_len=32", "--config.data.batch_size=2", "--config.train.steps=2",
        "--config.train.eval_every=0", "--config.eval.batch_size=2", "--config.eval.max_batches=1",
        "--config.eval.sample_tokens=0", "--config.logging.progress_bar=False",
    ]  # fmt: skip
    subprocess.run(args, cwd=REPO, check=True, capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run directory as the trainer writes it (config.json, an orbax checkpoint), with random parameters: the
    error tests need a loadable run, not a trained one."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from hybrid_jax.model import LanguageModel, preset
    from hybrid_jax.training.checkpoint import Checkpointer

    path = str(tmp_path_factory.mktemp("fake_run"))
    cfg = preset("transformer", "tiny", vocab_size=384)
    init = jax.jit(LanguageModel(cfg).init)
    params = nn.unbox(init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    ckpt = Checkpointer(os.path.join(path, "checkpoints"))
    ckpt.save(1, {"params": params}, {})
    ckpt.close()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"config": {"data": {"source": "stdlib"}}, "model_config": cfg.to_dict()}, f)
    return path


def _run(*args):
    out = io.StringIO()
    assert main(["generate", *args], out=out) == 0
    return out.getvalue()


@pytest.mark.slow  # ~50 s on 2 CPU cores: a training run and two CLI processes
def test_generates_from_a_fresh_training_run_as_the_library_does(tmp_path):
    from hybrid_jax.cli.generate import load_workdir
    from hybrid_jax.inference import generate

    run = str(tmp_path / "run")
    _train(run)
    text = _run(f"--workdir={run}", "--prompt=def f(x):", "--max_new_tokens=6", "--stop=")
    model, params, tok = load_workdir(run)
    ids = np.asarray(generate(model, params, [list(tok.encode("def f(x):"))], 6))[0]
    assert text == tok.decode([int(i) for i in ids]).rstrip("\ufffd") + "\n"
    sampled = _run(f"--workdir={run}", "--prompt_ids=100,101,102", "--max_new_tokens=4", "--temperature=0.8")
    assert sampled.endswith("\n")
    # The module entry point: streams to stdout, exits 0; bad input: status 1 and one line on stderr.
    cmd = [sys.executable, "-m", "hybrid_jax.generate", f"--workdir={run}", "--prompt_ids=1,2,3"]
    ok = subprocess.run([*cmd, "--max_new_tokens=3"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*cmd, "--top_p=2"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == "error: stream: top_p=2.0 must be in (0, 1] (or None)"


@pytest.mark.parametrize(
    "args, match",
    [
        ([], r"exactly one of --workdir=DIR or --hf_checkpoint=DIR"),
        (["--workdir=/nonexistent/run", "--prompt=x"], r"--workdir=/nonexistent/run is not a directory"),
        (["--hf_checkpoint=/nonexistent/hf", "--prompt=x"], r"--hf_checkpoint=/nonexistent/hf is not a directory"),
        (["--workdir={empty}", "--prompt=x"], r"has no config.json"),
        (["--workdir={run}"], r"exactly one of --prompt=TEXT or --prompt_ids"),
        (["--workdir={run}", "--prompt="], r"--prompt is empty"),
        (["--workdir={run}", "--prompt_ids="], r"--prompt_ids is empty"),
        (["--workdir={run}", "--prompt_ids=1,x"], r"must be comma-separated integers"),
        (["--workdir={run}", "--prompt_ids=1,999"], r"token id 999 outside the vocabulary \[0, 384\)"),
        (["--workdir={run}", "--prompt_ids=1,2", "--max_new_tokens=4", "--max_len=4"], r"max_len=4 is too short"),
        (["--workdir={run}", "--prompt=hi", "--temperature=-1"], r"temperature=-1.0 must be >= 0"),
        (["--workdir={run}", "--prompt=hi", "--top_k=0"], r"top_k=0 must be an integer >= 1"),
        (["--workdir={run}", "--prompt=hi", "--max_new_tokens=0"], r"max_new_tokens=0 must be an integer >= 1"),
        (["--workdir={run}", "--prompt=hi", "--stop=x"], r"--stop='x' must list token ids or 'eos'"),
        (["--workdir={run}", "--prompt=hi", "--bogus=1"], r"bogus"),
    ],
)
def test_bad_input_gives_one_line_error(workdir, tmp_path, args, match):
    args = [a.format(run=workdir, empty=tmp_path) for a in args]
    with pytest.raises(ValueError, match=match) as e:
        main(["generate", *args], out=io.StringIO())
    assert "\n" not in str(e.value)


def test_a_prompt_past_max_len_is_refused(workdir):
    with pytest.raises(ValueError, match=r"the prompt \(3 tokens\) is longer than max_len=2"):
        main(["generate", f"--workdir={workdir}", "--prompt_ids=1,2,3", "--max_len=2"], out=io.StringIO())


@pytest.mark.hf
def test_generates_from_a_converted_hf_mamba_as_transformers_does(tmp_path):
    torch = pytest.importorskip("torch", reason="needs the [hf] extra")
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(
        vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4, time_step_rank=4
    )
    hf = transformers.MambaForCausalLM(cfg).eval()
    path = str(tmp_path / "mamba")
    hf.save_pretrained(path)
    prompt = [5, 17, 3, 60, 2]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None)
    expected = [int(t) for t in ref[0, len(prompt) :]]
    text = _run(f"--hf_checkpoint={path}", "--prompt_ids=" + ",".join(map(str, prompt)), "--max_new_tokens=6")
    assert [int(t) for t in text.split()] == expected
    with pytest.raises(UsageError, match=r"no tokenizer"):
        main(["generate", f"--hf_checkpoint={path}", "--prompt=hello"], out=io.StringIO())
