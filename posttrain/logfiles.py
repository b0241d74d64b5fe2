"""Console vs log files when posttrain runs without a terminal (nohup, Slurm, ``ray job logs``, CI).

Off a terminal the console carries posttrain's own lines only: the run directory, the resume
line, one line per step, the summary, and errors. Everything the libraries say goes to
``<run_dir>/logs/``:

- ``libraries.log``: every log record of a logger outside ``posttrain`` (vLLM, Ray, transformers,
  torch, wandb, ...) and Python warnings, with time and logger name;
- ``ray``: a link to the Ray session's log directory, where the actors' stdout and stderr go (the
  driver does not echo them: ``log_to_driver`` is off);

and progress bars (tqdm), colour codes and wandb's banner are switched off by their own
environment variables, set before those libraries are imported. On a terminal, or with
``logging.verbose: true``, nothing changes.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

LOG_DIR_ENV = "POSTTRAIN_LOG_DIR"  # set while a run routes its logs: start_ray reads it
# Read by each library at import (tqdm, huggingface_hub, vLLM, wandb) or when it prints (NO_COLOR).
QUIET_CONSOLE_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "NO_COLOR": "1",
    "VLLM_CONFIGURE_LOGGING": "0",  # vLLM's own colour handler on stdout: records go to the root logger instead
    "WANDB_SILENT": "true",
    "RAY_COLOR_PREFIX": "0",
}
OWN = ("posttrain", "__main__")


def off_terminal() -> bool:
    return not sys.stdout.isatty()


def quiet_console_env() -> None:
    """Switch off progress bars, colours and banners off a terminal (a value the user set stays).
    Call before transformers, vLLM or wandb are imported."""
    if off_terminal():
        for key, value in QUIET_CONSOLE_ENV.items():
            os.environ.setdefault(key, value)


def _own(record: logging.LogRecord) -> bool:
    return record.name.split(".", 1)[0] in OWN


class _OwnLinesOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _own(record)


class _LibraryLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _own(record)


class _LibraryFile(logging.FileHandler):
    """The handler ``route_library_logs`` adds (found again by type, to be removed)."""


def _console_handlers() -> list[logging.Handler]:
    streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return [h for h in logging.getLogger().handlers
            if type(h) is logging.StreamHandler and getattr(h, "stream", None) in streams]


def route_library_logs(run_dir: str) -> Callable[[], None]:
    """Off a terminal: library log records and warnings go to ``<run_dir>/logs/libraries.log``,
    the console keeps posttrain's own; returns the function that undoes it. On a terminal: a no-op."""
    if not off_terminal():
        return lambda: None
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _LibraryFile)]:  # an earlier run in this process
        root.removeHandler(old)
        old.close()
    logs = os.path.join(run_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    file_handler = _LibraryFile(os.path.join(logs, "libraries.log"))
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.addFilter(_LibraryLines())
    root.addHandler(file_handler)
    own_only = _OwnLinesOnly()
    console = _console_handlers()
    for handler in console:
        handler.addFilter(own_only)
    logging.captureWarnings(True)  # warnings.warn(...) -> the "py.warnings" logger -> the file
    os.environ[LOG_DIR_ENV] = logs

    def undo() -> None:
        root.removeHandler(file_handler)
        file_handler.close()
        for handler in console:
            handler.removeFilter(own_only)
        logging.captureWarnings(False)
        os.environ.pop(LOG_DIR_ENV, None)

    return undo


def adopt_library_handlers(names: tuple[str, ...] = ("ray",)) -> None:
    """While a run routes its logs: libraries that print through a console handler of their own
    (Ray installs one on the ``ray`` logger at import) lose it and propagate to the root logger,
    whose file handler takes their records. Call after importing them."""
    if not os.environ.get(LOG_DIR_ENV):
        return
    streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    for name in names:
        lib = logging.getLogger(name)
        for handler in [h for h in lib.handlers if isinstance(h, logging.StreamHandler)
                        and not isinstance(h, logging.FileHandler) and getattr(h, "stream", None) in streams]:
            lib.removeHandler(handler)
        lib.propagate = True


def link_ray_logs(session_logs: str) -> None:
    """Point ``<run_dir>/logs/ray`` at the Ray session's logs (the actors' output) while a run routes
    its logs; nothing otherwise."""
    logs = os.environ.get(LOG_DIR_ENV)
    if not logs or not os.path.isdir(session_logs):
        return
    link = os.path.join(logs, "ray")
    try:
        if os.path.islink(link):
            os.unlink(link)
        os.symlink(session_logs, link)
    except OSError:
        pass  # a filesystem without links: the path is in Ray's usual place all the same
