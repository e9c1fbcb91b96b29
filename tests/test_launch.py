"""The launch scripts in launch/: syntax, shellcheck, dry runs, and clear errors.

Nothing here calls gcloud, srun or a GPU: every external command the scripts could run is a stub
on PATH that records that it was called, and the dry runs must not call any of them (except
`scontrol show hostnames`, which the SLURM script reads the hosts from). One test runs the SLURM
script for real against a fake `srun` that starts the tasks on this machine. The SLURM example of
launch/README.md runs exactly as written with no scontrol on PATH, and must print what the README
shows.
"""
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["tpu_vm.sh", "gpu_single_host.sh", "slurm_multi_node.sh"]
MAIN_CMD = "python -m mtl_jax.main --config=configs/mtl1000.py"
NODES = ["gpu-001", "gpu-002", "gpu-003", "gpu-004"]
SLURM_ENV = {
    "SLURM_JOB_ID": "12345",
    "SLURM_JOB_NODELIST": "gpu-[001-004]",
    "SLURM_JOB_NUM_NODES": "4",
    "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_PROCID": "0",
}
# 61440 + 12345 % 4096
SLURM_PORT = 61497


def _write_exe(path, text):
  with open(path, "w") as f:
    f.write(textwrap.dedent(text).lstrip())
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def stubs(tmp_path):
  """A bin/ of fake external commands; each appends its argv to calls/NAME when run."""
  bin_dir = tmp_path / "bin"
  calls = tmp_path / "calls"
  bin_dir.mkdir()
  calls.mkdir()
  for name in ("gcloud", "srun", "sbatch"):
    _write_exe(bin_dir / name, f"""
        #!/bin/sh
        echo "$*" >> {calls}/{name}
        echo "stub {name} must not run in a dry run" >&2
        exit 99
        """)
  _write_exe(bin_dir / "scontrol", f"""
      #!/bin/sh
      echo "$*" >> {calls}/scontrol
      [ "$1 $2" = "show hostnames" ] || exit 2
      printf '%s\\n' {' '.join(NODES)}
      """)
  _write_exe(bin_dir / "nvidia-smi", """
      #!/bin/sh
      case "$*" in
        *driver_version*) echo "${FAKE_DRIVER:-580.65.06}" ;;
        *--list-gpus*) for i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA H100 80GB HBM3"; done ;;
        *) exit 1 ;;
      esac
      """)
  return bin_dir, calls


@pytest.fixture
def repo(tmp_path):
  """A stand-in checkout: mtl_jax/, configs/mtl1000.py, and a git repository for the TPU copy."""
  d = tmp_path / "repo"
  (d / "mtl_jax").mkdir(parents=True)
  (d / "configs").mkdir()
  (d / "mtl_jax" / "__init__.py").write_text("")
  (d / "configs" / "mtl1000.py").write_text("def get_config(variant=''):\n  pass\n")
  (d / "setup.py").write_text("")
  if shutil.which("git"):
    subprocess.run(["git", "init", "-q", str(d)], check=True)
  return d


def run_script(script, args, stubs, env=None, cwd=None, timeout=60):
  bin_dir, _ = stubs
  full_env = {
      "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
      "HOME": str(bin_dir.parent / "home"),
      "TMPDIR": str(bin_dir.parent),
      "LANG": "C.UTF-8",
  }
  full_env.update(env or {})
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=full_env,
                        cwd=cwd or str(bin_dir.parent), capture_output=True, text=True,
                        timeout=timeout)


def called(stubs, name):
  path = stubs[1] / name
  return path.read_text().splitlines() if path.exists() else []


def commands(stdout):
  """The printed commands; a dry run prints nothing else on stdout."""
  lines = stdout.splitlines()
  assert lines, "the dry run printed no command"
  for line in lines:
    assert line.startswith("+ "), f"not a '+ ' command line: {line!r}"
  return [line[2:] for line in lines]


def assert_shell_syntax(cmd):
  """A printed command parses as shell, and so does any --command= run on the TPU workers."""
  check = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
  assert check.returncode == 0, f"{cmd!r}: {check.stderr}"
  for word in shlex.split(cmd):
    if word.startswith("--command="):
      assert_shell_syntax(word[len("--command="):])


