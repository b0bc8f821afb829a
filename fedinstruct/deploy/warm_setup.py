"""Preparing the warm app server's process to fork tasks from: pre-imports, threads, logging.

- The app's dependencies (torch, transformers, peft, ...) are imported once here and shared
  copy-on-write by every forked task; the app's own modules are dropped again, so that each
  task imports the app from the FAB that Flower installed for its run (the submitted code, not
  the code pre-imported here).
- The server runs math libraries single-threaded: OpenMP's thread pool does not survive a
  fork (a child forked after a multi-threaded op hangs in its first one). Each child gets its
  thread count back (`single_threaded`'s return value) before it runs.

The server itself is `fedinstruct.deploy.warm`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import sys
import time
from collections.abc import Sequence

log = logging.getLogger("fedinstruct.deploy")


def warm_up(app_modules: Sequence[str], preload: Sequence[str] = ()) -> None:
    """Import the app modules and `preload`; then drop the app's own packages again.

    What the app modules import (torch, transformers, ...) stays loaded; the app's top-level
    packages are dropped, so that each child imports them from the run's FAB. A failed import
    is logged, not fatal: the children then import it themselves and report the error.
    """
    for module in [*preload, *app_modules]:
        start = time.perf_counter()
        try:
            importlib.import_module(module)
            log.info("pre-imported %s in %.1f s", module, time.perf_counter() - start)
        except Exception:
            log.exception("could not pre-import %s; children will import it themselves", module)
    drop_app_modules(app_modules)


def drop_app_modules(app_modules: Sequence[str]) -> None:
    """Forget the app's own packages, so that each child imports them from the run's FAB."""
    for package in {module.split(".")[0] for module in app_modules}:
        own = [name for name in sys.modules if name == package or name.startswith(package + ".")]
        for name in own:
            del sys.modules[name]
        log.info("dropped the %d modules of %s (children import it from the run's FAB)",
                 len(own), package)
    gc.collect()
    gc.freeze()  # keep the garbage collector from touching (and copying) the shared pages


def single_threaded() -> int:
    """Make this process's math libraries single-threaded; return the children's count."""
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0)
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        threads = threads or torch.get_num_threads()
        torch.set_num_threads(1)
    with contextlib.suppress(ImportError):
        from tqdm import tqdm

        tqdm.monitor_interval = 0  # no monitor thread: forking must not copy a held lock
    return threads or (os.cpu_count() or 1)


def log_to_stdout() -> None:
    """The server's log lines on stdout (its own format, not propagated)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s warm %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
