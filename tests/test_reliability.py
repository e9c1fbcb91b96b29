"""Reliability: preemption, kill -9 at any moment, damaged checkpoints, bad data, the non-finite
skip policy, and reading data and checkpoints without pickles.

Users train for days on preemptible machines, so each fault is injected into the real path:
`python -m mtl_jax.main` in a subprocess (SIGTERM, SIGKILL, re-runs; marked slow) or
`train.train_and_evaluate` in-process. One tiny catalogue is generated per module, so a run only
prepares TFDS and the tokenizer.

The kill tests draw their kill points at random and print what each kill hit; set
MTL_RELIABILITY_SEED to replay a failure (the seed is in every assertion message).
"""
import ast
import gc
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from mtl_jax import catalogue as cat
from mtl_jax import checkpointing, prepare, sharding, state as state_lib, tfds_builder
from mtl_jax import train, workdir as workdir_lib
from tests.helpers import tiny_config
from tests.reliability_helpers import (CompileCounter, MainProcess, ROOT, main_args,
                                       run_main, subprocess_env)

STEP_LINE = re.compile(r"^step (\d+)/(\d+):")
RESUMED = re.compile(r"Resumed from step (\d+)")
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def run_config(catalogue_dir, **overrides):
  return tiny_config(**{"data.catalogue_dir": str(catalogue_dir), "total_steps": 6, **overrides})


def random_seed() -> int:
  return int(os.environ.get("MTL_RELIABILITY_SEED", random.SystemRandom().randrange(2**31)))


def step_of(line: str):
  match = STEP_LINE.match(line)
  return int(match.group(1)) if match else None


def committed_steps(workdir) -> list[int]:
  directory = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def tmp_dirs(workdir) -> list[str]:
  return sorted(p.name for p in (Path(workdir) / "checkpoints").iterdir() if TMP_SUFFIX in p.name)


def read_checkpoint(workdir, step):
  """(state leaves by path as numpy, meta) of a committed checkpoint, read as saved."""
  mngr = ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", item_names=("state", "meta"))
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                        meta=ocp.args.JsonRestore()))
  mngr.close()
  leaves = {jax.tree_util.keystr(path): np.asarray(value)
            for path, value in jax.tree_util.tree_leaves_with_path(restored.state)}
  return leaves, restored.meta


def assert_same_state(expected: dict, actual: dict, context: str = ""):
  assert expected.keys() == actual.keys(), context
  for key in expected:
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=f"{key} {context}")


def file_digests(directory) -> dict:
  """{relative path: (size, sha256)} of every file under `directory`."""
  directory = Path(directory)
  return {str(p.relative_to(directory)): (p.stat().st_size,
                                          hashlib.sha256(p.read_bytes()).hexdigest())
          for p in sorted(directory.rglob("*")) if p.is_file()}


def tree_listing(directory: Path) -> dict:
  """{relative path: (is a folder, size, mtime in ns, mode)} of everything under `directory`."""
  return {str(p.relative_to(directory)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns,
                                          stat.S_IMODE(p.stat().st_mode))
          for p in sorted(directory.rglob("*"))}


# --- 1. Preemption (SIGTERM) -----------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_checkpoints_at_the_current_step_exits_0_and_the_rerun_finishes(
    catalogue_dir, tmp_path):
  seed = random_seed()
  target = random.Random(seed).randint(5, 60)
  context = f"(MTL_RELIABILITY_SEED={seed}, SIGTERM once step {target} was reported)"
  workdir = tmp_path / "run"
  args = main_args(workdir, catalogue_dir, total_steps=400, log_every=1, eval_every=100,
                   checkpoint_every=100)
  with MainProcess(args, tmp_path / "first.err") as run:
    run.wait_for(lambda line: (step_of(line) or 0) >= target)
    run.signal(signal.SIGTERM)
    code = run.wait()
  assert code == 0, f"{context}\n{run.describe()}"
  message = re.search(r"Preempted: checkpoint written at step (\d+) in (\S+); run the same "
                      r"command to resume\.", run.stdout)
  assert message, f"{context}\n{run.describe()}"
  stopped = int(message.group(1))
  last_trained = max(step_of(line) or 0 for line in run.lines)
  # The checkpoint is at the step it stopped at: the last one it trained.
  assert stopped == last_trained >= target, context
  assert message.group(2) == str(workdir / "checkpoints")
  assert stopped in committed_steps(workdir), context
  state, meta = read_checkpoint(workdir, stopped)
  assert int(state["['step']"]) == stopped and meta["data_iterator"]["next_step"] == stopped
  assert not (workdir / "reports" / "test.json").exists()

  rerun = run_main(args, tmp_path / "second.err")
  assert rerun.proc.returncode == 0, f"{context}\n{rerun.describe()}"
  assert f"Resumed from step {stopped} " in rerun.stdout, context
  assert min(step_of(line) or 400 for line in rerun.lines) == stopped + 1, context
  report = json.loads((workdir / "reports" / "test.json").read_text())
  assert report["step"] == 400 and report["summary"]["tasks_evaluated"] == 6
  print(f"\nSIGTERM {context}: exit 0, checkpoint at step {stopped}, re-run resumed there and "
        "finished step 400")


# --- 2 and 4. Kill -9 at any moment; determinism -----------------------------------------------

KILL_RUN = dict(total_steps=36, log_every=1, eval_every=5, eval_batch_size=16,
                checkpoint_every=4, dypa__at_steps="12,22")
