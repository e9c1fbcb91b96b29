"""Multi-host data parallelism for real: two JAX processes on this machine against one.

Each process is a separate Python interpreter that joins a 2-process JAX system through
`jax.distributed.initialize` on localhost; collectives between them go through Gloo over TCP
(JAX's CPU cross-process collectives). Each process owns one CPU device, so the mesh is
`data=2` spread over two processes, exactly as two hosts with one accelerator each.

Everything runs in subprocesses with timeouts: the flags must be set before JAX starts, a
collective that hangs must fail the test rather than the suite, and each step is awaited so
only one collective program is in flight (ENV-NOTES: queued CPU collectives can deadlock).
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH = 16
STEPS = 4

# The common preamble: join the 2-process system if asked (argv: ... num_processes process_id
# port), with Gloo named explicitly (it is jax 0.10's default for CPU).
INIT = textwrap.dedent("""
    import json, os, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    num_processes, process_id, port = int(sys.argv[-3]), int(sys.argv[-2]), sys.argv[-1]
    if num_processes > 1:
      jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                                 num_processes=num_processes, process_id=process_id,
                                 initialization_timeout=120)
    assert jax.process_count() == num_processes and jax.local_device_count() == 1
""")

# The train step fed by hand: a fixed global batch per step, of which this process passes only
# the rows its device holds. argv: out.npz num_processes process_id port.
TRAINER_WORKER = INIT + textwrap.dedent(f"""
    import numpy as np
    from mtl_jax import steps
    from tests.helpers import random_batch, tiny_config, tiny_model
    trainer = tiny_model(tiny_config())
    assert trainer.mesh.shape["data"] == num_processes
    from jax.experimental import multihost_utils
    state = trainer.create_state(jax.random.key(0))
    local = lambda x: np.asarray(x.addressable_data(0))
    # Whole arrays on every process (a collective: called between awaited steps only).
    gathered = lambda tree: (multihost_utils.process_allgather(tree, tiled=True)
                             if num_processes > 1 else jax.tree.map(np.asarray, tree))
    # Data parallel: the encoder whole on each device, the heads split by task over `data`
    # (the default `task -> auto` rule) when there is more than one device.
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params["encoder"]))
    heads_spec = state.params["tasks"]["heads"]["kernel"].sharding.spec
    assert heads_spec[0] == ("data" if num_processes > 1 else None), heads_spec
    initial = gathered(state.params)
    step = steps.jitted_train_step(trainer, 1)
    # The rows of the global batch this process's device holds, as the sharding places them.
    (rows,) = trainer.batch_sharding.addressable_devices_indices_map(({GLOBAL_BATCH},)).values()
    rows = rows[0]
    losses, local_rows = [], []
    for i in range({STEPS}):
      whole = random_batch(i, batch_size={GLOBAL_BATCH})
      mine = {{k: v[rows] for k, v in whole.items()}}
      batch = trainer.global_batch(mine)
      assert batch["label"].shape == ({GLOBAL_BATCH},)
      np.testing.assert_array_equal(local(batch["label"]), whole["label"][rows])
      local_rows.append(len(mine["label"]))
      state, metrics = step(state, batch)
      jax.block_until_ready(state)  # One collective program in flight at a time.
      losses.append(float(metrics["loss"]))
    final = gathered(state.params)
    flat = lambda tree, tag: {{tag + jax.tree_util.keystr(p): x
                               for p, x in jax.tree_util.tree_leaves_with_path(tree)}}
    np.savez(sys.argv[1], losses=np.asarray(losses), local_rows=np.asarray(local_rows),
             **flat(initial, "initial"), **flat(final, "final"))
    if num_processes > 1:
      jax.distributed.shutdown()