def find(cmds, needle):
  hits = [c for c in cmds if needle in c]
  assert hits, f"no command contains {needle!r}:\n" + "\n".join(cmds)
  return hits


# --- All scripts -------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
  path = os.path.join(LAUNCH, script)
  assert os.access(path, os.X_OK), f"{script} is not executable"
  result = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
  if not shutil.which("shellcheck"):
    pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
  result = subprocess.run(["shellcheck", os.path.join(LAUNCH, script)], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, stubs):
  for flag in ("-h", "--help"):
    result = run_script(script, [flag], stubs)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "--dry-run" in result.stdout
    assert "WORKDIR" in result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_option_fails(script, stubs):
  result = run_script(script, ["--bogus"], stubs)
  assert result.returncode != 0
  assert "--bogus" in result.stderr


# --- tpu_vm.sh ---------------------------------------------------------------------------------

def test_tpu_dry_run_all(stubs, repo):
  if not shutil.which("git"):
    pytest.skip("git is not installed: the copy mode lists files with git")
  result = run_script("tpu_vm.sh", ["--dry-run", "all"], stubs, env={
      "REPO_DIR": str(repo), "WORKDIR": "gs://bucket/run", "ACCELERATOR_TYPE": "v4-32",
      "TPU_NAME": "my-tpu", "ZONE": "us-central2-b", "PROJECT": "my-proj"})
  assert result.returncode == 0, result.stderr
  cmds = commands(result.stdout)
  for cmd in cmds:
    assert_shell_syntax(cmd)
  assert cmds[0] == ("gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b "
                     "--project=my-proj --accelerator-type=v4-32 --version=tpu-ubuntu2204-base")
  find(cmds, "git ls-files")
  find(cmds, "gcloud compute tpus tpu-vm scp")
  install = find(cmds, "pip install -e . \"jax[tpu]==0.10.2\"")[0]
  assert "--worker=all" in install
  train = find(cmds, MAIN_CMD)[0]
  assert train.startswith("gcloud compute tpus tpu-vm ssh my-tpu ")
  assert "--worker=all" in train
  assert "--workdir=gs://bucket/run --distributed" in train
  logs = find(cmds, "tail ")[0]
  assert "--worker=0" in logs
  assert cmds[-1] == "gcloud compute tpus tpu-vm delete my-tpu --zone=us-central2-b --project=my-proj --quiet"
  assert called(stubs, "gcloud") == []


def test_tpu_dry_run_env_var_clone_and_extra_flags(stubs):
  result = run_script("tpu_vm.sh", ["train", "--", "--config.batch_size=1024",
                                    "--config.name=a b"], stubs, env={
      "DRY_RUN": "1", "WORKDIR": "gs://bucket/run", "REPO_URL": "https://example.com/mtl.git",
      "REPO_REF": "v1", "EXTRA_FLAGS": "--config.num_steps=10 --config.seed=3"})
  assert result.returncode == 0, result.stderr
  cmds = commands(result.stdout)
  assert len(cmds) == 1
  assert_shell_syntax(cmds[0])
  remote = shlex.split(cmds[0])[-1]
  assert remote.startswith("--command=")
  assert (MAIN_CMD + " --workdir=gs://bucket/run --distributed --config.num_steps=10 "
          "--config.seed=3 --config.batch_size=1024 '--config.name=a b'") in remote
  assert called(stubs, "gcloud") == []

  result = run_script("tpu_vm.sh", ["--dry-run", "install"], stubs, env={
      "REPO_URL": "https://example.com/mtl.git", "REPO_REF": "v1"})
  assert result.returncode == 0, result.stderr
  (install,) = commands(result.stdout)
  assert "git clone --quiet https://example.com/mtl.git $HOME/mtl_jax" in install
  assert "checkout --quiet v1" in install
  assert_shell_syntax(install)


@pytest.mark.parametrize("accel,runtime", [("v4-8", "tpu-ubuntu2204-base"),
                                           ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                           ("v5p-32", "v2-alpha-tpuv5"),
                                           ("v6e-8", "v2-alpha-tpuv6e")])
def test_tpu_runtime_defaults(stubs, accel, runtime):
  result = run_script("tpu_vm.sh", ["-n", "create"], stubs, env={"ACCELERATOR_TYPE": accel})
  assert result.returncode == 0, result.stderr
  assert f"--accelerator-type={accel} --version={runtime}" in result.stdout


