"""The dry run's counts against a hand count of the tiny demo config, on one device and on a
data=2 x model=2 mesh of fake CPU devices (where XLA's own memory analysis must agree)."""
import json
import os
import subprocess
import sys

import jax
import pytest

from configs import demo
from mtl_jax import dry_run, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_sizes(config):
  """Element counts written out from the architecture (model.py, task_layers.py, optim.py)."""
  m, d = config.model, config.data
  V = -(-d.vocab_size // 128) * 128  # train.model_spec pads the word table to a multiple of 128.
  L, H, M, N = d.max_text_len, m.hidden_size, m.mlp_size, m.num_layers
  D, K = d.synthetic.image_dim, d.synthetic.max_images
  T, A, r = d.synthetic.num_tasks, 1, m.adapter_size
  embeddings = (V * H + L * H + 2 * H  # Word, position, token-type tables.
                + D * H + H + K * H  # Image projection and image-slot table.
                + 2 * H)  # Embedding LayerNorm.
  layer = 4 * (H * H + H) + 2 * H + (H * M + M) + (M * H + H) + 2 * H
  pooler = H * H + H
  encoder = embeddings + N * layer + pooler
  # Heads: each task's drawn classes in blocks of b, rows allocated in multiples of 64.
  b = m.classes_per_block
  blocks = sum(-(-len(names) // b) for names in synthetic.task_class_names(d.synthetic))
  R = -(-blocks // 64) * 64
  heads = R * H * b + R * b
  adapters = A * m.adapter_layers * (2 * H * r + r + H)
  # With model=2, these are split over the model axis (config_base sharding rules: vocab, heads
  # and mlp -> model): the word table, q/k/v/out kernels and q/k/v biases, the MLP and pooler.
  model_split = V * H + N * (4 * H * H + 3 * H + H * M + M + M * H) + H * H + H
  return {
      "encoder": encoder, "task heads": heads, "adapters": adapters,
      # AdamW: mu and nu like the parameters, plus Adam's and the schedule's step counters.
      "encoder optimizer": 2 * encoder + 2,
      # Row-wise AdamW: mu and nu, plus one step counter per row.
      "heads optimizer": 2 * heads + R, "adapters optimizer": 2 * adapters + A,
      "bookkeeping": 1 + T + T,  # step, adapter_map, num_classes.
      "model_split": model_split,
  }


def test_counts_match_a_hand_count_on_one_device():
  config = demo.get_config("tiny")
  summary = dry_run.summarize(config, jax.devices()[:1])
  expected = tiny_sizes(config)
  groups = {g["name"]: g for g in summary["groups"]}
  assert list(groups) == [name for name, _ in dry_run.GROUPS]
  for name, group in groups.items():
    assert group["count"] == expected[name], (name, group, expected[name])
    assert group["bytes"] == group["bytes_per_device"] == 4 * expected[name], name  # fp32/int32
  assert summary["params"]["count"] == expected["encoder"] + expected["task heads"] + \
      expected["adapters"]
  assert summary["state"]["count"] == sum(g["count"] for g in summary["groups"])
  # A batch: token ids and mask [B, L], images [B, K, D], image mask [B, K], task id, label.
  d, b = config.data, config.batch_size
  assert summary["batch"]["count"] == b * (2 * d.max_text_len + d.synthetic.max_images * (
      d.synthetic.image_dim + 1) + 2)
  assert summary["compiled"] is None


def test_adapter_slots_grow_only_the_adapter_groups():
  config = demo.get_config("tiny")
  one, five = (dry_run.summarize(config, jax.devices()[:1], n)["groups"] for n in (1, 5))
  for a, b in zip(one, five):
    if a["name"] == "adapters":
      assert b["count"] == 5 * a["count"]
    elif a["name"] == "adapters optimizer":
      assert b["count"] == 5 * (a["count"] - 1) + 5
    else:
      assert a == b


def test_a_dimension_the_mesh_does_not_divide_is_named():
  mesh = jax.sharding.AbstractMesh((2, 2), ("data", "model"))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model", None))
  assert dry_run.per_device_shape("table", split, (1000, 32)) == (500, 32)
  with pytest.raises(ValueError, match=r"table of shape \(1001, 32\) is split 2 ways along "
                     r"dimension 0 \(mesh axes \('model',\)\).*vocab_size"):
    dry_run.per_device_shape("table", split, (1001, 32))


def test_mesh_shards_per_device_bytes_and_matches_xla(tmp_path):
  """The CLI on 4 fake devices (data=2 x model=2), with the compiled step's argument bytes as
  the independent check."""
  out = tmp_path / "summary.json"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "mtl_jax.dry_run", "--config=configs/demo.py:tiny",
       "--num_devices=4", "--config.mesh.model=2", "--compile",
       f"--json={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh data=2 x model=2 (4 devices)" in proc.stdout
  summary = json.loads(out.read_text())
  expected = tiny_sizes(demo.get_config("tiny"))
  groups = {g["name"]: g for g in summary["groups"]}
  encoder_per_device = expected["encoder"] - expected["model_split"] // 2
  assert groups["encoder"]["bytes_per_device"] == 4 * encoder_per_device
  assert groups["encoder optimizer"]["bytes_per_device"] == 4 * (2 * encoder_per_device + 2)
  # The default `task -> auto` rule splits the head blocks (and their row-wise AdamW state)
  # over data=2: they are more than a tenth of the encoder. Adapters stay whole.
  assert summary["heads_split_over"] == "data"
  assert "task heads and their optimizer state: split by block row over 'data'" in proc.stdout
  for name in ("task heads", "heads optimizer"):
    assert groups[name]["bytes_per_device"] == groups[name]["bytes"] // 2, name
  for name in ("adapters", "adapters optimizer"):
    assert groups[name]["bytes_per_device"] == groups[name]["bytes"], name  # Replicated.
  fit = summary["fit"]
  assert fit["fits"] and fit["includes_temporaries"] and fit["device_bytes"] == 16 * 2**30
  assert fit["needed_bytes"] == (summary["state"]["bytes_per_device"] + summary["batch"][
      "bytes_per_device"] + summary["compiled"]["temp_size_in_bytes"])
  assert "FITS a 16.00 GiB device" in proc.stdout
  assert summary["batch"]["bytes_per_device"] == summary["batch"]["bytes"] // 2  # data=2.
  # XLA's per-device program takes exactly the state and the batch shard as arguments.
  compiled = summary["compiled"]
  assert compiled["argument_size_in_bytes"] == (summary["state"]["bytes_per_device"]
                                                + summary["batch"]["bytes_per_device"])
  assert compiled["temp_size_in_bytes"] > 0


def test_a_state_too_big_for_the_device_says_so():
  summary = dry_run.summarize(demo.get_config("tiny"), jax.devices()[:1], device_memory_gib=1e-4)
  assert not summary["fit"]["fits"]
  assert "DOES NOT FIT a 104.86 KiB device" in dry_run.format_table(summary)


def run_dry_run(*flags, env=None):
  """The CLI on the tiny demo config, as a user runs it."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run(
      [sys.executable, "-m", "mtl_jax.dry_run", "--config=configs/demo.py:tiny", *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.slow  # A process each (~10 s); check_flags' own test below is quick.
@pytest.mark.parametrize("flags, named", [
    # Config and data errors the library raises: one line, not a traceback.
    (["--num_devices=3"], "config.batch_size"),
    (["--num_devices=8", "--config.mesh.model=3"], "config.mesh: data=-1 x model=3"),
    (["--config.data.catalogue_dir=/nonexistent/catalogue"], "/nonexistent/catalogue"),
    # A flag value refused before any work starts (every other case: check_flags' own test).
    (["--device_memory_gib=0"], "--device_memory_gib=0"),
    # Would take minutes to create 100000 fake CPU devices: refused before any backend starts.
    (["--num_devices=100000"], "--num_devices=100000"),
])
def test_a_user_error_is_one_line_with_its_fix(flags, named):
  proc = run_dry_run(*flags)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr
  assert named in errors[0] and "Fix:" in errors[0], errors[0]


def test_flags_are_checked_before_any_work():
  """The checks themselves, without a process: the bounds of each flag."""
  dry_run.check_flags(0, 1, 16.0, "")
  dry_run.check_flags(dry_run.MAX_DEVICES, 5, 0.5, "summary.json")
  with pytest.raises(dry_run.FlagError, match=r"--num_devices=-1: .*negative.*Fix: give 0"):
    dry_run.check_flags(-1, 1, 16.0, "")
  with pytest.raises(dry_run.FlagError, match=r"--num_devices=16385: .*Fix: .*1 to 16384"):
    dry_run.check_flags(dry_run.MAX_DEVICES + 1, 1, 16.0, "")
  with pytest.raises(dry_run.FlagError, match=r"--device_memory_gib=nan: .*Fix:"):
    dry_run.check_flags(0, 1, float("nan"), "")
  with pytest.raises(dry_run.FlagError, match=r"--device_memory_gib=-1.0: .*Fix:"):
    dry_run.check_flags(0, 1, -1.0, "")
  for slots in (0, -2):
    with pytest.raises(dry_run.FlagError, match=rf"--adapter_slots={slots}: .*Fix: give 1"):
      dry_run.check_flags(0, slots, 16.0, "")
  with pytest.raises(dry_run.FlagError, match=r"--json=/tmp: is a directory. Fix: "):
    dry_run.check_flags(0, 1, 16.0, "/tmp")
  with pytest.raises(dry_run.FlagError, match=r"--json=/nonexistent/s.json: its directory .*Fix:"):
    dry_run.check_flags(0, 1, 16.0, "/nonexistent/s.json")
