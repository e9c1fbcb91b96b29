"""TCMalloc preloading (mtl_jax/allocator.py): the environment it builds, when it restarts a
command, and that a restarted command really runs with it."""
import os
import subprocess
import sys

import pytest

from mtl_jax import allocator


def test_env_gains_the_library_and_keeps_other_preloads(tmp_path):
  lib = tmp_path / "libtcmalloc_minimal.so.4"
  lib.write_bytes(b"")
  env = allocator.with_tcmalloc({"LD_PRELOAD": "/opt/other.so"}, str(lib))
  assert env["LD_PRELOAD"] == f"{lib} /opt/other.so"
  assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
  assert allocator.preloaded(env)
  # Already preloaded: nothing changes.
  assert allocator.with_tcmalloc(env, str(lib)) == env


def test_turned_off_or_misnamed(monkeypatch, tmp_path):
  monkeypatch.setenv(allocator.ENV_VAR, "0")
  assert allocator.tcmalloc_path() is None
  assert allocator.with_tcmalloc({"PATH": "/bin"}) == {"PATH": "/bin"}
  monkeypatch.setenv(allocator.ENV_VAR, str(tmp_path / "missing.so"))
  with pytest.raises(FileNotFoundError, match=f"{allocator.ENV_VAR}=.*missing.so.*Fix"):
    allocator.tcmalloc_path()


_CODE = ("from mtl_jax import allocator; allocator.reexec_under_tcmalloc(); "
         "print(any('tcmalloc' in line for line in open('/proc/self/maps')))")


def _runs_with_tcmalloc(env) -> bool:
  """Whether a command that calls reexec_under_tcmalloc() first ends up with TCMalloc mapped."""
  out = subprocess.run([sys.executable, "-c", _CODE], env=env, check=True, capture_output=True,
                       text=True).stdout
  return out.strip() == "True"


def test_restart_runs_under_tcmalloc_where_installed():
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV_VAR)}
  # .ci/run installs libtcmalloc-minimal4; without it the command runs on as it was.
  assert _runs_with_tcmalloc(env) == (allocator.tcmalloc_path() is not None)
  assert not _runs_with_tcmalloc(dict(env, **{allocator.ENV_VAR: "0"}))
  # A misnamed library: one error line with the fix, exit status 2, nothing run.
  result = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True,
                          env=dict(env, **{allocator.ENV_VAR: "/nonexistent/libtcmalloc.so"}))
  assert result.returncode == 2 and not result.stdout
  assert result.stderr.strip().splitlines() == [
      f"error: ${allocator.ENV_VAR}=/nonexistent/libtcmalloc.so: no such file. Fix: point it at "
      f"an installed libtcmalloc*.so, or set {allocator.ENV_VAR}=0 to run without."]