def test_tpu_create_and_delete_need_no_workdir(stubs):
  for command in ("create", "delete", "logs"):
    result = run_script("tpu_vm.sh", ["--dry-run", command], stubs)
    assert result.returncode == 0, result.stderr
    commands(result.stdout)


def test_tpu_missing_workdir(stubs):
  for command in ("train", "all"):
    result = run_script("tpu_vm.sh", ["--dry-run", command], stubs,
                        env={"REPO_URL": "https://example.com/mtl.git"})
    assert result.returncode != 0
    assert "WORKDIR" in result.stderr
    assert result.stdout == ""  # Checked before anything (create included) is run.


def test_tpu_pod_needs_gcs_workdir(stubs):
  result = run_script("tpu_vm.sh", ["--dry-run", "train"], stubs, env={
      "WORKDIR": "/tmp/run", "ACCELERATOR_TYPE": "v4-32", "REPO_URL": "u"})
  assert result.returncode != 0
  assert "WORKDIR" in result.stderr and "gs://" in result.stderr
  # One host (v4-8) may keep its workdir on the VM, at an absolute path: a relative one would
  # be inside ~/mtl_jax, which `install` replaces.
  result = run_script("tpu_vm.sh", ["--dry-run", "train"], stubs, env={
      "WORKDIR": "/home/me/runs/x", "ACCELERATOR_TYPE": "v4-8", "REPO_URL": "u"})
  assert result.returncode == 0, result.stderr
  assert "--workdir=/home/me/runs/x --distributed" in result.stdout
  result = run_script("tpu_vm.sh", ["--dry-run", "train"], stubs, env={
      "WORKDIR": "runs/x", "ACCELERATOR_TYPE": "v4-8", "REPO_URL": "u"})
  assert result.returncode != 0 and "WORKDIR=runs/x" in result.stderr


def test_tpu_bad_settings(stubs, repo):
  cases = [
      ({"TPU_NAME": "Bad_Name"}, "create", "TPU_NAME"),
      ({"ACCELERATOR_TYPE": "v4"}, "create", "ACCELERATOR_TYPE"),
      ({"ACCELERATOR_TYPE": "tpu9-8"}, "create", "RUNTIME_VERSION"),
      ({"REPO_DIR": str(repo / "mtl_jax")}, "install", "REPO_DIR"),
      ({"REPO_DIR": str(repo), "WORKDIR": "gs://b/r", "CONFIG": "configs/nope.py"}, "train",
       "CONFIG"),
  ]
  for env, command, name in cases:
    result = run_script("tpu_vm.sh", ["--dry-run", command], stubs, env=env)
    assert result.returncode != 0, (env, result.stdout)
    assert name in result.stderr, (env, result.stderr)
  result = run_script("tpu_vm.sh", ["--dry-run"], stubs)
  assert result.returncode != 0 and "COMMAND" in result.stderr
  result = run_script("tpu_vm.sh", ["--dry-run", "launch"], stubs)
  assert result.returncode != 0 and "launch" in result.stderr


# --- gpu_single_host.sh ------------------------------------------------------------------------

def test_gpu_dry_run_all(stubs, repo):
  result = run_script("gpu_single_host.sh", ["--dry-run", "all"], stubs,
                      env={"REPO_DIR": str(repo), "WORKDIR": "runs/mtl1000"})
  assert result.returncode == 0, result.stderr
  install, train = commands(result.stdout)
  for cmd in (install, train):
    assert_shell_syntax(cmd)
  assert install == "python -m pip install -e . 'jax[cuda13]==0.10.2'"
  assert (MAIN_CMD + " --workdir=runs/mtl1000") in train
  assert train.endswith("--workdir=runs/mtl1000")  # One process: no --distributed.
  env_words = shlex.split(train)
  assert env_words[0] == "env"
  xla = [w for w in env_words if w.startswith("XLA_FLAGS=")][0]
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in xla
  assert "580.65.06" in result.stderr  # The driver was checked (read-only, also in a dry run).
  assert called(stubs, "gcloud") == [] and called(stubs, "srun") == []


