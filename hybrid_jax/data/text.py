"""Text corpora from a directory of files; by default the Python standard library's own sources.

The default corpus needs no download: every machine with Python has it
(``sysconfig.get_paths()["stdlib"]``). It is the ``*.py`` files there without ``site-packages``
(what a user installed, different on every machine), test suites and build configuration: about 730
files and 12 MB for CPython 3.11, listed, hashed and prepared in about a second. It differs between
Python versions, so runs compare only within one version (the corpus fingerprint names it). Files
are listed in sorted order of their relative paths and assigned to the ``train`` or ``validation``
split by a hash of that path, so the split of a file never changes when other files come or go.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import pathlib
import sys
import sysconfig
from collections.abc import Iterator

from hybrid_jax.data import _validate
from hybrid_jax.data.errors import DataNotFoundError

TEXT_SPLITS = ("train", "validation")
STDLIB_INCLUDE = ("*.py",)
# site-packages holds what a user installed; tests and build configuration are not the library.
STDLIB_EXCLUDE_DIRS = (
    "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "config-*", ".*",
)  # fmt: skip
STDLIB_EXCLUDE_FILES = ("_sysconfigdata*",)
DIRECTORY_INCLUDE = ("*.txt", "*.md", "*.rst", "*.py")
DIRECTORY_EXCLUDE_DIRS = (".*", "__pycache__")


def stdlib_root() -> str:
    """The directory of the standard library's Python sources."""
    return sysconfig.get_paths()["stdlib"]


def _unit_hash(relpath: str) -> float:
    digest = hashlib.sha1(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(relpath: str, validation_fraction: float) -> str:
    """``"validation"`` for a stable ``validation_fraction`` of paths (SHA-1), else ``"train"``."""
    return "validation" if _unit_hash(relpath) < validation_fraction else "train"


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """The files under ``root`` matching ``include``, split into train / validation by path hash.

    Attributes:
      root: directory to read (``None``: the standard library, :func:`stdlib_root`).
      include: file-name patterns (fnmatch on the base name); ``None`` picks ``STDLIB_INCLUDE`` or
        ``DIRECTORY_INCLUDE``.
      exclude_dirs: directory-name patterns pruned anywhere in the tree; ``None`` picks the default
        for the root.
      exclude_files: file-name patterns to skip; ``None`` picks the default for the root.
      validation_fraction: expected share of files in the validation split (default 0.05).
    """

    root: str | None = None
    include: tuple[str, ...] | None = None
    exclude_dirs: tuple[str, ...] | None = None
    exclude_files: tuple[str, ...] | None = None
    validation_fraction: float = 0.05

    def __post_init__(self):
        _validate.number("TextCorpus", "validation_fraction", self.validation_fraction, low=0.0, high=1.0)
        for name in ("include", "exclude_dirs", "exclude_files"):
            value = getattr(self, name)
            if isinstance(value, str):  # a lone pattern, not its characters
                object.__setattr__(self, name, (value,))
            elif value is not None:
                object.__setattr__(self, name, tuple(value))

    @property
    def is_stdlib(self) -> bool:
        return self.root is None

    @property
    def directory(self) -> pathlib.Path:
        return pathlib.Path(stdlib_root() if self.root is None else os.path.expanduser(self.root)).resolve()

    def _patterns(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        std = self.is_stdlib
        include = self.include or (STDLIB_INCLUDE if std else DIRECTORY_INCLUDE)
        dirs = (
            self.exclude_dirs
            if self.exclude_dirs is not None
            else (STDLIB_EXCLUDE_DIRS if std else DIRECTORY_EXCLUDE_DIRS)
        )
        files = self.exclude_files if self.exclude_files is not None else (STDLIB_EXCLUDE_FILES if std else ())
        return include, dirs, files

    def all_files(self) -> list[str]:
        """Relative POSIX paths of every matching file, sorted.

        Raises:
          DataNotFoundError: the directory does not exist or holds no matching file.
        """
        root = self.directory
        if not root.is_dir():
            raise DataNotFoundError(f"text directory {str(root)!r} does not exist or is not a directory")
        include, exclude_dirs, exclude_files = self._patterns()
        found = []
        for here, dirs, files in os.walk(root):
            # Pruning in place keeps os.walk out of excluded trees (site-packages can be huge).
            dirs[:] = [d for d in dirs if not any(fnmatch.fnmatchcase(d, p) for p in exclude_dirs)]
            for f in files:
                if any(fnmatch.fnmatchcase(f, p) for p in include) and not any(
                    fnmatch.fnmatchcase(f, p) for p in exclude_files
                ):
                    path = pathlib.Path(here, f)
                    if path.is_file():
                        found.append(path.relative_to(root).as_posix())
        if not found:
            raise DataNotFoundError(f"no files matching {list(include)} under text directory {str(root)!r}")
        return sorted(found)

    def split_files(self) -> dict[str, list[str]]:
        """``{"train": [...], "validation": [...]}``, relative paths, sorted.

        A corpus of two or more files always has a validation file (the one with the smallest path
        hash) when ``validation_fraction > 0``, so tiny directories can still be evaluated on.
        """
        files = self.all_files()
        val = [p for p in files if split_of(p, self.validation_fraction) == "validation"]
        if not val and self.validation_fraction > 0 and len(files) >= 2:
            val = [min(files, key=_unit_hash)]
        chosen = set(val)
        return {"train": [p for p in files if p not in chosen], "validation": val}

    def files(self, split: str) -> list[str]:
        """Relative paths of the files in ``split`` (``"train"`` or ``"validation"``), sorted."""
        _validate.one_of("TextCorpus.files", "split", split, TEXT_SPLITS)
        return self.split_files()[split]

    def documents(self, split: str) -> Iterator[tuple[str, bytes]]:
        """Yields ``(relative path, file bytes)`` for the files of ``split`` in sorted order."""
        root = self.directory
        for rel in self.files(split):
            yield rel, (root / rel).read_bytes()

    def fingerprint(self) -> str:
        """A short hash of the file list and contents: the same corpus, the same name anywhere."""
        root = self.directory
        h = hashlib.sha1()
        h.update(repr((self._patterns(), self.validation_fraction)).encode())
        for rel in self.all_files():
            h.update(rel.encode("utf-8") + b"\0")
            h.update(hashlib.sha1((root / rel).read_bytes()).digest())
        return h.hexdigest()[:12]

    def describe(self) -> str:
        """One line naming the corpus (root, patterns, Python version for the standard library)."""
        include, _, _ = self._patterns()
        what = f"python{sys.version_info.major}.{sys.version_info.minor} stdlib" if self.is_stdlib else "directory"
        return f"{what} {str(self.directory)!r} {list(include)}"
