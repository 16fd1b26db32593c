"""Fixtures of the data tests: a small text directory and a session-wide TFDS data_dir."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One TFDS data_dir for the session, so each dataset is prepared once."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
    """Twelve text files of up to ~3 kB (one not UTF-8, some in a subdirectory), files to skip."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "pass", "def", "return", "\n", "    ", "é", "漢"]
    for i in range(11):
        n = int(rng.integers(0, 600))
        text = " ".join(words[j] for j in rng.integers(len(words), size=n))
        sub = root / ("sub" if i % 4 == 0 else "")
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    (root / "latin1.txt").write_bytes(b"caf\xe9 cr\xe8me\n" * 20)  # not UTF-8: bytes pass through
    (root / "skip.bin").write_bytes(b"\x00\x01")  # no matching pattern
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("never read")  # hidden directories are pruned
    return str(root)