def test_gpu_dry_run_options(stubs, repo):
  result = run_script("gpu_single_host.sh", ["train", "--", "--config.batch_size=64"], stubs, env={
      "DRY_RUN": "1", "REPO_DIR": str(repo), "WORKDIR": "gs://b/run", "JAX_CUDA": "cuda12",
      "FAKE_DRIVER": "550.54.14", "XLA_FLAGS": "--xla_dump_to=/tmp/dump",
      "EXTRA_FLAGS": "--config.seed=1", "PYTHON": "python3.11"})
  assert result.returncode == 0, result.stderr
  (train,) = commands(result.stdout)
  assert ("python3.11 -m mtl_jax.main --config=configs/mtl1000.py --workdir=gs://b/run "
          "--config.seed=1 --config.batch_size=64") in train
  xla = [w for w in shlex.split(train) if w.startswith("XLA_FLAGS=")][0]
  assert xla.endswith(" --xla_dump_to=/tmp/dump")  # The user's flags come last.

  result = run_script("gpu_single_host.sh", ["-n", "install"], stubs, env={
      "REPO_DIR": str(repo), "JAX_CUDA": "cuda12", "FAKE_DRIVER": "550.54.14"})
  assert result.returncode == 0, result.stderr
  assert commands(result.stdout) == ["python -m pip install -e . 'jax[cuda12]==0.10.2'"]

  result = run_script("gpu_single_host.sh", ["-n", "train"], stubs, env={
      "REPO_DIR": str(repo), "WORKDIR": "runs/x", "MTL_XLA_DEFAULTS": "0"})
  assert result.returncode == 0, result.stderr
  assert "XLA_FLAGS" not in result.stdout


def test_gpu_errors(stubs, repo):
  cases = [
      ({}, "train", "WORKDIR"),
      ({"WORKDIR": "runs/x", "CONFIG": "configs/missing.py"}, "train", "CONFIG"),
      ({"JAX_CUDA": "cuda11"}, "install", "JAX_CUDA"),
      ({"FAKE_DRIVER": "550.54.14"}, "install", "JAX_CUDA=cuda12"),  # cuda13 needs >= 580.
      ({"REPO_DIR": str(repo / "configs")}, "install", "REPO_DIR"),
  ]
  for env, command, name in cases:
    result = run_script("gpu_single_host.sh", ["--dry-run", command], stubs,
                        env={"REPO_DIR": str(repo), **env})
    assert result.returncode != 0, (env, result.stdout)
    assert name in result.stderr, (env, result.stderr)
    assert result.stdout == ""


# --- slurm_multi_node.sh -----------------------------------------------------------------------

def test_slurm_dry_run(stubs, repo):
  result = run_script("slurm_multi_node.sh", ["--dry-run", "--", "--config.batch_size=2048"],
                      stubs, env={**SLURM_ENV, "REPO_DIR": str(repo), "WORKDIR": "gs://b/run"})
  assert result.returncode == 0, result.stderr
  cmds = commands(result.stdout)
  for cmd in cmds:
    assert_shell_syntax(cmd)
  assert f"export JAX_COORDINATOR_ADDRESS=gpu-001:{SLURM_PORT}" in cmds
  assert "export JAX_NUM_PROCESSES=4" in cmds
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in cmds
  # JAX_PROCESS_ID is per task: set from each task's own SLURM_PROCID, never fixed here.
  assert not [c for c in cmds if c.startswith("export JAX_PROCESS_ID")]
  (srun,) = find(cmds, "srun ")
  assert srun.startswith("srun --kill-on-bad-exit=1 --nodes=4 --ntasks=4 --ntasks-per-node=1 ")
  words = shlex.split(srun)
  wrapper = words[words.index("-c") + 1]
  assert 'export JAX_PROCESS_ID="$SLURM_PROCID"' in wrapper
  assert (MAIN_CMD + f" --workdir=gs://b/run --distributed --coordinator_address=gpu-001:"
          f"{SLURM_PORT} --num_processes=4 --config.batch_size=2048") in srun
  assert called(stubs, "scontrol") == ["show hostnames gpu-[001-004]"]
  assert called(stubs, "srun") == []


