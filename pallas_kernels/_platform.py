"""The op registry: one :class:`Op` per kernel op, and the one place that turns ``implementation="auto"`` into a name.

Every op's ``api.py`` registers an :class:`Op`: its name, its implementations by name (callables with one signature
per op, so dispatch is a dictionary lookup), and its ``auto`` preferences per platform (and, where the input dtype
matters, per dtype). The public function of the op validates its arguments, then calls :meth:`Op.resolve` once and
:meth:`Op.run` with the result. ``resolve`` is the only place ``"auto"`` becomes a name: the first preference the op
has on this platform, logged once per op, platform and choice. An explicit request that cannot run raises and never
falls back, so a benchmark or a test always measures what it asked for. ``run`` calls the implementation and tells any
active :func:`recording` what ran, with the implementation's own sub-choices (the GPU sliding-window forward: Mosaic
GPU or Triton), which is how a trainer records what its compiled step dispatched to.

The model (``hybrid_jax.model.kernel_call``), the trainer and the run record reach this module through the package's
public names (``pallas_kernels.get_op``, ``ops``, ``resolve_implementation``, ``recording``, ``describe``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "reference", "xla", "pallas_gpu", "pallas_tpu")
PLATFORMS = ("cpu", "gpu", "tpu")
# The platform a Pallas implementation compiles for (elsewhere it runs only in interpret mode).
KERNEL_PLATFORM = types.MappingProxyType({"pallas_gpu": "gpu", "pallas_tpu": "tpu"})

_log = logging.getLogger("pallas_kernels")
_logged: set[tuple[str, str, str]] = set()


def platform() -> str:
    """The default backend's platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
    backend = jax.default_backend()
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def _frozen(table: Mapping[str, Sequence[str]]) -> Mapping[str, tuple[str, ...]]:
    return types.MappingProxyType({k: tuple(v) for k, v in table.items()})


