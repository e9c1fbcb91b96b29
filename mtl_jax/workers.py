"""Runs a function on JSON arguments in a plain subprocess, beside the calling process.

Data generation and preparation share their work out this way rather than with
`multiprocessing`: nothing forks a process that holds JAX's and TFDS's threads, the caller's
`__main__` (a notebook, stdin) is never re-imported, and jobs and results cross as JSON files,
so nothing is unpickled.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Worker:
  """One started subprocess running `module.function(job)`; `result()` waits for its value."""

  def __init__(self, function: str, job: Any, files_prefix: str | os.PathLike,
               description: str):
    module, _, name = function.rpartition(".")
    prefix = os.fspath(files_prefix)
    self._job, self._out, self._log = (Path(f"{prefix}.{ext}") for ext in ("job", "out", "log"))
    self._description = description
    self._job.write_text(json.dumps(job))
    # TensorFlow's logging is set where mtl_jax is imported (mtl_jax/__init__.py).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    with open(self._log, "wb") as log:
      self._proc = subprocess.Popen(
          [sys.executable, "-m", "mtl_jax.workers", module, name, os.fspath(self._job),
           os.fspath(self._out)], env=env, stdout=log, stderr=subprocess.STDOUT)

  def result(self) -> Any:
    """The function's return value; a RuntimeError with the end of its output if it failed."""
    try:
      if self._proc.wait() != 0:
        raise RuntimeError(f"{self._description} failed in a worker process:\n"
                           f"{self._log.read_text(errors='replace')[-3000:]}")
      return json.loads(self._out.read_text())
    finally:
      for leftover in (self._job, self._out, self._log):
        leftover.unlink(missing_ok=True)

  def kill(self) -> None:
    if self._proc.poll() is None:
      self._proc.kill()
      self._proc.wait()


def _main(module: str, name: str, job_file: str, out_file: str) -> None:
  function = getattr(importlib.import_module(module), name)
  result = function(json.loads(Path(job_file).read_text()))
  Path(out_file).write_text(json.dumps(result))


if __name__ == "__main__":
  _main(*sys.argv[1:])