def test_slurm_gpu_count_and_port_settings(stubs, repo):
  env = {**SLURM_ENV, "REPO_DIR": str(repo), "WORKDIR": "gs://b/run", "COORDINATOR_PORT": "1234"}
  del env["SLURM_GPUS_ON_NODE"]
  env["SLURM_GPUS_PER_NODE"] = "h100:4"
  result = run_script("slurm_multi_node.sh", ["--dry-run"], stubs, env=env)
  assert result.returncode == 0, result.stderr
  assert "+ export JAX_LOCAL_DEVICE_IDS=0,1,2,3\n" in result.stdout
  assert "+ export JAX_COORDINATOR_ADDRESS=gpu-001:1234\n" in result.stdout


def test_slurm_errors(stubs, repo):
  base = {**SLURM_ENV, "REPO_DIR": str(repo), "WORKDIR": "gs://b/run"}
  no_gpus = {k: v for k, v in base.items() if k != "SLURM_GPUS_ON_NODE"}
  cases = [
      ({k: v for k, v in base.items() if k != "WORKDIR"}, "WORKDIR"),
      ({k: v for k, v in base.items() if k != "SLURM_JOB_NODELIST"}, "SLURM_JOB_NODELIST"),
      ({**base, "SLURM_NTASKS": "32"}, "--ntasks-per-node=1"),
      (no_gpus, "GPUS_PER_NODE"),
      ({**base, "CONFIG": "configs/missing.py"}, "CONFIG"),
  ]
  for env, name in cases:
    result = run_script("slurm_multi_node.sh", ["--dry-run"], stubs, env=env)
    assert result.returncode != 0, (name, result.stdout)
    assert name in result.stderr, (name, result.stderr)
    assert result.stdout == ""


def _readme_block(starting):
  """The lines of the first ``` block of launch/README.md whose first line starts with `starting`:
  (the command, its continuation lines joined, and the lines it printed)."""
  with open(os.path.join(LAUNCH, "README.md")) as f:
    blocks = f.read().split("```")[1::2]
  block = next(b for b in blocks if b.strip().startswith(starting))
  lines = block.strip().splitlines()
  command = lines.pop(0)
  while command.endswith("\\"):
    command = command[:-1] + lines.pop(0).strip()
  return command[2:], lines


def _path_without(*names):
  """The system PATH minus every directory that holds one of `names` (skips the test when that
  also loses a tool the scripts need, e.g. scontrol installed beside bash in /usr/bin)."""
  dirs = os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
  path = os.pathsep.join(d for d in dirs
                         if not any(os.path.exists(os.path.join(d, n)) for n in names))
  for tool in ("bash", "grep", "dirname"):
    if not shutil.which(tool, path=path):
      pytest.skip(f"{names} share a directory with {tool} on this machine's PATH")
  return path


def test_slurm_readme_dry_run_outside_slurm(stubs):
  """The README's SLURM example, run exactly as written on a machine without SLURM (no scontrol
  on PATH), prints what the README shows: hosts expanded by the script, flagged as stand-ins."""
  command, expected = _readme_block("$ SLURM_JOB_ID=12345")
  assert command.endswith("launch/slurm_multi_node.sh --dry-run"), command
  bin_dir, _ = stubs
  (bin_dir / "scontrol").unlink()  # srun and sbatch stay as stubs that record any call.
  env = {"PATH": f"{bin_dir}{os.pathsep}{_path_without('scontrol')}", "HOME": "/root",
         "LANG": "C.UTF-8"}
  result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=60)
  assert result.returncode == 0, result.stdout
  printed = result.stdout.replace(ROOT, "/work/main").splitlines()
  for line in (f"+ export JAX_COORDINATOR_ADDRESS=gpu-001:{SLURM_PORT}",
               "+ export JAX_NUM_PROCESSES=4",
               "+ export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"):
    assert line in printed, result.stdout
  (srun,) = [l for l in printed if l.startswith("+ srun ")]
  assert srun == ("+ srun --kill-on-bad-exit=1 --nodes=4 --ntasks=4 --ntasks-per-node=1 bash -c "
                  "'export JAX_PROCESS_ID=\"$SLURM_PROCID\"; exec \"$@\" --process_id=\"$JAX_PROCESS_ID\"' "
                  "mtl_jax python -m mtl_jax.main --config=configs/mtl1000.py "
                  "--workdir=gs://my-bucket/mtl1000 --distributed "
                  f"--coordinator_address=gpu-001:{SLURM_PORT} --num_processes=4")
  assert ("[slurm_multi_node.sh] dry run outside SLURM (no scontrol on PATH): stand-in hosts "
          "gpu-001,gpu-002,gpu-003,gpu-004 expanded by this script from "
          "SLURM_JOB_NODELIST='gpu-[001-004]'") in printed[0]
  assert printed == expected  # The README shows exactly what the command prints.
  assert called(stubs, "srun") == [] and called(stubs, "sbatch") == []

  # Without --dry-run the real requirement stays.
  real = subprocess.run(["bash", "-c", command[:-len(" --dry-run")]], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=60)
  assert real.returncode != 0 and real.stdout == ""
  assert "slurm_multi_node.sh: error: scontrol is not on PATH: run this inside a SLURM job" in (
      real.stderr)
  assert called(stubs, "srun") == []


