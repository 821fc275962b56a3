"""A server that cannot start exits non-zero with the reason; a worker never outlives it.

BentoML restarts a worker whose start-up raised, again and again, and ``/readyz`` never
answers 200. Instead, a worker that cannot start (its model does not load, a start-up
adapter cannot be served) writes the reason, one line, to the file named by
``OPENLLM_CLONE_FATAL_FILE`` and waits; the process that started the workers
(``openllm-clone start``, or ``bentoml serve`` of a bento) watches that file, prints the
reason, stops the workers and exits with status 1.

And every worker asks the kernel for SIGKILL when the process that started it dies
(``PR_SET_PDEATHSIG``), so a ``start`` killed with SIGKILL (an OOM kill, a supervisor's
last resort) leaves no worker behind holding its port and its model.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import tempfile
import threading
import time

from openllm_clone.errors import OpenLLMCloneError
from openllm_clone.settings import FATAL_FILE_ENV

__all__ = ["die_with_parent", "one_line", "report_fatal", "watch_for_fatal_errors"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def one_line(exc: BaseException) -> str:
    """The reason of ``exc`` on one line (our errors' message; else the type and text)."""
    reason = exc.message if isinstance(exc, OpenLLMCloneError) else f"{type(exc).__name__}: {exc}"
    return " ".join(reason.split())


def report_fatal(reason: str) -> None:
    """Tell the process that started this worker (which watches the file) why it cannot
    start; nothing to do when nobody watches (an in-process server)."""
    path = os.environ.get(FATAL_FILE_ENV)
    if path:
        with open(path, "a") as fh:
            fh.write(reason.replace("\n", " ") + "\n")


def watch_for_fatal_errors(announce: str = "error: ") -> str:
    """In the process that starts the workers: name a fatal file for them (through the
    environment they inherit) and watch it from a thread; the first reason written ends
    this process and its children, status 1. Returns the file's path (removed at exit)."""
    fd, path = tempfile.mkstemp(prefix="openllm-clone-fatal-")
    os.close(fd)
    os.environ[FATAL_FILE_ENV] = path
    atexit.register(_remove, path)

    def watch() -> None:
        while True:
            time.sleep(0.2)
            try:
                with open(path) as fh:
                    reason = fh.readline().strip()
            except OSError:
                continue
            if reason:
                break
        print(f"{announce}{reason}", file=sys.stderr, flush=True)
        stop_children()
        _remove(path)
        os._exit(1)

    threading.Thread(target=watch, name="openllm-clone-fatal-watch", daemon=True).start()
    return path


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def stop_children(timeout: float = 10.0) -> None:
    """SIGTERM every descendant of this process, SIGKILL what is left after ``timeout``."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; elsewhere nothing), and end now if
    the parent is already gone (it died before the request reached the kernel)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
