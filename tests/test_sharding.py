"""The same steps on 1 device and on an 8-device (data=4 x model=2) fake CPU mesh.

Runs in a subprocess: fake-device collectives on a 2-core machine can abort the process, so the
suite must survive that, and the flags must be set before JAX starts. Each step is awaited
(one collective program in flight), which is what keeps these runs from deadlocking.
"""
import json
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from mtl_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, sys, jax, numpy as np
    from mtl_jax import steps
    from tests.helpers import random_batch, tiny_config, tiny_model
    assert jax.device_count() == 8
    out = {}
    default_rules = tiny_config().sharding_rules
    # FSDP-style: parameters' embed axis over `data` as well, and the heads split by task.
    fsdp_rules = tuple((k, "data") if k == "embed" else (k, "model") if k == "task" else (k, v)
                       for k, v in default_rules)
    # "auto": the default rules on a 2 x 2 mesh: the head blocks are split by row over `data`.
    for name, devices, data, model, rules in [("one", jax.devices()[:1], 1, 1, default_rules),
                                              ("mesh", jax.devices(), 4, 2, default_rules),
                                              ("fsdp", jax.devices(), 4, 2, fsdp_rules),
                                              ("auto", jax.devices()[:4], 2, 2, default_rules)]:
      config = tiny_config(**{"mesh.data": data, "mesh.model": model, "model.dropout": 0.0,
                              "model.num_heads": 2, "sharding_rules": rules})
      model = tiny_model(config, devices=devices)
      state = model.create_state(jax.random.key(0))
      step = steps.jitted_train_step(model, 1)
      losses = []
      for i in range(4):
        state, metrics = step(state, model.global_batch(random_batch(i)))
        jax.block_until_ready(state)
        losses.append(float(metrics["loss"]))
      kernel = state.params["encoder"]["layers"]["mlp_in"]["kernel"]
      heads = state.params["tasks"]["heads"]["kernel"]
      out[name] = {"losses": losses, "sharding": str(kernel.sharding.spec),
                   "heads_sharding": str(heads.sharding.spec)}
      # Whole arrays, gathered to the host: a permuted or misplaced shard cannot pass.
      np.savez(f"{sys.argv[1]}/{name}.npz", **{
          jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
          for p, x in jax.tree_util.tree_leaves_with_path(state.params)})
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_eight_device_mesh_matches_one_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             "--xla_cpu_collective_call_terminate_timeout_seconds=15",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
  out = json.loads(line[len("RESULT"):])
  # The mlp kernel really is split over the model axis on the mesh.
  assert "model" in out["mesh"]["sharding"], out["mesh"]["sharding"]
  assert out["fsdp"]["sharding"] == "P(None, 'data', 'model')", out["fsdp"]
  assert out["fsdp"]["heads_sharding"] == "P('model', 'data', None)", out["fsdp"]
  assert out["auto"]["heads_sharding"] == "P('data', None, None)", out["auto"]
  # Head block rows come in multiples of 64, so they split 4 ways too.
  assert out["mesh"]["heads_sharding"] == "P('data', None, None)", out["mesh"]
  for name in ("mesh", "fsdp", "auto"):
    for a, b in zip(out["one"]["losses"], out[name]["losses"]):
      assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (name, out["one"]["losses"],
                                                     out[name]["losses"])
    one, other = np.load(tmp_path / "one.npz"), np.load(tmp_path / f"{name}.npz")
    assert sorted(one.files) == sorted(other.files)
    for key in one.files:
      np.testing.assert_allclose(other[key], one[key], rtol=1e-4, atol=1e-6,
                                 err_msg=f"{name} {key}")


@pytest.mark.parametrize("data,num_rows,head_params,expected", [
    (4, 8, 100, "data"),     # Divides, and the heads are at least a tenth of the encoder.
    (4, 8, 99, None),        # Heads too small to be worth splitting.
    (4, 6, 10_000, None),    # 6 rows do not split evenly 4 ways.
    (1, 8, 10_000, None),    # Nothing to split over.
])
def test_task_auto_rule(data, num_rows, head_params, expected):
  mesh = types.SimpleNamespace(shape={"data": data, "model": 1})
  rules = sharding.resolve_rules((("batch", "data"), ("task", "auto"), ("adapter", None)), mesh,
                                 num_rows, head_params=head_params, encoder_params=1000)
  assert rules == (("batch", "data"), ("task", expected), ("adapter", None))


def test_auto_is_only_for_the_task_axis():
  mesh = types.SimpleNamespace(shape={"data": 2, "model": 1})
  with pytest.raises(ValueError, match="only 'task' may be 'auto'"):
    sharding.resolve_rules((("embed", "auto"),), mesh, 2, head_params=1, encoder_params=1)