KILL_TOTAL = 36
KILL_EVAL_EVERY = 5
KILL_DYPA_STEPS = (12, 22)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(catalogue_dir,
                                                                          tmp_path):
  seed = random_seed()
  rng = random.Random(seed)
  context = f"(MTL_RELIABILITY_SEED={seed})"
  reference, workdir = tmp_path / "reference", tmp_path / "killed"
  straight = run_main(main_args(reference, catalogue_dir, **KILL_RUN), tmp_path / "ref.err")
  assert straight.proc.returncode == 0, straight.describe()
  assert "DyPa at step 12" in straight.stdout and "DyPa at step 22" in straight.stdout

  observed = []  # One row per run: what the kill was aimed at, and what it hit.
  runs = [0]

  def start():
    runs[0] += 1
    return MainProcess(main_args(workdir, catalogue_dir, **KILL_RUN),
                       tmp_path / f"run{runs[0]}.err")

  def resumed_from(run) -> int:
    for line in run.lines:
      if match := RESUMED.search(line):
        return int(match.group(1))
    return 0

  def kill(run, aim: str):
    """SIGKILLs the run; records the aim, the last step it reported and what is on disk."""
    run.signal(signal.SIGKILL)
    code = run.wait()
    steps = [s for s in map(step_of, run.lines) if s is not None]
    last = step_of(run.lines[-1]) if run.lines else None
    # An evaluation step's line is printed just before the evaluation, its table just after.
    evaluating = last is not None and last % KILL_EVAL_EVERY == 0 and last < KILL_TOTAL
    observed.append({
        "run": runs[0], "aim": aim, "exit": code, "resumed_from": resumed_from(run),
        "last_step_reported": steps[-1] if steps else None,
        "last_line": run.lines[-1].strip()[:60] if run.lines else "",
        "during_validation": evaluating,
        "committed": committed_steps(workdir) if (workdir / "checkpoints").exists() else [],
        "half_written": tmp_dirs(workdir) if (workdir / "checkpoints").exists() else [],
    })
    assert code == -signal.SIGKILL, f"{context} run {runs[0]} ended by itself\n{run.describe()}"

  def wait_started(run):
    """Waits for the resume line, or for the first step of a run from scratch."""
    run.wait_for(lambda line: step_of(line) is not None or "Resumed from step" in line)
    check_resume(run)

  def check_resume(run):
    """The re-run resumes from the newest committed step, ignoring half-written ones."""
    expected = observed[-1]["committed"]
    got = resumed_from(run)
    assert got == (expected[-1] if expected else 0), (
        f"{context} run {runs[0]} resumed from {got}; on disk: {observed[-1]}")
    last = observed[-1]["last_step_reported"]
    assert last is None or got <= last + 1

  # a) During start-up, while TFDS prepares the catalogue.
  with start() as run:
    deadline = time.monotonic() + 180
    while not (workdir / "prepared").exists() and run.proc.poll() is None:
      assert time.monotonic() < deadline, run.describe()
      time.sleep(0.02)
    delay = rng.uniform(0.0, 1.0)
    time.sleep(delay)
    kill(run, f"start-up: {delay:.2f}s after prepared/ appeared")

  # b) At a random step, after a random delay (may land in an async checkpoint save).
  with start() as run:
    wait_started(run)
    target = rng.randint(2, 9)
    run.wait_for(lambda line: (step_of(line) or 0) >= target)
    delay = rng.uniform(0.0, 0.3)
    time.sleep(delay)
    kill(run, f"random: step {target} + {delay:.2f}s")

  # c) During an evaluation: the step line of an evaluation step is printed just before it.
  with start() as run:
    wait_started(run)
    start_step = resumed_from(run)
    evaluation = (start_step // KILL_EVAL_EVERY + 1) * KILL_EVAL_EVERY
    run.wait_for(lambda line: step_of(line) == evaluation)
    kill(run, f"validation at step {evaluation}")

  # d) Right after a DyPa expansion (before the checkpoint of that step).
  with start() as run:
    wait_started(run)
    expansion = min(s for s in KILL_DYPA_STEPS if s > resumed_from(run))
    run.wait_for(lambda line: line.startswith(f"DyPa at step {expansion}:"))
    kill(run, f"right after DyPa at step {expansion}")

  # e) At a random later step, after a random delay.
  with start() as run:
    wait_started(run)
    target = rng.randint(max(resumed_from(run) + 1, 23), KILL_TOTAL - 2)
    run.wait_for(lambda line: (step_of(line) or 0) >= target)
    delay = rng.uniform(0.0, 0.3)
    time.sleep(delay)
    kill(run, f"random: step {target} + {delay:.2f}s")

  # f) After the last step: the final checkpoint save or the final evaluation.
  with start() as run:
    wait_started(run)
    run.wait_for(lambda line: step_of(line) == KILL_TOTAL)
    delay = rng.uniform(0.0, 1.5)
    time.sleep(delay)
    kill(run, f"after the last step + {delay:.2f}s (final save or final evaluation)")

  with start() as run:  # To the end.
    code = run.wait()
    check_resume(run)
  assert code == 0, f"{context}\n{run.describe()}"

  table = "\n".join(json.dumps(row) for row in observed)
  print(f"\nkill -9 runs {context}:\n{table}")
  expected_state, expected_meta = read_checkpoint(reference, KILL_TOTAL)
  state, meta = read_checkpoint(workdir, KILL_TOTAL)
  assert_same_state(expected_state, state, f"{context}\n{table}")
  assert meta["dypa_events"] == expected_meta["dypa_events"]
  assert len(meta["dypa_events"]) == 2 and all(e["tasks"] for e in meta["dypa_events"])
  assert meta["data_iterator"] == expected_meta["data_iterator"]
  for split in ("validation", "test"):
    expected_report = json.loads((reference / "reports" / f"{split}.json").read_text())
    report = json.loads((workdir / "reports" / f"{split}.json").read_text())
    assert report == expected_report, f"{split} report differs {context}\n{table}"


# --- 3. Damaged checkpoints --------------------------------------------------------------------

@pytest.fixture(scope="module")
def readonly_run(catalogue_dir, tmp_path_factory):
  """A finished 6-step run (checkpoints at steps 3 and 6) on a read-only copy of the catalogue,
  with listings of that copy's folder before and after the run."""
  source = tmp_path_factory.mktemp("readonly")
  directory = source / "catalogue"
  shutil.copytree(catalogue_dir, directory)
  for p in [directory, *directory.rglob("*")]:
    p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
  # Tests run as root, for whom the mode blocks nothing: compare what is there instead.
  before = (tree_listing(source), file_digests(source))
  workdir = tmp_path_factory.mktemp("trained")
  try:
    summary = train.train_and_evaluate(run_config(directory, checkpoint_every=3), str(workdir))
    after = (tree_listing(source), file_digests(source))
  finally:
    for p in [directory, *directory.rglob("*")]:
      p.chmod(p.stat().st_mode | stat.S_IWUSR)
  return {"workdir": workdir, "summary": summary, "before": before, "after": after}


@pytest.fixture(scope="module")
def trained_workdir(readonly_run):
  workdir = readonly_run["workdir"]
  assert committed_steps(workdir) == [3, 6]
  return workdir


def copy_workdir(trained_workdir, tmp_path) -> Path:
  workdir = tmp_path / "run"
  shutil.copytree(trained_workdir, workdir)
  return workdir


def restore(workdir, config):
  """What `train_and_evaluate` does before training: (manager, restore_latest's result)."""
  catalogue, tokenizer = prepare.prepare_data(config, epath.Path(workdir))
  table = catalogue.task_table
  model = state_lib.Model(config, state_lib.model_spec(config, table, len(tokenizer)),
                          state_lib.trained_num_classes(table.num_classes,
                                                        config.eval.holdout_classes),
                          sharding.make_mesh(config.mesh))
  mngr = workdir_lib.checkpoint_manager(epath.Path(workdir), config.max_to_keep, create=True)
  restored = checkpointing.restore_latest(
      mngr, lambda meta: model.abstract_state(meta["num_adapter_slots"]))
  return mngr, restored


def _array_files(step_dir: Path) -> list[Path]:
  files = sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(),
                 key=lambda p: p.stat().st_size)
  assert files, step_dir
  return files


