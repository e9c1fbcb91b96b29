"""What every command line shares: absl flags, and errors a user can act on as one line.

Each entry point (`main`, `predict`, `new_task`, `single_task`, `dypa`, `dry_run`,
`image_encoder`) defines its flags with absl. An error that names a field, a file or a path and
its fix (a bad config value, a bad record, a damaged checkpoint, a workdir in use, ...) is
printed as `error: <message>` and the command exits with status 1; any other exception is a bug
and keeps its traceback.
"""
import sys

from absl import flags


def user_errors() -> tuple[type[BaseException], ...]:
  """The exception types whose message is the whole story (they name the fix)."""
  from mtl_jax import catalogue, checkpointing, config_base, train, workdir
  from mtl_jax import image_encoder, pretrained
  found = [catalogue.CatalogueError, checkpointing.CheckpointError, workdir.RunDirError,
           train.NonFiniteLossError, image_encoder.ImageLoadError,
           image_encoder.UnsafeCheckpointError]
  for module, name in ((config_base, "ConfigError"), (pretrained, "PretrainedError")):
    if hasattr(module, name):
      found.append(getattr(module, name))
  return tuple(found)


def report(error: BaseException) -> int:
  """Prints a user error as one line; returns the exit status."""
  message = " ".join(str(error).split())
  print(f"error: {message}", file=sys.stderr, flush=True)
  return 1


def run(main) -> None:
  """Runs `main(argv)` as a command: user errors as one line, exit status 1."""
  try:
    status = main(sys.argv[1:])
  except flags.Error as e:
    print(f"error: {e} (--help lists the flags)", file=sys.stderr, flush=True)
    sys.exit(2)
  except user_errors() as e:  # noqa: B030 (a tuple of classes, computed once here)
    sys.exit(report(e))
  sys.exit(status or 0)


def flag_values() -> flags.FlagValues:
  """A fresh set of flags for one command (commands are also called from Python and tests)."""
  return flags.FlagValues()


def parse(flag_values: flags.FlagValues, argv, prog: str) -> list[str]:
  """Parses `argv` (without the program name); `--help` prints the flags and exits."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--help" in argv or "-h" in argv or "--helpfull" in argv:
    print(f"usage: {prog} [flags]\n\n{flag_values.get_help()}")
    sys.exit(0)
  return flag_values([prog] + argv)[1:]
