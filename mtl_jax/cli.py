"""What every command line shares: absl flags, and errors a user can act on as one line.

Each entry point (`main`, `predict`, `new_task`, `single_task`, `dypa`, `dry_run`,
`image_encoder`) defines its flags with absl. An error that names a field, a file or a path and
its fix (a bad config value, a bad record, a damaged checkpoint, a workdir in use, ...) is
printed as `error: <message>` and the command exits with status 1; any other exception is a bug
and keeps its traceback.
"""
import os
import re
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
  return parse_flags(flag_values, [prog] + argv)[1:]


def parse_flags(flag_values: flags.FlagValues, argv) -> list[str]:
  """absl's parsing of `argv` (with the program name), a `--config` file loaded too; a bad flag,
  config file or config override is said in one line with its fix and exits with status 2 (the
  flags are the user's input: a traceback would only hide the message)."""
  try:
    rest = flag_values(argv)
    if "config" in flag_values and flag_values.config is not None:
      flag_values.config.get("seed")  # Loaded lazily: a missing or broken file raises here.
    return rest
  except (AttributeError, KeyError) as e:  # An override of a config field that does not exist.
    text = str(e).replace("\\'", "'")
    missing = re.search(r"'([^'\\]+)", text)
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    # The override naming the missing field, at its end or as a group on the way to it.
    parts = next((a.split("=")[0].split(".") for a in argv if missing and a.startswith("--config.")
                  and missing.group(1) in a.split("=")[0].split(".")[1:]), None)
    flag = ".".join(parts) if parts else "--config override"
    fix = "use a field defined in mtl_jax/config_base.py"
    if suggestion and parts:
      at = len(parts) - 1 - parts[::-1].index(missing.group(1))
      fix = f"did you mean {'.'.join(parts[:at] + [suggestion.group(1)] + parts[at + 1:])}?"
    problem = f"{flag}: no such config field (misspelt fields are refused). Fix: {fix}"
  except (flags.Error, OSError, ValueError) as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    cause = e.__cause__
    if isinstance(cause, OSError) or "Failed loading config file" in str(e):
      given = next((a for a in argv if a.startswith("--config=")), "--config")
      problem = (f"{given}: no such config file in {os.getcwd()}. Fix: give the file's path "
                 "from the current directory (the README's commands run from the repository's "
                 "root) or an absolute path.")
    elif "Error whilst parsing config file" in str(e):
      problem = f"--config: {lines[-1]}"  # The file's own error (e.g. an unknown variant).
    else:
      problem = " ".join(lines) + " (--help lists the flags)"
  print(f"error: {' '.join(problem.split())}", file=sys.stderr, flush=True)
  sys.exit(2)
