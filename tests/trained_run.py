"""A tiny trained run shared by the tests of the user's surface (predict, new tasks, baselines).

Training it is most of those tests' cost, so it is trained once per session into pytest's
session temp directory; tests that change a run work on a copy (`copy_run`).
"""
import shutil

from mtl_jax import train
from tests.helpers import tiny_config

_RUNS = {}


def tiny_run(tmp_path_factory):
  """The workdir of `configs/demo.py:tiny` trained 6 steps (checkpoints at 3 and 6), with its
  synthetic catalogue in `<workdir>/catalogue`. Read-only: copy it before changing anything."""
  if "tiny" not in _RUNS:
    workdir = tmp_path_factory.mktemp("tiny_run")
    train.train_and_evaluate(tiny_config(total_steps=6), str(workdir))
    _RUNS["tiny"] = workdir
  return _RUNS["tiny"]


def copy_run(workdir, destination):
  shutil.copytree(workdir, destination, symlinks=True)
  return destination
