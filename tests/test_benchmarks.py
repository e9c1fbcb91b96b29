"""The benchmarks' own logic: the FLOPs formula, the trace summary, the fair optax baseline, and
the accelerator script end to end on CPU (`--smoke`), checked on the JSON it writes."""
import argparse
import gzip
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import common as bench_common
from mtl_jax import task_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_model_flops_formula_on_bert_base():
  from benchmarks import accelerator, common
  config = accelerator.make_config(smoke=False)
  spec = common.spec_from_config(config)
  flops = accelerator.model_flops(spec, config, config.batch_size)
  h, f, l, s, b = 768, 3072, 12, 68, 512
  assert (spec.hidden_size, spec.mlp_size, spec.num_layers, config.batch_size) == (h, f, l, b)
  assert flops["tokens_per_example"] == s
  assert flops["encoder_matmul_params"] == l * (4 * h * h + 2 * h * f) == 84_934_656
  assert flops["terms"]["encoder_matmuls"] == 6 * b * s * flops["encoder_matmul_params"]
  assert flops["terms"]["attention"] == 12 * b * l * s * s * h
  assert flops["terms"]["heads"] == 6 * b * h * 128
  # 6 x params x tokens dominates; the whole step is ~18 TFLOP.
  assert 17.5e12 < flops["total"] < 18.5e12
  assert flops["terms"]["encoder_matmuls"] / flops["total"] > 0.95


def _write_trace(directory, events):
  os.makedirs(directory)
  with gzip.open(os.path.join(directory, "perfetto_trace.json.gz"), "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_trace_summary_ranks_device_kernels_and_skips_the_host(tmp_path):
  from benchmarks import accelerator
  meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
          {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name",
           "args": {"name": "Stream #7(Compute)"}},
          {"ph": "M", "pid": 2, "tid": 8, "name": "thread_name",
           "args": {"name": "XLA Modules"}}]
  ops = [{"ph": "X", "pid": 2, "tid": 7, "name": "gemm", "dur": 30.0, "ts": i}
         for i in range(4)] + [
         {"ph": "X", "pid": 2, "tid": 7, "name": "fusion.1", "dur": 10.0, "ts": 9,
          "args": {"hlo_op": "fusion.1"}},
         {"ph": "X", "pid": 2, "tid": 8, "name": "jit_train_step", "dur": 500.0, "ts": 0},
         {"ph": "X", "pid": 1, "tid": 3, "name": "host_thing", "dur": 900.0, "ts": 0}]
  _write_trace(str(tmp_path / "plugins" / "profile" / "run"), meta + ops)
  out = accelerator.summarize_trace(str(tmp_path), steps=2)
  assert out["source"] == "device"
  assert [t["name"] for t in out["top_ops"]] == ["gemm", "fusion.1"]
  assert out["top_ops"][0]["ms_per_step"] == pytest.approx(0.06)
  assert out["top_ops"][0]["share"] == pytest.approx(120 / 130)
  assert out["top_ops"][1]["hlo_op"] == "fusion.1"
  assert out["busy_ms_per_step"] == pytest.approx(0.065)


@pytest.mark.slow
def test_optax_adamw_baseline_computes_the_dense_rowwise_update():
  """The "optax.adamw (dense)" row is the same AdamW as the dense row-wise code, only run by
  optax: after the same steps from the same state their parameters agree to float rounding."""
  from benchmarks import step_time_vs_tasks
  args = argparse.Namespace(modes="dense_rowwise,optax_adamw", steps=2, repeats=2,
                            warmup=1, batch_size=8, hidden=16, text_len=8, max_classes=8)
  rows = step_time_vs_tasks.measure([5], args)
  by_mode = {r["mode"]: r for r in rows}
  assert set(by_mode) == {"dense_rowwise", "optax_adamw"}
  assert by_mode["optax_adamw"]["max_abs_param_diff_vs_dense_rowwise"] < 1e-5
  for r in rows:
    assert len(r["round_ms"]) == 2 and all(len(t) == 2 for t in r["step_s"])
    assert r["step_ms"] == pytest.approx(float(np.median(r["round_ms"])))
    assert np.isfinite(r["last_loss"]) and r["temp_mb"] is not None
    assert r["head_params"] == 64 * (16 + 1) * 8  # 5 one-block tasks: the first 64 rows.
    assert r["head_params_padded"] == 5 * (16 + 1) * 8


