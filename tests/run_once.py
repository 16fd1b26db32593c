"""One computation per test run for an expensive module fixture, also under pytest-xdist.

A module-scoped fixture runs once in every xdist worker that gets one of the module's tests: the subprocess checks of
sequence parallelism (20-75 s each on 2 CPU cores) ran twice whenever the scheduler split a module between the two
workers. ``once_per_run`` lets the first worker compute the (JSON) result and the others wait for it and read it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: every worker computes its own
    fcntl = None


def once_per_run(tmp_path_factory, name: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, a JSON-serialisable value, computed by one worker of this run and read back by the others.

    Without xdist (or without ``fcntl``) it is simply ``compute()``. A worker whose ``compute()`` raises writes
    nothing, so the next worker to ask computes (and fails) itself.
    """
    if fcntl is None or not os.environ.get("PYTEST_XDIST_WORKER"):
        return compute()
    root = tmp_path_factory.getbasetemp().parent  # the workers' base directories share this parent
    path = root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.is_file():
            path.write_text(json.dumps(compute()))
        return json.loads(path.read_text())
