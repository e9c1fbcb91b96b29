"""SIGTERM (a preempted VM, a scheduler's stop) as a request to checkpoint and exit cleanly.

`install` is called by `mtl_jax.main` before its heavy imports, so that a SIGTERM in a run's
first seconds is also answered with a message and exit status 0 rather than a silent 143.
"""
import signal
import threading

_requested = threading.Event()
_installed = []


def install() -> None:
  """Turns SIGTERM into a request (idempotent; only possible on the main thread)."""
  if not _installed and threading.current_thread() is threading.main_thread():
    _installed.append(signal.signal(signal.SIGTERM, lambda *_: _requested.set()))


def uninstall() -> None:
  if _installed and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _installed.pop())


def requested() -> bool:
  return _requested.is_set()


def request() -> None:
  """Marks a stop as requested (multi-host: another process was preempted)."""
  _requested.set()


def clear() -> None:
  _requested.clear()