@pytest.mark.slow
def test_accelerator_smoke_writes_every_section(tmp_path):
  out = tmp_path / "accelerator.json"
  proc = subprocess.run(
      [sys.executable, "benchmarks/accelerator.py", "--smoke", "--tasks=4,32",
       "--budget_s=1500", f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(out.read_text())
  meta = result["metadata"]
  assert meta["command"].startswith("python benchmarks/accelerator.py --smoke")
  assert meta["hardware"]["backend"] == "cpu" and "load_average_at_start" in meta["hardware"]
  assert "load_average_at_end" in meta and meta["versions"]["jax"]
  sections = result["sections"]
  statuses = {k: v["status"] for k, v in sections.items()}
  assert statuses.pop("torch") in ("ok", "error")
  assert statuses == {"device": "ok", "peak_matmul": "ok", "jax_step": "ok", "profile": "ok"}
  peak = sections["peak_matmul"]["tflops"]
  assert peak > 0
  jax_step = sections["jax_step"]
  assert [r["tasks"] for r in jax_step["rows"]] == [4, 32]
  total = jax_step["model_flops"]["total"]
  assert total == sum(jax_step["model_flops"]["terms"].values())
  for row in jax_step["rows"]:
    assert "error" not in row, row
    assert row["step_ms"] > 0 and row["compile_s"] > 0
    assert row["examples_per_s"] == pytest.approx(16 / (row["step_ms"] / 1e3))
    assert row["mfu"] == pytest.approx(total / (row["step_ms"] / 1e3) / 1e12 / peak)
    assert row["xla_flops_per_step"] > 0
    layout = task_layers.HeadLayout.for_classes(
        bench_common.long_tailed_classes(row["tasks"], 16), 8, 16)
    assert row["head_params"] == layout.num_rows * (32 + 1) * 8
  profile = sections["profile"]
  assert profile["tasks"] == 32 and profile["top_ops"]
  assert all(t["ms_per_step"] > 0 for t in profile["top_ops"])
  if importlib.util.find_spec("torch") is None:  # Recorded, not fatal.
    assert "torch" in sections["torch"]["error"]
    return
  torch_rows = sections["torch"]["rows"]
  assert {(r["variant"], r["tasks"]) for r in torch_rows} == {
      ("eager", 32), ("compile", 32), ("eager", 4)}
  for row in torch_rows:
    assert "error" not in row, row
    assert row["step_ms"] > 0 and row["mfu"] > 0
    assert row["encoder_params"] == jax_step["rows"][0]["encoder_params"]
  assert "device:" in proc.stdout and "MFU" in proc.stdout


def test_profile_names_each_op_by_its_model_code():
  from benchmarks import profile_step
  hlo = "\n".join([
      "%fused_computation.3 (param_0: f32[4]) -> f32[4] {",
      '  %m = f32[4]{0} multiply(%param_0, %param_0), metadata={op_name="jit(train_step)/'
      'transpose(jvp(Encoder))/closed_call/layers/mlp_in/dot_general"}',
      "}",
      "ENTRY %main.9 (p: f32[4]) -> f32[4] {",
      "  %fusion.3 = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused_computation.3",
      '  ROOT %add.1 = f32[4]{0} add(%fusion.3, %p), metadata={op_name="jit(train_step)/add"}',
      "}"])
  sources = profile_step.op_sources(hlo)
  assert sources["fusion.3"].endswith("layers/mlp_in/dot_general")  # From its computation.
  assert sources["add.1"] == "jit(train_step)/add"
  assert profile_step.module_of(sources["fusion.3"]) == "Encoder/layers/mlp_in"
  assert profile_step.module_of(
      "jit(train_step)/jvp(Encoder)/closed_call/layers/Dropout_0/jit(_bernoulli)/while") == (
          "Encoder/layers/Dropout_0")
  assert profile_step.module_of(sources["add.1"]) == "(outside the encoder)"


def test_vs_pytorch_runs_every_side_under_each_allocator():
  from benchmarks import vs_pytorch
  from mtl_jax import allocator
  if allocator.tcmalloc_path() is None:
    with pytest.raises(ValueError, match="libtcmalloc-minimal4"):
      vs_pytorch.side_envs({0}, ["default"], ["glibc", "tcmalloc"])
    return
  sides = vs_pytorch.side_envs({0}, ["default", "passive"], ["glibc", "tcmalloc"])
  assert [name for name, _, _ in sides] == [
      "ours", "torch", "torch_passive", "ours_tcmalloc", "torch_tcmalloc",
      "torch_passive_tcmalloc"]
  for name, _, env in sides:
    assert allocator.preloaded(env) == name.endswith("_tcmalloc")
  speeds = {"ours": 1.0, "torch": 3.0, "ours_tcmalloc": 2.0, "torch_tcmalloc": 2.5}
  rows = {k: {"examples_per_s": v} for k, v in speeds.items()}
  assert vs_pytorch._best(rows, "torch") == "torch"
  assert vs_pytorch._best(rows, "ours") == "ours_tcmalloc"
  assert vs_pytorch._best(rows, "torch", tcmalloc=True) == "torch_tcmalloc"
  assert vs_pytorch._best(rows, "ours", tcmalloc=False) == "ours"


def test_vs_pytorch_adds_a_side_of_ours_per_xla_flag_variant():
  from benchmarks import vs_pytorch
  variants = vs_pytorch.parse_flag_variants(
      "no_xnnpack=--xla_cpu_use_xnnpack=false;isa=--xla_cpu_max_isa=AVX2 --xla_cpu_enable_fast_math=true")
  assert variants == {"no_xnnpack": "--xla_cpu_use_xnnpack=false",
                      "isa": "--xla_cpu_max_isa=AVX2 --xla_cpu_enable_fast_math=true"}
  sides = {name: env for name, _, env in vs_pytorch.side_envs({0, 1}, ["default"], ["glibc"],
                                                               variants)}
  assert list(sides) == ["ours", "ours_no_xnnpack", "ours_isa", "torch"]
  assert sides["ours_isa"]["XLA_FLAGS"].endswith(
      "--xla_cpu_max_isa=AVX2 --xla_cpu_enable_fast_math=true")
  assert "--xla_cpu_use_xnnpack=false" not in sides["ours"].get("XLA_FLAGS", "")
  for bad in ("no_xnnpack", "2x=--xla_cpu_use_xnnpack=false", "x=xla_cpu_use_xnnpack"):
    with pytest.raises(ValueError, match="--xla_flag_variants"):
      vs_pytorch.parse_flag_variants(bad)
