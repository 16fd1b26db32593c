"""Text corpora: file selection, hash split, the standard-library default, clear errors."""

import pathlib

import pytest

from hybrid_jax.data import text
from hybrid_jax.data.errors import DataNotFoundError


def test_directory_corpus_lists_matching_files_sorted(text_dir):
    corpus = text.TextCorpus(text_dir)
    files = corpus.all_files()
    assert files == sorted(files) and len(files) == 12
    assert "latin1.txt" in files and "sub/doc00.txt" in files
    assert not any(f.startswith(".hidden") or f.endswith(".bin") for f in files)


def test_split_is_a_stable_partition_by_path_hash(text_dir):
    corpus = text.TextCorpus(text_dir, validation_fraction=0.3)
    parts = corpus.split_files()
    assert sorted(parts["train"] + parts["validation"]) == corpus.all_files()
    assert not set(parts["train"]) & set(parts["validation"])
    for path in parts["validation"]:
        assert text.split_of(path, 0.3) == "validation"  # decided by the path alone
    assert parts == text.TextCorpus(text_dir, validation_fraction=0.3).split_files()


def test_tiny_corpus_still_gets_a_validation_file(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(name)
    parts = text.TextCorpus(str(tmp_path), validation_fraction=0.01).split_files()
    assert len(parts["validation"]) == 1 and len(parts["train"]) == 1


def test_documents_are_the_file_bytes(text_dir):
    corpus = text.TextCorpus(text_dir)
    for rel, data in corpus.documents("train"):
        assert data == (pathlib.Path(text_dir) / rel).read_bytes()


def test_stdlib_corpus_is_the_library_sources_without_site_packages():
    corpus = text.TextCorpus()
    files = corpus.all_files()
    assert "os.py" in files and "json/decoder.py" in files
    assert not any("site-packages" in f or f.startswith("test/") for f in files)
    assert 300 < len(files) < 3000  # the whole library is listed, and in seconds, not minutes


def test_fingerprint_follows_contents(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    corpus = text.TextCorpus(str(tmp_path))
    before = corpus.fingerprint()
    assert before == text.TextCorpus(str(tmp_path)).fingerprint()
    (tmp_path / "a.txt").write_text("two")
    assert corpus.fingerprint() != before


def test_missing_directory_and_empty_match_are_clear_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="text directory '.*nope' does not exist"):
        text.TextCorpus(str(tmp_path / "nope")).all_files()
    with pytest.raises(DataNotFoundError, match=r"no files matching \['\*.xyz'\] under text directory"):
        text.TextCorpus(str(tmp_path), include=("*.xyz",)).all_files()
    with pytest.raises(ValueError, match=r"validation_fraction=2.0 must be in \[0.0, 1.0\]"):
        text.TextCorpus(validation_fraction=2.0)
