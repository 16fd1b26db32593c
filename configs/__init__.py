"""The run configs, one module per preset or experiment family, importable from an installed package.

    python -m hybrid_jax.train --config=configs/taipan.py:size=tiny --workdir=/tmp/taipan   # from a checkout

    import configs
    config = configs.get("taipan", "size=tiny,capacity=0.15")   # anywhere hybrid_jax is installed

Each module's ``get_config(arg)`` takes the same ``key=value,...`` knobs as on the command line.
"""

from __future__ import annotations

import importlib
import pkgutil

NAMES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def get(name: str, arg: str | None = None):
    """The ConfigDict of ``configs/<name>.py`` with knobs ``arg`` (``"size=tiny,capacity=0.15"``).

    Raises:
      ValueError: ``name`` is not one of :data:`NAMES`.
    """
    if name not in NAMES:
        raise ValueError(f"configs.get: name={name!r} is not one of {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}").get_config(arg)