def _zero(path: Path):
  path.write_bytes(b"\0" * path.stat().st_size)


def _truncate(path: Path):
  os.truncate(path, path.stat().st_size // 2)


def _flip_byte_of_array(step_dir: Path, key: str = "params.tasks.heads.kernel"):
  """Flips the middle byte of one saved array's value, wherever OCDBT placed it.

  Which data file holds which array depends on write timing, so the location is read from the
  OCDBT B-tree rather than guessed from file sizes.
  """
  import tensorstore as ts
  base_dir = step_dir / "state" / "ocdbt.process_0"
  base = ts.KvStore.open(f"file://{base_dir}/").result()
  root = ts.ocdbt.dump(base).result()["versions"][-1]["root"]["location"]
  entries = ts.ocdbt.dump(base, root).result()["entries"]
  [location] = [e["indirect_value"] for e in entries
                if e["key"].decode().split("/")[0] == key and "indirect_value" in e]
  _, _, file_name, offset, length = location.split(":")
  path = base_dir / file_name
  data = bytearray(path.read_bytes())
  data[int(offset) + int(length) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


def _delete_all(paths):
  for p in paths:
    p.unlink()


DAMAGE = {
    # Orbax/TensorStore raise on these.
    "array_file_zeroed": lambda d: _zero(_array_files(d)[-1]),
    "array_file_truncated": lambda d: _truncate(_array_files(d)[-1]),
    "array_files_deleted": lambda d: _delete_all(_array_files(d)),
    "state_metadata_garbled": lambda d: (d / "state" / "_METADATA").write_text("{garbage"),
    "state_item_deleted": lambda d: shutil.rmtree(d / "state"),
    "meta_deleted": lambda d: (d / "meta" / "metadata").unlink(),
    "meta_garbled": lambda d: (d / "meta" / "metadata").write_text('{"data_iterator": {"ne'),
    # Orbax restores this one without an error (wrong numbers): the saved fingerprints catch it.
    "array_byte_flipped": _flip_byte_of_array,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_reported_kept_and_skipped(catalogue_dir, trained_workdir,
                                                                tmp_path, capsys, damage):
  workdir = copy_workdir(trained_workdir, tmp_path)
  newest = workdir / "checkpoints" / "6"
  DAMAGE[damage](newest)
  damaged = file_digests(newest)
  config = run_config(catalogue_dir, checkpoint_every=3)
  capsys.readouterr()
  mngr, restored = restore(workdir, config)
  out = capsys.readouterr().out
  assert restored is not None and restored[0] == 3, out
  assert f"WARNING: skipping unreadable checkpoint {newest}: " in out
  if damage == "array_byte_flipped":  # Read back without an error, caught by the fingerprints.
    assert (f"CheckpointError: {newest}: the bytes of 1 state arrays differ from when they were "
            "saved") in out
  moved = list((workdir / "checkpoints" / checkpointing.CORRUPT_DIR).iterdir())
  assert len(moved) == 1 and moved[0].name.startswith("6-"), moved
  assert f"moved unreadable checkpoint {newest} to {moved[0]} (kept, not deleted)" in out
  assert file_digests(moved[0]) == damaged  # Kept byte for byte.
  assert not newest.exists()
  # The resumed run can save step 6 again (Orbax refuses a step whose directory exists).
  _, state, meta = restored
  checkpointing.save(mngr, 6, state, meta, force=True)
  mngr.wait_until_finished()
  assert mngr.all_steps() == [3, 6]
  mngr.close()
  assert committed_steps(workdir) == [3, 6]


def test_training_resumes_past_a_damaged_checkpoint_and_reproduces_it(
    catalogue_dir, trained_workdir, tmp_path, capsys):
  workdir = copy_workdir(trained_workdir, tmp_path)
  newest = workdir / "checkpoints" / "6"
  original, _ = read_checkpoint(workdir, 6)
  _flip_byte_of_array(newest)
  capsys.readouterr()
  train.train_and_evaluate(run_config(catalogue_dir, checkpoint_every=3), str(workdir))
  out = capsys.readouterr().out
  assert f"WARNING: skipping unreadable checkpoint {newest}: " in out
  assert "Resumed from step 3 " in out
  assert len(list((workdir / "checkpoints" / checkpointing.CORRUPT_DIR).iterdir())) == 1
  retrained, _ = read_checkpoint(workdir, 6)
  assert_same_state(original, retrained)  # Steps 4-6 replayed exactly.
  assert json.loads((workdir / "reports" / "test.json").read_text())["step"] == 6


def test_every_checkpoint_damaged_stops_naming_them_and_moves_nothing(
    catalogue_dir, trained_workdir, tmp_path):
  workdir = copy_workdir(trained_workdir, tmp_path)
  checkpoints = workdir / "checkpoints"
  DAMAGE["meta_garbled"](checkpoints / "3")
  DAMAGE["array_file_zeroed"](checkpoints / "6")
  with pytest.raises(checkpointing.CheckpointError) as error:
    restore(workdir, run_config(catalogue_dir, checkpoint_every=3))
  message = str(error.value)
  assert str(checkpoints / "3") in message and str(checkpoints / "6") in message
  assert "move the damaged step directories aside" in message
  assert committed_steps(workdir) == [3, 6]
  assert not (checkpoints / checkpointing.CORRUPT_DIR).exists()


def test_half_written_checkpoint_directories_are_ignored(catalogue_dir, trained_workdir,
                                                         tmp_path, capsys):
  workdir = copy_workdir(trained_workdir, tmp_path)
  checkpoints = workdir / "checkpoints"
  # What a save cut short leaves: Orbax 0.12 names it `<step>.orbax-checkpoint-tmp`, older
  # releases added `-<timestamp>`. Both hold part of a checkpoint and no commit.
  for name in ("9" + TMP_SUFFIX, "12" + TMP_SUFFIX + "-1764000000"):
    shutil.copytree(checkpoints / "6", checkpoints / name)
    shutil.rmtree(checkpoints / name / "state" / "ocdbt.process_0")
    for marker in (checkpoints / name).rglob("commit_success.txt"):
      marker.unlink()
  capsys.readouterr()
  mngr, restored = restore(workdir, run_config(catalogue_dir, checkpoint_every=3))
  assert restored[0] == 6
  assert "WARNING" not in capsys.readouterr().out
  _, state, meta = restored
  checkpointing.save(mngr, 9, state, meta, force=True)  # Replaces the half-written step 9.
  mngr.wait_until_finished()
  mngr.close()
  assert committed_steps(workdir) == [6, 9]
  assert tmp_dirs(workdir) == ["12" + TMP_SUFFIX + "-1764000000"]


def test_state_fingerprint_sees_one_changed_bit_and_moved_values():
  state = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "count": np.int32(7),
           "half": np.ones((2, 3), np.float16), "flag": np.array([True, False])}
  base = checkpointing.state_fingerprint(state)
  assert base == checkpointing.state_fingerprint(jax.tree.map(np.copy, state))
  one_bit = dict(state, w=state["w"].copy())
  one_bit["w"].view(np.uint32)[1, 2] ^= 1
  swapped = dict(state, w=state["w"][::-1].copy())  # Same values, other places.
  for changed, leaf in ((one_bit, "w"), (swapped, "w"),
                        (dict(state, half=state["half"] * 2), "half"),
                        (dict(state, flag=state["flag"][::-1].copy()), "flag")):
    fingerprint = checkpointing.state_fingerprint(changed)
    assert [k for k in base if base[k] != fingerprint[k]] == [leaf]


# --- 5. Bad data end to end ----------------------------------------------------------------------

def _first_record(path: Path, task: str) -> dict:
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      if record["task"] == task:
        return record
  raise AssertionError(f"no record of {task} in {path}")


def bad_catalogue(catalogue_dir, out: Path) -> dict:
  """A copy of the catalogue with bad records appended to each split.

  Returns {split: {task: number of bad records}} and, under "first_train_line", the line number
  of the first bad train record.
  """
  shutil.copytree(catalogue_dir, out)
  train_file = out / "train.jsonl"
  taken_id = _first_record(train_file, "site0000")["id"]

  def like(split, of_task, **changes):
    record = {**_first_record(out / f"{split}.jsonl", of_task), **changes}
    return json.dumps({k: v for k, v in record.items() if v is not None})

  bad = {
      "train": [("site0001", like("train", "site0001", id="bad-t1", label="No Such Class")),
                ("site0001", like("train", "site0001", id="bad-t2", label="Nor This")),
                ("site0002", like("train", "site0002", id="bad-t3", title=None)),
                (cat.UNKNOWN_TASK, '{"id": "bad-t4", "task": ')],
      "validation": [(cat.UNKNOWN_TASK, like("validation", "site0000", id="bad-v1",
                                             task="site9999")),
                     ("site0004", like("validation", "site0004", id="bad-v2",
                                       images=[0, 1, 2, 3]))],
      "test": [("site0003", like("test", "site0003", id="bad-s1", images=[10**6])),
               ("site0000", like("test", "site0000", id=taken_id)),
               ("site0005", like("test", "site0005", id="bad-s3", label="No Such Class"))],
  }
  counts = {}
  first_train_line = len(train_file.read_text().splitlines()) + 1
  for split, lines in bad.items():
    with open(out / f"{split}.jsonl", "a") as f:
      f.write("".join(line + "\n" for _, line in lines))
    counts[split] = {}
    for task, _ in lines:
      counts[split][task] = counts[split].get(task, 0) + 1
  counts["first_train_line"] = first_train_line
  return counts


def test_bad_records_skipped_train_and_are_counted_per_task_in_the_report(catalogue_dir,
                                                                          tmp_path):
  counts = bad_catalogue(catalogue_dir, tmp_path / "catalogue")
  workdir = tmp_path / "run"
  config = run_config(tmp_path / "catalogue", total_steps=3, **{"data.on_bad_record": "skip"})
  summary = train.train_and_evaluate(config, str(workdir))
  report = json.loads((workdir / "reports" / "test.json").read_text())
  assert report["summary"] == summary and summary["tasks_evaluated"] == 6
  rows = {row["task"]: row for row in report["tasks"]}
  for task, row in rows.items():
    assert row["skipped_records"] == counts["test"].get(task, 0), row
    assert row["skipped_train_records"] == counts["train"].get(task, 0), row
  # Totals include records whose task is unknown (they belong to no row).
  assert summary["skipped_records"] == sum(counts["test"].values()) == 3
  assert summary["skipped_train_records"] == sum(counts["train"].values()) == 4
  validation = json.loads((workdir / "reports" / "validation.json").read_text())
  assert validation["summary"]["skipped_records"] == 2
  assert {r["task"]: r["skipped_records"] for r in validation["tasks"]}["site0004"] == 1
  header = (workdir / "reports" / "test.csv").read_text().splitlines()[0].split(",")
  assert "skipped_records" in header and "skipped_train_records" in header


def test_bad_record_under_fail_stops_naming_file_line_and_field_before_compiling(
    catalogue_dir, tmp_path):
  counts = bad_catalogue(catalogue_dir, tmp_path / "catalogue")
  workdir = tmp_path / "run"
  config = run_config(tmp_path / "catalogue")
  assert config.data.on_bad_record == "fail"
  with CompileCounter() as compiles, pytest.raises(cat.BadRecordError) as error:
    train.train_and_evaluate(config, str(workdir))
  message = str(error.value)
  assert (f"{tmp_path / 'catalogue' / 'train.jsonl'} line {counts['first_train_line']}, "
          "field 'label'") in message
  assert "'No Such Class' is not a class of task 'site0001'" in message and "Fix:" in message
  assert compiles.events == []
  assert not (workdir / "checkpoints").exists()


# --- 7. Non-finite steps under optimizer.nonfinite=skip -------------------------------------------

def test_nonfinite_skip_leaves_the_state_as_it_was_and_the_run_continues(catalogue_dir,
                                                                         tmp_path, capsys,
                                                                         monkeypatch):
  poisoned_step = 3  # The batch of the 3rd update (state.step 2 -> 3).
  batches_seen = []
  original = state_lib.Model.global_batch

  def global_batch(self, local):
    if "example_mask" not in local:  # A train batch (evaluation batches carry a mask).
      batches_seen.append(sorted(set(local["task_id"].tolist())))
      if len(batches_seen) == poisoned_step:
        local = dict(local, images=np.full_like(local["images"], np.nan),
                     image_mask=np.ones_like(local["image_mask"]))
    return original(self, local)

  monkeypatch.setattr(state_lib.Model, "global_batch", global_batch)
  workdir = tmp_path / "run"
  config = run_config(catalogue_dir, total_steps=4, checkpoint_every=1, max_to_keep=10,
                      log_every=1, **{"optimizer.nonfinite": "skip"})
  capsys.readouterr()
  summary = train.train_and_evaluate(config, str(workdir))
  out = capsys.readouterr().out
  assert committed_steps(workdir) == [1, 2, 3, 4]
  before, _ = read_checkpoint(workdir, poisoned_step - 1)
  after, _ = read_checkpoint(workdir, poisoned_step)
  assert int(after["['step']"]) == int(before["['step']"]) + 1 == poisoned_step
  del before["['step']"], after["['step']"]
  assert_same_state(before, after)
  later, _ = read_checkpoint(workdir, poisoned_step + 1)
  assert any(not np.array_equal(later[k], after[k]) for k in after)  # Training went on.
  names = {f"site{t:04d}" for t in batches_seen[poisoned_step - 1]}
  warning = re.search(rf"WARNING: step {poisoned_step} skipped: non-finite loss or gradient; "
                      r"tasks in that batch: (.*)", out)
  assert warning and set(warning.group(1).split(", ")) == names, out
  assert out.count("skipped: non-finite") == 1
  assert np.isfinite(summary["mean_loss"])


# --- 8. Safety: no pickles, no writes outside the workdir -------------------------------------

class _RunsCodeWhenUnpickled:
  """A pickle payload: unpickling it creates the file named by `marker`."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_pickled_embedding_file_is_refused_without_running_it(catalogue_dir, tmp_path):
  directory = tmp_path / "catalogue"
  shutil.copytree(catalogue_dir, directory)
  marker = tmp_path / "code_ran"
  np.save(directory / cat.EMBEDDINGS_FILE,
          np.array([_RunsCodeWhenUnpickled(marker)], dtype=object), allow_pickle=True)
  with pytest.raises(cat.CatalogueError, match=r"image_embeddings\.npy: not a plain \.npy array.*"
                     r"Fix: save a float16/float32 array"):
    tfds_builder.load_catalogue(directory, tmp_path / "prepared")
  assert not marker.exists()


PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                  "marshal"}


def _package_sources():
  package = Path(ROOT) / "mtl_jax"
  # CPython 3.11's AST conversion fails ("AST constructor recursion depth mismatch") when a
  # garbage-collection finalizer runs Python code in the middle of it, as a leftover asyncio
  # future of an earlier test did once: collect first and keep the collector off meanwhile.
  gc.collect()
  gc.disable()
  try:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text(), str(p))
            for p in sorted(package.rglob("*.py"))}
  finally:
    gc.enable()


def test_no_module_unpickles_or_evaluates_code_except_the_restricted_image_reader():
  importers, code_runners, loads = [], [], []
  for name, tree in _package_sources().items():
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        modules = [a.name.split(".")[0] for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        modules = [(node.module or "").split(".")[0]]
      else:
        modules = []
      if PICKLE_MODULES & set(modules):
        importers.append(name)
      if isinstance(node, ast.Call):
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if called in ("eval", "exec") and isinstance(func, ast.Name):
          code_runners.append(f"{name}:{node.lineno}")
        if called == "load" and isinstance(func, ast.Attribute) and getattr(
            func.value, "id", "") in ("np", "numpy"):
          keywords = {k.arg: k.value for k in node.keywords}
          safe = isinstance(keywords.get("allow_pickle"), ast.Constant) and (
              keywords["allow_pickle"].value is False)
          loads.append((f"{name}:{node.lineno}", safe))
  # image_encoder.py reads a legacy torch file with an unpickler that allows only tensor
  # rebuilds (tested in test_image_encoder.py).
  assert importers == ["mtl_jax/image_encoder.py"]
  assert code_runners == []
  assert loads and all(safe for _, safe in loads), loads


def test_a_read_only_catalogue_trains_and_is_not_written(readonly_run):
  assert readonly_run["summary"]["tasks_evaluated"] == 6
  assert (readonly_run["workdir"] / "reports" / "test.json").exists()
  assert readonly_run["after"] == readonly_run["before"]


# --- 8. The run directory: one writer, the same run on resume, every restore verified -----------

def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _write_lock(workdir: Path, pid: int, host: str):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / workdir_lib.LOCK).write_text(json.dumps(
      {"pid": pid, "host": host, "started": time.time(), "command": "python -m mtl_jax.main x"}))


def test_a_second_writer_is_refused_naming_the_running_process(catalogue_dir, tmp_path):
  workdir = tmp_path / "run"
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    _write_lock(workdir, holder.pid, socket.gethostname())
    with pytest.raises(workdir_lib.RunDirError) as error:
      train.train_and_evaluate(run_config(catalogue_dir), str(workdir))
  finally:
    holder.kill()
    holder.wait()
  message = str(error.value)
  assert f"is in use by process {holder.pid} on host {socket.gethostname()}" in message
  assert "Fix: wait for that run to end, use another --workdir" in message
  assert sorted(p.name for p in workdir.iterdir()) == [workdir_lib.LOCK]  # Nothing written.


def test_a_lock_held_on_another_host_is_refused(catalogue_dir, tmp_path):
  workdir = tmp_path / "run"
  _write_lock(workdir, 1, "another-host")
  with pytest.raises(workdir_lib.RunDirError, match="process 1 on host another-host"):
    train.train_and_evaluate(run_config(catalogue_dir), str(workdir))


@pytest.mark.slow
def test_a_stale_lock_of_a_dead_process_is_taken_over_and_released(catalogue_dir, tmp_path,
                                                                    capsys):
  workdir = tmp_path / "run"
  pid = _dead_pid()
  _write_lock(workdir, pid, socket.gethostname())
  train.train_and_evaluate(run_config(catalogue_dir, total_steps=2), str(workdir))
  assert f"removed the stale lock of process {pid}" in capsys.readouterr().out
  assert not (workdir / workdir_lib.LOCK).exists()  # Released at the end.
  assert committed_steps(workdir) == [2]


@pytest.mark.slow
def test_two_runs_started_at_once_one_trains_the_other_is_refused(catalogue_dir, tmp_path):
  workdir = tmp_path / "run"
  args = main_args(workdir, catalogue_dir, total_steps=400, log_every=1)
  with MainProcess(args, tmp_path / "first.err") as first:
    first.wait_for(lambda line: step_of(line) is not None)
    second = run_main(args, tmp_path / "second.err", timeout=300)
    assert second.proc.returncode == 1, second.describe()
    err = second.stderr().strip().splitlines()
    assert err[-1].startswith(f"error: {workdir} is in use by process {first.proc.pid}"), err
    assert "Traceback" not in second.stderr()
    first.signal(signal.SIGTERM)
    assert first.wait() == 0, first.describe()
  assert not (workdir / "checkpoints" / checkpointing.CORRUPT_DIR).exists()


def _catalogue_variant(catalogue_dir, out: Path, change) -> Path:
  shutil.copytree(catalogue_dir, out)
  table = json.loads((out / cat.TASKS_FILE).read_text())
  change(table["tasks"])
  (out / cat.TASKS_FILE).write_text(json.dumps(table))
  return out


@pytest.mark.parametrize("change,expected", [
    (lambda tasks: tasks.__setitem__(slice(0, 2), tasks[1::-1]), "task order changed"),
    (lambda tasks: tasks[2]["classes"].reverse(), "classes of task 'site0002' changed"),
])
def test_resume_with_a_changed_catalogue_is_refused(catalogue_dir, trained_workdir, tmp_path,
                                                    change, expected):
  workdir = copy_workdir(trained_workdir, tmp_path)
  before = file_digests(workdir / "checkpoints")
  changed = _catalogue_variant(catalogue_dir, tmp_path / "changed", change)
  with pytest.raises(workdir_lib.RunDirError) as error:
    train.train_and_evaluate(run_config(changed, checkpoint_every=3, total_steps=9),
                             str(workdir))
  message = str(error.value)
  assert f"{workdir / 'checkpoints' / '6'} was saved by a different run" in message
  assert expected in message and "Fix: run the command that made this run" in message
  assert file_digests(workdir / "checkpoints") == before  # Nothing moved aside or rewritten.


@pytest.mark.parametrize("field,value,shown", [
    ("optimizer.learning_rate", 0.5, "config.optimizer.learning_rate: 0.001 (saved) -> 0.5 (now)"),
    ("seed", 7, "config.seed: 0 (saved) -> 7 (now)"),
    ("model.hidden_size", 48, "config.model.hidden_size: 32 (saved) -> 48 (now)"),
])
def test_resume_with_a_changed_config_is_refused_with_a_diff(catalogue_dir, trained_workdir,
                                                             tmp_path, field, value, shown):
  workdir = copy_workdir(trained_workdir, tmp_path)
  before = file_digests(workdir / "checkpoints")
  config = run_config(catalogue_dir, checkpoint_every=3, **{field: value})
  with pytest.raises(workdir_lib.RunDirError) as error:
    train.train_and_evaluate(config, str(workdir))
  assert shown in str(error.value)
  assert file_digests(workdir / "checkpoints") == before


def test_a_field_added_since_the_checkpoint_resumes_at_its_default(catalogue_dir):
  """A checkpoint saved before a config field existed lacks it: at its default it resumes, set
  to anything else it is refused like any other change."""
  config = run_config(catalogue_dir)
  table = cat.read_task_table(catalogue_dir)
  saved = json.loads(config.to_json())
  del saved["eval"]["holdout_mode"]
  meta = {"task_table": table.to_json(), "config": json.dumps(saved)}
  workdir_lib.check_resume(meta, config, table, "ckpt/6")  # No error.
  config.eval.holdout_mode = "shared"
  with pytest.raises(workdir_lib.RunDirError, match=re.escape(
      "config.eval.holdout_mode: (absent) (saved) -> 'shared' (now)")):
    workdir_lib.check_resume(meta, config, table, "ckpt/6")


def test_a_checkpoint_with_per_task_head_rows_is_refused_with_the_fix(catalogue_dir,
                                                                     trained_workdir, tmp_path):
  """Checkpoints saved before heads were stored in class blocks have other head shapes: resume
  and every command that reads a run refuse them by name (never moved aside as damaged)."""
  config = run_config(catalogue_dir)
  table = cat.read_task_table(catalogue_dir)
  saved = json.loads(config.to_json())
  del saved["model"]["classes_per_block"]
  meta = {"task_table": table.to_json(), "config": json.dumps(saved)}
  expected = "one row per task padded to model.max_classes.*Fix: train the run again"
  with pytest.raises(workdir_lib.RunDirError, match=expected):
    workdir_lib.check_resume(meta, config, table, "ckpt/6")
  workdir = copy_workdir(trained_workdir, tmp_path)
  rewritten = 0
  for path in (workdir / "checkpoints").glob("*/meta/*"):
    try:
      saved_meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
      continue
    if isinstance(saved_meta, dict) and "config" in saved_meta:
      old_config = json.loads(saved_meta["config"])
      del old_config["model"]["classes_per_block"]
      path.write_text(json.dumps({**saved_meta, "config": json.dumps(old_config)}))
      rewritten += 1
  assert rewritten
  with pytest.raises(workdir_lib.RunDirError, match=expected):
    workdir_lib.open_run(workdir)
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  with pytest.raises(workdir_lib.RunDirError, match=expected):
    train.train_and_evaluate(run_config(catalogue_dir, total_steps=8), str(workdir))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


@pytest.mark.slow
def test_resume_allows_more_steps_and_another_cadence(catalogue_dir, trained_workdir, tmp_path,
                                                      capsys):
  workdir = copy_workdir(trained_workdir, tmp_path)
  capsys.readouterr()
  train.train_and_evaluate(run_config(catalogue_dir, checkpoint_every=4, total_steps=8,
                                      eval_every=8, log_every=1), str(workdir))
  assert "Resumed from step 6" in capsys.readouterr().out
  assert committed_steps(workdir)[-1] == 8


@pytest.mark.parametrize("name", ["/some/dir", "../x", "a/b", ".", "..", "", "x\0y", "~root",
                                  "C:\\win", "naïve café"])
def test_hostile_task_names_map_to_directories_inside_the_workdir(name, tmp_path):
  directory = workdir_lib.task_dir_name(name)
  assert directory and "/" not in directory and "\0" not in directory
  assert directory not in (".", "..")
  path = workdir_lib.inside(tmp_path, tmp_path / "tasks" / directory)
  assert os.path.commonpath([str(tmp_path), str(path)]) == str(tmp_path)
  assert workdir_lib.task_dir_name(name) == directory  # Stable.
  assert workdir_lib.task_dir_name(name + "!") != directory  # Distinct names stay distinct.
  with pytest.raises(workdir_lib.RunDirError, match="not inside the workdir"):
    workdir_lib.inside(tmp_path, tmp_path / ".." / "elsewhere")


@pytest.fixture
def damaged_run(trained_workdir, tmp_path):
  """A copy of the trained run whose newest checkpoint (6) has one flipped byte."""
  workdir = copy_workdir(trained_workdir, tmp_path)
  _flip_byte_of_array(workdir / "checkpoints" / "6")
  return workdir


def _assert_refused(error, workdir):
  message = str(error.value)
  assert f"{workdir / 'checkpoints' / '6'}: the bytes of 1 state arrays differ" in message
  assert "Fix: use an older checkpoint with --step=3" in message


def test_predict_refuses_a_damaged_checkpoint(damaged_run):
  from mtl_jax import predict
  with pytest.raises(checkpointing.CheckpointError) as error:
    predict.Predictor.from_workdir(damaged_run)
  _assert_refused(error, damaged_run)
  assert predict.Predictor.from_workdir(damaged_run, step=3).step == 3  # The fix works.


def test_dypa_refuses_a_damaged_checkpoint(damaged_run):
  from mtl_jax.dypa import __main__ as dypa_cli
  with pytest.raises(checkpointing.CheckpointError) as error:
    dypa_cli.describe(str(damaged_run))
  _assert_refused(error, damaged_run)


def test_new_task_refuses_a_damaged_checkpoint_and_writes_nothing(damaged_run, catalogue_dir,
                                                                  tmp_path):
  from mtl_jax import new_task
  from mtl_jax import single_task
  new_site = tmp_path / "new_site"
  single_task.write_subset_catalogue(catalogue_dir, new_site, ["site0001"])
  table = json.loads((new_site / cat.TASKS_FILE).read_text())
  table["tasks"][0]["name"] = "brand-new-site"
  (new_site / cat.TASKS_FILE).write_text(json.dumps(table))
  for split in ("train", "validation", "test"):
    path = new_site / f"{split}.jsonl"
    lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    path.unlink()  # It may be a link into the source catalogue.
    path.write_text("".join(json.dumps({**r, "task": "brand-new-site"}) + "\n" for r in lines))
  grown = tmp_path / "grown"
  with pytest.raises(checkpointing.CheckpointError) as error:
    new_task.add_task(damaged_run, grown, new_site, steps=2)
  _assert_refused(error, damaged_run)
  assert not (grown / "checkpoints").exists()


# --- 9. What a user meets first: clear one-line errors, early checks ------------------------------

def test_a_workdir_that_is_a_file_is_refused_at_the_start(catalogue_dir, tmp_path):
  path = tmp_path / "file"
  path.write_text("not a directory")
  with CompileCounter() as compiles, pytest.raises(workdir_lib.RunDirError,
                                                   match=r"is a file, not a directory"):
    train.train_and_evaluate(run_config(catalogue_dir), str(path))
  with pytest.raises(workdir_lib.RunDirError, match=r"cannot be written .*Fix: choose a "):
    train.train_and_evaluate(run_config(catalogue_dir), str(path / "below"))
  assert compiles.events == []


def test_a_run_that_fails_before_writing_removes_only_the_workdir_it_created(tmp_path):
  config = run_config(tmp_path / "no_catalogue")
  for workdir in (tmp_path / "new" / "run", tmp_path / "made_by_the_user"):
    if workdir.name == "made_by_the_user":
      workdir.mkdir()
    with pytest.raises(cat.CatalogueError, match=r"no_catalogue/tasks.json: missing\. Fix: "):
      train.train_and_evaluate(config, str(workdir))
  assert not (tmp_path / "new" / "run").exists()  # Created by the run, left empty: removed.
  assert (tmp_path / "new").is_dir()  # Its parents stay, as `mkdir -p` would leave them.
  assert (tmp_path / "made_by_the_user").is_dir() and not any(
      (tmp_path / "made_by_the_user").iterdir())


@pytest.mark.slow
def test_skipped_records_and_an_empty_validation_split_are_said_on_the_console(
    catalogue_dir, tmp_path, capsys):
  bad_catalogue(catalogue_dir, tmp_path / "catalogue")
  (tmp_path / "catalogue" / "validation.jsonl").write_text("")
  config = run_config(tmp_path / "catalogue", total_steps=2, **{"data.on_bad_record": "skip"})
  train.train_and_evaluate(config, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert ("Skipped bad records (data.on_bad_record=skip): train 4, validation 0, test 3"
          in out)
  assert "WARNING: the validation split is empty" in out
  page = (tmp_path / "run" / "reports" / "report.html").read_text()
  assert "skipped" in page.lower()


def _run_cli(args, cwd=ROOT, timeout=300):
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                        timeout=timeout, env=subprocess_env())


@pytest.mark.slow
@pytest.mark.parametrize("args,expected,status", [
    (["mtl_jax.main", "--config=configs/demo.py:tiny", "--config.optimizer.learning_rate=-1",
      "--workdir={tmp}/run"], "error: config.optimizer.learning_rate: ", 1),
    (["mtl_jax.main", "--config=configs/demo.py:tiny", "--config.optimizer.learnig_rate=0.1",
      "--workdir={tmp}/run"], "error: --config.optimizer.learnig_rate: no such config field", 2),
    (["mtl_jax.main", "--config=configs/demo.py:tiny", "--config.modle.dropout=0.1",
      "--workdir={tmp}/run"], "error: --config.modle.dropout: no such config field (misspelt "
     "fields are refused). Fix: did you mean --config.model.dropout?", 2),
    (["mtl_jax.synthetic", "--config=configs/demo.py:tiny", "--out={tmp}/file"],
     "error: {tmp}/file exists and is not a complete synthetic catalogue", 1),
    (["mtl_jax.main", "--config=configs/nosuch.py", "--workdir={tmp}/run"],
     "error: --config=configs/nosuch.py: no such config file in ", 2),
    (["mtl_jax.single_task", "--config=configs/demo.py:tiny", "--workdir={tmp}/single",
      "--config.total_step=5"], "error: --config.total_step: no such config field", 2),
    (["mtl_jax.single_task", "compare", "--mtl={tmp}/nothing", "--single={tmp}/nothing"],
     "error: {tmp}/nothing: no such run directory", 1),
    (["mtl_jax.synthetic", "--config=configs/nosuch.py", "--out={tmp}/catalogue"],
     "error: --config=configs/nosuch.py: no such config file in ", 2),
    (["mtl_jax.dry_run", "--config=configs/demo.py:tinny"],
     "error: --config: ValueError: Unknown variant 'tinny' of configs/demo.py: use one of", 2),
    (["mtl_jax.main", "--config=configs/demo.py:tiny", "--config.data.catalogue_dir={tmp}/bad",
      "--workdir={tmp}/run"], "error: {tmp}/bad/train.jsonl line ", 1),
    (["mtl_jax.predict", "--workdir={tmp}/nothing", "--input=x.jsonl", "--output=y.jsonl"],
     "error: --input=x.jsonl: no such file.", 1),
    (["mtl_jax.predict", "--workdir={tmp}/nothing", "--input={tmp}/file", "--output=y.jsonl"],
     "error: {tmp}/nothing: no checkpoints directory.", 1),
    (["mtl_jax.dypa", "--workdir={tmp}/nothing"], "error: {tmp}/nothing: no checkpoints", 1),
    (["mtl_jax.main", "--config=configs/demo.py:tiny", "--workdir={tmp}/file"],
     "error: --workdir={tmp}/file is a file, not a directory.", 1),
])
def test_user_errors_are_one_line_without_a_traceback(args, expected, status, catalogue_dir,
                                                      tmp_path):
  (tmp_path / "file").write_text("")
  bad_catalogue(catalogue_dir, tmp_path / "bad")
  proc = _run_cli([a.format(tmp=tmp_path) for a in args])
  assert proc.returncode == status, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and lines[0].startswith(expected.format(tmp=tmp_path)), proc.stderr
  assert "Fix" in lines[0] or status == 2, lines[0]
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sigterm_in_the_first_seconds_exits_0_with_a_message(catalogue_dir, tmp_path):
  args = main_args(tmp_path / "run", catalogue_dir, total_steps=400)
  with MainProcess(args, tmp_path / "err") as run:
    time.sleep(1.5)  # Still importing or preparing: before any step.
    run.signal(signal.SIGTERM)
    code = run.wait()
  assert code == 0, run.describe()
  assert re.search(r"Preempted (before step 1: nothing new to save|: checkpoint written)",
                   run.stdout), run.describe()
