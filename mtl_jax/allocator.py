"""Runs a command under TCMalloc where the machine has it.

XLA's CPU runtime allocates the step's temporaries (activations, the dense gradient of the word
embeddings, ...) on every execution and frees them after. glibc's malloc hands such large blocks
back to the kernel on free, so every step page-faults them in again (benchmarks/README.md,
"Our train step versus the usual PyTorch code", measures what that costs). TCMalloc keeps freed
memory for reuse.

`reexec_under_tcmalloc()` is the first statement of the training entry points: when a TCMalloc
library is installed (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`) and not yet
preloaded, it restarts the same command with `LD_PRELOAD` set, before anything heavy is imported.
`MTL_JAX_TCMALLOC=0` turns it off; `MTL_JAX_TCMALLOC=/path/to/libtcmalloc.so` names the library.
"""
import glob
import os
import sys

ENV_VAR = "MTL_JAX_TCMALLOC"
_CANDIDATES = ("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4",
               "/usr/lib/*-linux-gnu/libtcmalloc.so.4", "/usr/lib64/libtcmalloc_minimal.so.4",
               "/usr/lib64/libtcmalloc.so.4")


def turned_off() -> bool:
  """Whether the user turned preloading off ($MTL_JAX_TCMALLOC=0)."""
  return os.environ.get(ENV_VAR, "") == "0"


def tcmalloc_path() -> str | None:
  """The TCMalloc library to preload: $MTL_JAX_TCMALLOC, else the first one installed; None when
  turned off, not on Linux or not installed."""
  if turned_off() or not sys.platform.startswith("linux"):
    return None
  choice = os.environ.get(ENV_VAR, "")
  if choice:
    if not os.path.isfile(choice):
      raise FileNotFoundError(f"${ENV_VAR}={choice}: no such file. Fix: point it at an "
                              f"installed libtcmalloc*.so, or set {ENV_VAR}=0 to run without.")
    return choice
  found = [path for pattern in _CANDIDATES for path in sorted(glob.glob(pattern))]
  return found[0] if found else None


def preloaded(env=None) -> bool:
  """Whether `env`'s (default: this process's) LD_PRELOAD already names a TCMalloc."""
  return "tcmalloc" in (os.environ if env is None else env).get("LD_PRELOAD", "")


def with_tcmalloc(env: dict, path: str | None = None) -> dict:
  """`env` with TCMalloc preloaded (unchanged if it is already, or none is installed)."""
  path = path or tcmalloc_path()
  if path is None or preloaded(env):
    return dict(env)
  # TCMalloc reports every allocation over 1 GiB on stderr; a restored checkpoint is not news.
  return dict(env, LD_PRELOAD=" ".join(filter(None, [path, env.get("LD_PRELOAD", "")])),
              TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=env.get(
                  "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40)))


def reexec_under_tcmalloc() -> None:
  """Restarts this command (same PID and arguments) with TCMalloc added to LD_PRELOAD, when one
  is installed and not yet in use; otherwise returns."""
  if preloaded():
    return
  try:
    env = with_tcmalloc(dict(os.environ))
  except FileNotFoundError as e:  # A misnamed $MTL_JAX_TCMALLOC: one line, as every user error.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  if preloaded(env):  # The loader ignores a library it cannot load; the check ends any loop.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