@pytest.mark.parametrize("nodelist,hosts", [
    ("gpu-[001-004]", "gpu-001 gpu-002 gpu-003 gpu-004"),
    ("a,b", "a b"),
    ("n[1,3,8-10]", "n1 n3 n8 n9 n10"),
    ("x[08-10],y", "x08 x09 x10 y"),
    ("rack[1-2]-n[01-02]", "rack1-n01 rack1-n02 rack2-n01 rack2-n02"),
    ("node7", "node7"),
])
def test_slurm_dry_run_expands_the_node_list_without_scontrol(stubs, repo, nodelist, hosts):
  bin_dir, _ = stubs
  (bin_dir / "scontrol").unlink()
  n = len(hosts.split())
  env = {**SLURM_ENV, "SLURM_JOB_NODELIST": nodelist, "SLURM_NTASKS": str(n),
         "REPO_DIR": str(repo), "WORKDIR": "gs://b/run",
         "PATH": f"{bin_dir}{os.pathsep}{_path_without('scontrol')}"}
  result = run_script("slurm_multi_node.sh", ["--dry-run"], stubs, env=env)
  assert result.returncode == 0, result.stderr
  cmds = commands(result.stdout)
  assert f"export JAX_COORDINATOR_ADDRESS={hosts.split()[0]}:{SLURM_PORT}" in cmds
  assert f"export JAX_NUM_PROCESSES={n}" in cmds
  assert f"stand-in hosts {hosts.replace(' ', ',')} expanded by this script" in result.stderr


@pytest.mark.parametrize("nodelist", ["gpu[a-b]", "gpu-[004-001]", "gpu-[001-004", "a,,b",
                                      "gpu-[1-2]]", "host name"])
def test_slurm_dry_run_without_scontrol_refuses_a_list_it_cannot_expand(stubs, repo, nodelist):
  bin_dir, _ = stubs
  (bin_dir / "scontrol").unlink()
  env = {**SLURM_ENV, "SLURM_JOB_NODELIST": nodelist, "REPO_DIR": str(repo),
         "WORKDIR": "gs://b/run", "PATH": f"{bin_dir}{os.pathsep}{_path_without('scontrol')}"}
  result = run_script("slurm_multi_node.sh", ["--dry-run"], stubs, env=env)
  assert result.returncode != 0 and result.stdout == ""
  assert (f"scontrol is not on PATH and this dry run cannot expand "
          f"SLURM_JOB_NODELIST='{nodelist}'") in result.stderr, result.stderr


def _fake_srun_and_python(stubs, python_body):
  bin_dir, _ = stubs
  # Like srun: starts --ntasks copies of the command, each with its own SLURM_PROCID.
  _write_exe(bin_dir / "srun", """
      #!/usr/bin/env bash
      n=1
      while [[ $1 == --* ]]; do case $1 in --ntasks=*) n=${1#*=} ;; esac; shift; done
      pids=()
      for ((i = 0; i < n; i++)); do
        SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST \\
          SLURM_STEP_NUM_NODES=$n "$@" > "$TMPDIR/task$i.out" 2>&1 &
        pids+=($!)
      done
      rc=0
      for p in "${pids[@]}"; do wait "$p" || rc=1; done
      exit $rc
      """)
  _write_exe(bin_dir / "scontrol", """
      #!/bin/sh
      echo localhost
      echo localhost
      """)
  # Stands in for `python -m mtl_jax.main FLAGS...`.
  _write_exe(bin_dir / "fake-python", f"""
      #!/bin/sh
      shift 2
      exec {shlex.quote(sys.executable)} - "$@" <<'EOF'
      {textwrap.indent(textwrap.dedent(python_body), '      ').lstrip()}
      EOF
      """)
  return str(bin_dir / "fake-python")