@dataclasses.dataclass(frozen=True, eq=False)
class Op:
    """One kernel op: its implementations and how ``"auto"`` picks among them.

    Attributes:
      name: the op's name, also its sub-package (``pallas_kernels.<name>``) and its ``KernelConfig`` field.
      implementations: name (one of ``IMPLEMENTATIONS`` but ``"auto"``) -> callable; every callable of an op takes the
        same (already validated) arguments, so the public function dispatches by lookup.
      auto: platform -> preference order for ``"auto"`` (every name registered; the first is chosen, the rest say
        what would come next). Platforms without an entry take ``"xla"``.
      auto_float32: overrides of ``auto`` for float32 inputs, per platform.
      details: implementation name -> function of the implementation's arguments returning ``{choice: value}``, the
        sub-choices it makes by itself (recorded with each dispatch; e.g. which forward kernel runs).
    """

    name: str
    implementations: Mapping[str, Callable[..., Any]]
    auto: Mapping[str, Sequence[str]]
    auto_float32: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    details: Mapping[str, Callable[..., Mapping[str, str]]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "implementations", types.MappingProxyType(dict(self.implementations)))
        object.__setattr__(self, "auto", _frozen(self.auto))
        object.__setattr__(self, "auto_float32", _frozen(self.auto_float32))
        object.__setattr__(self, "details", types.MappingProxyType(dict(self.details)))
        names = tuple(self.implementations)
        if "auto" in names or not set(names) <= set(IMPLEMENTATIONS):
            raise ValueError(f"{self.name}: implementations {names} must be among {IMPLEMENTATIONS[1:]}")
        if "xla" not in names:
            raise ValueError(f"{self.name}: every op has an 'xla' implementation (the fallback of 'auto')")
        for table in (self.auto, self.auto_float32):
            for where, prefs in table.items():
                if where not in PLATFORMS or not prefs or not set(prefs) <= set(names):
                    raise ValueError(f"{self.name}: auto[{where!r}]={prefs} must name implementations of {names}")
        if not set(self.details) <= set(names):
            raise ValueError(f"{self.name}: details for {tuple(self.details)}, implementations are {names}")

    @property
    def available(self) -> tuple[str, ...]:
        """The names of the implementations, in registration order."""
        return tuple(self.implementations)

    def auto_choice(self, dtype=None, *, where: str | None = None) -> str:
        """What ``"auto"`` picks on platform ``where`` (default: this one) for inputs of ``dtype`` (None: the 16-bit
        rules)."""
        where = platform() if where is None else where
        prefs = self.auto.get(where, ("xla",))
        if dtype is not None and jnp.dtype(dtype) == jnp.float32:
            prefs = self.auto_float32.get(where, prefs)
        return prefs[0]

    def resolve(self, implementation: str = "auto", *, interpret=False, dtype=None) -> str:
        """The name of the implementation a call with ``implementation=`` will run.

        Args:
          implementation: what the caller asked for, one of ``IMPLEMENTATIONS``.
          interpret: whether a Pallas kernel will run in interpret mode (then it can run on any platform).
          dtype: the dtype of the op's main input, where ``"auto"`` depends on it (``auto_float32``).

        Raises:
          ValueError: ``implementation`` is not a known name.
          NotImplementedError: the op has no such implementation.
          RuntimeError: a Pallas kernel was asked for on a platform it cannot compile for.
        """
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"{self.name}: implementation={implementation!r} is not one of {IMPLEMENTATIONS}")
        here = platform()
        if implementation == "auto":
            choice = self.auto_choice(dtype, where=here)
            if (self.name, here, choice) not in _logged:
                _logged.add((self.name, here, choice))
                _log.info(
                    "pallas_kernels.%s: implementation='auto' chose %r on %s (dtype %s)", self.name, choice, here, dtype
                )
            return choice
        if implementation not in self.implementations:
            raise NotImplementedError(
                f"{self.name}: implementation={implementation!r} is not available (this op has {self.available})"
            )
        wanted = KERNEL_PLATFORM.get(implementation)
        if wanted is not None and not interpret and here != wanted:
            raise RuntimeError(
                f"{self.name}: implementation={implementation!r} needs a {wanted.upper()} but the default backend is "
                f"{here!r}; pass interpret=True to run the kernel in Pallas interpret mode"
            )
        return implementation

    def run(self, implementation: str, /, *args, **kwargs):
        """Calls the implementation named ``implementation`` (a name :meth:`resolve` returned) and records the call."""
        fn = self.implementations[implementation]
        if _recorders:
            detail = self.details.get(implementation)
            found = () if detail is None else tuple(sorted(detail(*args, **kwargs).items()))
            for ran in _recorders:
                ran.append(Dispatch(self.name, implementation, found))
        return fn(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """One call of an op, as :func:`recording` saw it: the implementation that ran and its own sub-choices."""

    op: str
    implementation: str
    details: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        if not self.details:
            return self.implementation
        return f"{self.implementation}[{','.join(f'{k}={v}' for k, v in self.details)}]"


_OPS: dict[str, Op] = {}
_recorders: list[list[Dispatch]] = []


def register(op: Op) -> Op:
    """Adds ``op`` to the registry (replacing an earlier op of the same name, as a module reload does)."""
    _OPS[op.name] = op
    return op


def get(name: str) -> Op:
    """The registered op called ``name``; a ValueError lists the registered ones."""
    try:
        return _OPS[name]
    except KeyError:
        raise ValueError(f"pallas_kernels: no op {name!r} (registered: {tuple(_OPS)})") from None


def ops() -> tuple[Op, ...]:
    """Every registered op, in registration order."""
    return tuple(_OPS.values())


@contextlib.contextmanager
def recording() -> Iterator[list[Dispatch]]:
    """Collects a :class:`Dispatch` for every op call made (traced) inside the ``with`` block.

    Ops dispatch while a function is traced, so wrap the ``jit(...).lower`` / first call of the function whose
    kernels you want to know; a function that jax finds in its cache is not traced again and records nothing.
    """
    ran: list[Dispatch] = []
    _recorders.append(ran)
    try:
        yield ran
    finally:
        _recorders.remove(ran)


def describe(dispatches: Sequence[Dispatch]) -> dict[str, str]:
    """``{op: what ran}`` for a run record: ``"pallas_gpu"``, ``"pallas_gpu[forward=mosaic]"``, or the distinct
    entries joined by ``", "`` when calls of one op differed."""
    seen: dict[str, list[str]] = {}
    for d in dispatches:
        entries = seen.setdefault(d.op, [])
        if str(d) not in entries:
            entries.append(str(d))
    return {op: ", ".join(entries) for op, entries in seen.items()}


# --- the name-based functions of the first version of this module, kept for callers that have only an op name


def resolve(op: str, implementation: str, *, available: Sequence[str], interpret: bool = False, dtype=None) -> str:
    """``get(op).resolve(...)``; ``available`` must be the op's implementations."""
    registered = get(op)
    if set(available) != set(registered.available):
        raise ValueError(f"{op}: available={tuple(available)} but the op has {registered.available}")
    return registered.resolve(implementation, interpret=interpret, dtype=dtype)


def chosen(dtype=None) -> dict[str, str]:
    """What ``"auto"`` picks for every registered op on this platform for inputs of ``dtype``."""
    return {op.name: op.auto_choice(dtype) for op in ops()}


class _AutoTable(Mapping):
    """Read-only view ``{op name: {platform: preferences}}`` of the registered ops (``_AUTO`` before the registry)."""

    def __getitem__(self, name):
        return _OPS[name].auto

    def __iter__(self):
        return iter(_OPS)

    def __len__(self):
        return len(_OPS)


_AUTO = _AutoTable()
