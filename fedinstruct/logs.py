"""One logging setup for the CLI, the ServerApp and the ClientApp processes, and a quiet
terminal: library noise is filtered unless `fedinstruct -v` (FEDINSTRUCT_VERBOSE=1) asks for
everything. Ray workers inherit the environment, so the setting reaches the clients too."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings

VERBOSE_ENV = "FEDINSTRUCT_VERBOSE"

# Known, harmless lines, filtered unless verbose (logger -> fragments of the messages dropped)
_NOISE = {
    # fedinstruct runs its simulation in-process on purpose (fedinstruct/simulation.py)
    "flwr": ("DEPRECATED FEATURE: The `run_simulation` function",
             # fedinstruct evaluates on the server (and eval.federated on the clients itself)
             "fraction_evaluate is set to 0.0"),
    # bitsandbytes' optional CPU kernels package; without it NF4 runs, only slower
    "bitsandbytes.backends.cpu.ops": ("No module named 'kernels'",),
}
_WARNINGS = (  # (message regex, category): import-time deprecation notes of dependencies
    (r"`torch\.jit\.script_method` is deprecated", DeprecationWarning),
    (r"Tip: In future versions of Ray, Ray will no longer override accelerator", FutureWarning),
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "False")


def set_verbose(on: bool) -> None:
    """Show everything in this process and in the processes it starts (Ray workers)."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


class _DropNoise(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__("fedinstruct-noise")
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose():
            return True
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def setup_logging(level: int = logging.INFO) -> None:
    """fedinstruct's own INFO lines (DEBUG when verbose); library chatter at WARNING, known
    noise filtered unless verbose."""
    logger = logging.getLogger("fedinstruct")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s fedinstruct %(levelname)s %(message)s", "%H:%M:%S")
        )
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose() else level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose() and not sys.stderr.isatty():  # a log, not a terminal: one line a refresh
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read on import
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
    _filter_noise()


def _filter_noise() -> None:
    """Before the libraries log it: a logger made now is the one they get on import."""
    for name, fragments in _NOISE.items():
        library = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in library.filters):
            library.addFilter(_DropNoise(fragments))
    if not verbose():
        for message, category in _WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)


def terminal_logging() -> None:
    """The `fedinstruct` command's terminal: each Flower line once, DEBUG lines only verbose.

    Hydra gives the root logger a handler of its own, and Flower's logger has one too and
    propagates: every Flower line printed twice, its DEBUG lines through Hydra's handler.
    """
    setup_logging()
    from flwr.supercore.logger import console_handler

    logging.getLogger("flwr").propagate = False
    console_handler.setLevel(logging.DEBUG if verbose() else logging.INFO)


def setup_ray_worker() -> None:
    """Ray's `worker_process_setup_hook` (fedinstruct/simulation.py): runs in each simulation
    worker before it imports the ClientApp, so the filters are in place before the libraries
    log, and no progress bars: Ray forwards each refresh of a bar as a line of its own."""
    # Flower's Ray transport shows every DeprecationWarning once, by a filter it puts first
    # when imported: import it first, so that the filters of setup_logging come before it.
    import flwr.simulation.ray_transport.utils  # noqa: F401

    setup_logging()
    if not verbose():
        _no_progress_bars()


def _no_progress_bars() -> None:
    from tqdm import std

    init = std.tqdm.__init__
    if getattr(init, "_fedinstruct_quiet", False):
        return

    @functools.wraps(init)
    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    quiet_init._fedinstruct_quiet = True  # type: ignore[attr-defined]
    std.tqdm.__init__ = quiet_init
