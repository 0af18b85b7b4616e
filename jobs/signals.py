"""Interrupts of a command: SIGTERM raises ``Terminated`` in the main thread, as Ctrl-C raises
KeyboardInterrupt, so that a run unwinds (stops submitting, releases its lease) and the CLI
exits with one line. Its own module: ``python -m jobs.cli`` runs the CLI as ``__main__``, and
the class must be one and the same for the code that raises and the code that catches."""

from __future__ import annotations

import signal
import threading

# the shell's 128 + signal number
INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Terminated(BaseException):
    """SIGTERM was received: unwind like KeyboardInterrupt, exit 143."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def terminate_on_sigterm() -> None:
    """SIGTERM raises Terminated in the main thread (ray.init replaces this handler: call again)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
