"""Fixtures of the training tests: one prepared copy of the standard-library corpus for the session."""

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data_dir holding the prepared standard-library text corpus (prepared once, ~2 s)."""
    from hybrid_jax.data import make_train_iterator

    path = str(tmp_path_factory.mktemp("training_data"))
    make_train_iterator("stdlib", seq_len=64, batch_size=8, data_dir=path, num_threads=0)
    return path