def _slurm_env_for_localhost(repo, python):
  return {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost,localhost", "SLURM_NTASKS": "2",
          "SLURM_GPUS_ON_NODE": "2", "REPO_DIR": str(repo), "WORKDIR": "gs://b/run",
          "PYTHON": python}


def test_slurm_tasks_get_their_own_process_id(stubs, repo):
  python = _fake_srun_and_python(stubs, """
      import json, os, sys
      print(json.dumps({"argv": sys.argv[1:],
                        "env": {k: v for k, v in os.environ.items() if k.startswith("JAX_")}}))
      """)
  result = run_script("slurm_multi_node.sh", [], stubs, env=_slurm_env_for_localhost(repo, python))
  assert result.returncode == 0, result.stderr
  import json
  for i in range(2):
    task = json.loads((stubs[0].parent / f"task{i}.out").read_text())
    assert task["env"]["JAX_PROCESS_ID"] == str(i)
    assert task["env"]["JAX_NUM_PROCESSES"] == "2"
    assert task["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1"
    assert task["env"]["JAX_COORDINATOR_ADDRESS"] == f"localhost:{61440 + 7}"
    assert task["argv"][:3] == ["--config=configs/mtl1000.py", "--workdir=gs://b/run",
                                "--distributed"]
    assert task["argv"][-1] == f"--process_id={i}"


def test_slurm_processes_form_one_jax_system(stubs, repo):
  """Two tasks on this machine initialize jax.distributed the way mtl_jax/main.py does."""
  pytest.importorskip("jax")
  pytest.importorskip("absl")
  python = _fake_srun_and_python(stubs, """
      import sys
      from absl import flags
      flags.DEFINE_string("config", None, "")
      flags.DEFINE_string("workdir", None, "")
      flags.DEFINE_bool("distributed", False, "")
      flags.DEFINE_string("coordinator_address", None, "")
      flags.DEFINE_integer("num_processes", None, "")
      flags.DEFINE_integer("process_id", None, "")
      FLAGS = flags.FLAGS
      FLAGS(["main"] + sys.argv[1:])
      import jax
      jax.config.update("jax_platforms", "cpu")
      assert FLAGS.distributed
      jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
      print("RESULT", jax.process_index(), jax.process_count(),
            jax.config.read("jax_cuda_visible_devices"))
      jax.distributed.shutdown()
      """)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**_slurm_env_for_localhost(repo, python), "COORDINATOR_PORT": str(port)}
  result = run_script("slurm_multi_node.sh", [], stubs, env=env, timeout=240)
  outs = [(stubs[0].parent / f"task{i}.out").read_text() for i in range(2)]
  assert result.returncode == 0, result.stderr + "\n".join(outs)
  for i, out in enumerate(outs):
    (line,) = [l for l in out.splitlines() if l.startswith("RESULT")]
    # Each process keeps both of its node's GPUs: without JAX_LOCAL_DEVICE_IDS, JAX's SLURM
    # detection would give it GPU $SLURM_LOCALID (0) only.
    assert line.split() == ["RESULT", str(i), "2", "0,1"]


# --- tpu_vm.sh for real, against a fake gcloud that runs the workers' commands here ------------

@pytest.fixture
def fake_tpu(stubs, tmp_path):
  """gcloud stub: ssh runs --command= in bash with HOME=worker/, scp copies into worker/."""
  bin_dir, calls = stubs
  worker = tmp_path / "worker"
  worker.mkdir()
  _write_exe(bin_dir / "gcloud", f"""
      #!/usr/bin/env bash
      echo "$*" >> {calls}/gcloud
      case $4 in
        create|delete) ;;
        scp) cp "$5" "{worker}/${{6#*:}}" ;;
        ssh)
          for a in "$@"; do case $a in --command=*) cmd=${{a#--command=}} ;; esac; done
          HOME={worker} exec bash -c "$cmd" ;;
        *) exit 2 ;;
      esac
      """)
  # The worker's python3 installs a fake uv, whose venv gets a fake python.
  _write_exe(bin_dir / "python3", f"""
      #!/usr/bin/env bash
      [[ "$*" == "-m pip install --user --quiet --upgrade uv" ]] || exit 2
      mkdir -p "$HOME/.local/bin"
      cat > "$HOME/.local/bin/uv" <<'UV'
      #!/usr/bin/env bash
      venv=${{@: -1}}
      mkdir -p "$venv/bin"
      cat > "$venv/bin/python" <<'PY'
      #!/usr/bin/env bash
      if [[ $1 == -m && $2 == pip ]]; then echo "$*" >> {calls}/pip; exit 0; fi
      echo "training $*"
      sleep "${{FAKE_TRAIN_SECONDS:-1}}"
      echo "done"
      exit "${{FAKE_TRAIN_RC:-0}}"
      PY
      chmod +x "$venv/bin/python"
      UV
      chmod +x "$HOME/.local/bin/uv"
      """)
  return worker


