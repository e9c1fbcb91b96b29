"""Trains and evaluates one multi-task model.

  python -m mtl_jax.main --config=configs/demo.py --workdir=runs/demo
"""
if __name__ == "__main__":  # First, before the heavy imports: see allocator.py.
  from mtl_jax import allocator
  allocator.reexec_under_tcmalloc()

from mtl_jax import preemption  # noqa: E402

preemption.install()  # Before the heavy imports: a SIGTERM in the first seconds exits cleanly.

import os  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mtl_jax import allocator  # noqa: E402
from mtl_jax import cli  # noqa: E402
from mtl_jax import train  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and reports go.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, if not auto-detected.")
flags.DEFINE_integer("num_processes", None,
                     "Number of processes (or $JAX_NUM_PROCESSES), if not auto-detected.")
flags.DEFINE_integer("process_id", None,
                     "This process's index (or $JAX_PROCESS_ID), if not auto-detected.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Progress and reports are printed; --v=0 for more.
  if FLAGS.distributed:
    env = lambda name: int(os.environ[name]) if name in os.environ else None
    jax.distributed.initialize(
        FLAGS.coordinator_address,
        FLAGS.num_processes if FLAGS.num_processes is not None else env("JAX_NUM_PROCESSES"),
        FLAGS.process_id if FLAGS.process_id is not None else env("JAX_PROCESS_ID"))
  logging.info("JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  if (jax.default_backend() == "cpu" and not allocator.preloaded()
      and not allocator.turned_off() and jax.process_index() == 0):
    print("Note: running without TCMalloc; CPU train steps are faster with it (apt-get install "
          "libtcmalloc-minimal4; see mtl_jax/allocator.py).", flush=True)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except cli.user_errors() as e:
    sys.exit(cli.report(e))


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: cli.parse_flags(FLAGS, argv))
