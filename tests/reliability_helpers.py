"""Helpers of the reliability tests: `python -m mtl_jax.main` in a subprocess, and a counter of
XLA compilations.

`MainProcess` starts the command with stdout read line by line as it arrives (so a test can act
at a chosen step) and stderr written to a file (so a full pipe never blocks the run).
`CompileCounter` shows that a bad input is refused before anything is compiled.
"""
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_args(workdir, catalogue_dir, **overrides) -> list[str]:
  """Arguments of a tiny demo run on a pre-generated catalogue; `overrides` are config fields
  with dots written as double underscores (`dypa__at_steps="12"`)."""
  args = ["--config=configs/demo.py:tiny", f"--config.data.catalogue_dir={catalogue_dir}",
          f"--workdir={workdir}"]
  args += [f"--config.{key.replace('__', '.')}={value}" for key, value in overrides.items()]
  return args


def subprocess_env(**extra) -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.update(extra)
  return env


class MainProcess:
  """One run of `python -m mtl_jax.main`; use as a context manager (kills it if left running).

  Attributes:
    lines: the stdout lines read so far.
  """

  def __init__(self, args, stderr_path, env=None):
    self.stderr_path = str(stderr_path)
    self._stderr = open(self.stderr_path, "w")
    self.proc = subprocess.Popen([sys.executable, "-u", "-m", "mtl_jax.main", *args], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                 env=env or subprocess_env())
    self.lines = []
    self._queue = queue.Queue()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self._queue.put(line)
    self._queue.put(None)

  def _take(self, timeout):
    line = self._queue.get(timeout=timeout)
    if line is not None:
      self.lines.append(line)
    return line

  def wait_for(self, predicate, timeout: float = 300) -> str:
    """Reads stdout until a line satisfies `predicate`; returns that line.

    Raises:
      AssertionError: the process ended, or `timeout` seconds passed, first.
    """
    deadline = time.monotonic() + timeout
    while True:
      try:
        line = self._take(max(deadline - time.monotonic(), 0.01))
      except queue.Empty:
        raise AssertionError(f"timed out after {timeout}s waiting for a line\n{self.describe()}")
      if line is None:
        self.proc.wait()
        raise AssertionError(f"the run ended (exit {self.proc.returncode}) before the awaited "
                             f"line\n{self.describe()}")
      if predicate(line):
        return line

  def signal(self, signum: int) -> None:
    self.proc.send_signal(signum)

  def wait(self, timeout: float = 300) -> int:
    """Waits for the exit and for the rest of stdout; returns the exit code."""
    self.proc.wait(timeout=timeout)
    self._reader.join(timeout=30)
    while True:
      try:
        if self._take(0) is None:
          break
      except queue.Empty:
        break
    self._stderr.close()
    return self.proc.returncode

  @property
  def stdout(self) -> str:
    return "".join(self.lines)

  def stderr(self) -> str:
    with open(self.stderr_path) as f:
      return f.read()

  def describe(self, chars: int = 3000) -> str:
    return (f"--- stdout (end) ---\n{self.stdout[-chars:]}\n--- stderr (end) ---\n"
            f"{self.stderr()[-chars:]}")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGKILL)
      self.proc.wait(timeout=60)
    self._stderr.close()
    return False


def run_main(args, stderr_path, env=None, timeout: float = 600) -> MainProcess:
  """Runs the command to its end; returns the finished `MainProcess`."""
  with MainProcess(args, stderr_path, env) as run:
    run.wait(timeout)
  return run


class CompileCounter:
  """Counts XLA compilations (from jax.monitoring events) while active.

  Entering checks that the listener works: a fresh jitted function must be seen compiling.
  """

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.events = []

  def _listen(self, event, duration, **kwargs):
    del duration, kwargs
    if event == self.EVENT:
      self.events.append(event)

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    jax.jit(lambda x: x * 3 + 1)(np.float32(2.0))
    assert self.events, "jax.monitoring reported no compilation for a fresh jitted function"
    self.events.clear()
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)
    return False