def test_tpu_all_for_real_with_fake_gcloud(stubs, repo, fake_tpu):
  if not shutil.which("git"):
    pytest.skip("git is not installed: the copy mode lists files with git")
  (repo / ".gitignore").write_text("runs/\n")
  (repo / "runs").mkdir()
  (repo / "runs" / "big.ckpt").write_text("x")
  env = {"REPO_DIR": str(repo), "WORKDIR": "gs://b/run", "FAKE_TRAIN_SECONDS": "2"}
  result = run_script("tpu_vm.sh", ["all", "--", "--config.seed=5"], stubs, env=env, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
  # The copy has the checkout's files, not the ignored ones.
  assert (fake_tpu / "mtl_jax" / "configs" / "mtl1000.py").is_file()
  assert (fake_tpu / "mtl_jax" / ".gitignore").is_file()
  assert not (fake_tpu / "mtl_jax" / "runs").exists()
  assert called(stubs, "pip") == ["-m pip install -e . jax[tpu]==0.10.2"]
  # `logs` showed the whole training and came back when it ended.
  assert ("training -m mtl_jax.main --config=configs/mtl1000.py --workdir=gs://b/run "
          "--distributed --config.seed=5") in result.stdout
  assert "done" in result.stdout
  verbs = [c.split()[3] for c in called(stubs, "gcloud")]
  assert verbs == ["create", "scp", "ssh", "ssh", "ssh", "delete"]


def test_tpu_failed_training_keeps_the_vm(stubs, repo, fake_tpu):
  if not shutil.which("git"):
    pytest.skip("git is not installed: the copy mode lists files with git")
  env = {"REPO_DIR": str(repo), "WORKDIR": "gs://b/run", "FAKE_TRAIN_RC": "3",
         "FAKE_TRAIN_SECONDS": "3", "REPO_URL": "unused"}
  # Set up the worker as `install` would, without cloning.
  (fake_tpu / "mtl_jax").mkdir()
  subprocess.run(["bash", "-c", "python3 -m pip install --user --quiet --upgrade uv && "
                  "$HOME/.local/bin/uv venv $HOME/mtl_jax_venv"],
                 env={"PATH": f"{stubs[0]}{os.pathsep}{os.environ['PATH']}",
                      "HOME": str(fake_tpu)}, check=True)
  result = run_script("tpu_vm.sh", ["train"], stubs, env=env)
  assert result.returncode == 0, result.stderr
  # A second start while the first runs is refused (it would fight over the TPU).
  again = run_script("tpu_vm.sh", ["train"], stubs, env=env)
  assert again.returncode != 0 and "already running" in again.stderr
  # So is replacing its code.
  again = run_script("tpu_vm.sh", ["install"], stubs, env=env)
  assert again.returncode != 0 and "already running" in again.stderr
  assert (fake_tpu / "mtl_jax").is_dir()
  logs = run_script("tpu_vm.sh", ["logs"], stubs, env=env)
  assert logs.returncode == 3, logs.stderr  # The training's exit status.
  assert "done" in logs.stdout
  # `all` stops before `delete` when training fails.
  (fake_tpu / "mtl_jax_train.pid").unlink()
  result = run_script("tpu_vm.sh", ["all"], stubs,
                      env={**env, "REPO_URL": "", "FAKE_TRAIN_SECONDS": "1"})
  assert result.returncode != 0
  assert "kept" in result.stderr
  assert "delete" not in [c.split()[3] for c in called(stubs, "gcloud")]