""")

# The whole run: `train.train_and_evaluate` on the tiny demo config in a shared workdir.
# argv: workdir num_processes process_id port.
RUN_WORKER = INIT + textwrap.dedent("""
    from configs import demo
    from mtl_jax import train
    summary = train.train_and_evaluate(demo.get_config("tiny"), sys.argv[1])
    print("RESULT" + json.dumps({"pid": os.getpid(), "summary": summary}), flush=True)
    jax.distributed.shutdown()
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_together(commands, log_dir, timeout, collective_timeout=60):
  """Starts every command at once; returns their (returncode, stdout, stderr, pid).

  Output goes to files, not pipes: a process blocked on a full pipe would stall its peer in
  a collective. A collective waits at most `collective_timeout` seconds for its peers (Gloo's
  connection set-up too), so a hang fails instead of waiting for the test's timeout.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             # One device per process: no --xla_force_host_platform_device_count.
             XLA_FLAGS=f"--xla_cpu_collective_call_terminate_timeout_seconds="
                       f"{collective_timeout}")
  procs, logs = [], []
  for i, command in enumerate(commands):
    logs.append((log_dir / f"process{i}.out", log_dir / f"process{i}.err"))
    with open(logs[-1][0], "w") as out, open(logs[-1][1], "w") as err:
      procs.append(subprocess.Popen([sys.executable, "-c", *command], cwd=ROOT, env=env,
                                    stdout=out, stderr=err))
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [(p.returncode, out.read_text(), err.read_text(), p.pid)
          for p, (out, err) in zip(procs, logs)]


def _check_ok(results):
  for i, (code, out, err, _) in enumerate(results):
    assert code == 0, f"process {i} exited with {code}:\n{out[-2000:]}\n{err[-4000:]}"


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_whole_batch(tmp_path):
  """Two processes, each passing only its half of every global batch, train exactly as one
  process given the whole batch: same losses, same final parameters on both processes."""
  port = str(_free_port())
  outs = [tmp_path / "process0.npz", tmp_path / "process1.npz", tmp_path / "single.npz"]
  _check_ok(_run_together([
      (TRAINER_WORKER, str(outs[0]), "2", "0", port),
      (TRAINER_WORKER, str(outs[1]), "2", "1", port),
      (TRAINER_WORKER, str(outs[2]), "1", "0", "0"),  # The reference: one process, all rows.
  ], tmp_path, timeout=400))
  process0, process1, single = (dict(np.load(o)) for o in outs)
  assert list(process0["local_rows"]) == list(process1["local_rows"]) == [GLOBAL_BATCH // 2] * STEPS
  assert list(single["local_rows"]) == [GLOBAL_BATCH] * STEPS
  assert process0.keys() == single.keys()
  # Both processes hold the same replicated parameters, bit for bit.
  for key in process0:
    np.testing.assert_array_equal(process0[key], process1[key], err_msg=key)
  # Against one process: equal up to the order of the gradient all-reduce's float sums.
  np.testing.assert_allclose(process0["losses"], single["losses"], rtol=1e-5)
  finals = [k for k in single if k.startswith("final")]
  assert len(finals) > 10
  for key in finals:
    np.testing.assert_allclose(process0[key], single[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # The comparison is not vacuous: training moved the encoder and the heads.
  for key in ("['encoder']['pooler']['kernel']", "['tasks']['heads']['kernel']"):
    assert np.abs(single["final" + key] - single["initial" + key]).max() > 1e-4, key


@pytest.mark.slow
def test_two_process_run_writes_once_and_checkpoints_together(tmp_path):
  """`train_and_evaluate` in two processes sharing a workdir: process 0 alone prepares the data,
  prints, and writes the reports (JSON, HTML) and summaries; both take part in each Orbax
  checkpoint."""
  port = str(_free_port())
  workdir = tmp_path / "run"
  # Process 1 waits in a collective while process 0 generates and prepares the catalogue.
  results = _run_together([(RUN_WORKER, str(workdir), "2", str(i), port) for i in range(2)],
                          tmp_path, timeout=500, collective_timeout=240)
  _check_ok(results)
  outputs = []
  for _, out, _, pid in results:
    (line,) = [l for l in out.splitlines() if l.startswith("RESULT")]
    outputs.append(json.loads(line[len("RESULT"):]))
    assert outputs[-1]["pid"] == pid
  # Both processes evaluated the same global batches: the same summary.
  assert outputs[0]["summary"] == outputs[1]["summary"]
  assert outputs[0]["summary"]["tasks_evaluated"] == 6
  report = json.loads((workdir / "reports" / "test.json").read_text())
  assert report["summary"] == outputs[0]["summary"]
  # Only process 0 prepared the catalogue (and says so); process 1 opened its files.
  prepared = "(ArrayRecord shards) in "
  assert prepared in results[0][1] + results[0][2]
  assert prepared not in results[1][1] + results[1][2]
  # Only process 0 prints progress and tables, and writes the one event file.
  assert "step 6/6" in results[0][1] and "test at step 6: 6 tasks" in results[0][1]
  assert "step " not in results[1][1] and "test at step" not in results[1][1]
  assert "Report:" in results[0][1] and "Report:" not in results[1][1]
  assert (workdir / "reports" / "report.html").exists()
  events = [p.name for p in workdir.iterdir() if p.name.startswith("events.out.tfevents")]
  assert len(events) == 1 and f".{results[0][3]}." in events[0], events

  # Checkpoints (config: every 3 steps, 6 in all) committed, and readable by one process onto
  # its one device (a different topology from the one that wrote them).
  import jax
  import orbax.checkpoint as ocp
  from etils import epath
  mngr = ocp.CheckpointManager(
      epath.Path(workdir) / "checkpoints",
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})
  assert sorted(mngr.all_steps()) == [3, 6]
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = {}
  for step in (3, 6):
    metadata = mngr.item_metadata(step).state
    # Written from the 2-device mesh that spanned both processes.
    mesh_shape = jax.tree.leaves(metadata)[0].sharding.shape
    assert list(mesh_shape) == [2, 1], mesh_shape
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                          metadata)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    assert int(restored.state["step"]) == step
    assert restored.meta["data_iterator"]["next_step"] == step
    params[step] = np.asarray(restored.state["params"]["tasks"]["heads"]["kernel"])
    assert np.isfinite(params[step]).all()
  mngr.close()
  assert not np.array_equal(params[3], params[6])
