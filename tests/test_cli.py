"""What every entry point shares (cli.run): one-line errors, huge pages and how to opt out."""

import os
import subprocess
import sys
import textwrap

import pytest

from vnet_jax import runtime

# A minimal entry point built like the package's: prints the tunables it runs with, then fails
# with a user error when asked to.
_PROGRAM = textwrap.dedent("""
  import os, sys
  from absl import flags
  from vnet_jax import cli
  from vnet_jax.errors import DataError
  flags.DEFINE_bool("fail", False, "raise a DataError")

  def main(argv):
    print("tunables:", os.environ.get("GLIBC_TUNABLES", ""), flush=True)
    if flags.FLAGS.fail:
      raise DataError("/data/case_0001.nii.gz: cannot read NIfTI (truncated)")

  if __name__ == "__main__":
    cli.run(main)
""")


def _run(tmp_path, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
  program = tmp_path / "program.py"
  program.write_text(_PROGRAM)
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.update(env_extra or {})
  return subprocess.run(
    [sys.executable, str(program), *args], capture_output=True, text=True, timeout=120, env=env
  )


@pytest.mark.slow
def test_a_user_error_is_one_line_on_stderr_and_exit_status_1(tmp_path):
  out = _run(tmp_path, "--fail", "--nohuge_pages")
  assert out.returncode == 1
  assert out.stderr.strip() == "error: /data/case_0001.nii.gz: cannot read NIfTI (truncated)"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are a glibc setting")
def test_huge_pages_by_default_and_opt_out_by_flag_or_environment(tmp_path):
  assert "tunables: glibc.malloc.hugetlb=1" in _run(tmp_path).stdout
  assert "hugetlb" not in _run(tmp_path, "--nohuge_pages").stdout
  opted_out = _run(tmp_path, env_extra={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
  assert "tunables: glibc.malloc.hugetlb=0" in opted_out.stdout


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are a glibc setting")
def test_no_restart_under_a_profiler(tmp_path):
  program = tmp_path / "program.py"
  program.write_text(_PROGRAM)
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  out = subprocess.run(
    [sys.executable, "-m", "cProfile", str(program)],
    capture_output=True,
    text=True,
    timeout=120,
    env=env,
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("tunables: \n")  # ran once, in the profiled process


def test_a_debugger_or_profiler_is_detected(monkeypatch):
  for name in runtime._TOOL_MODULES:
    monkeypatch.delitem(sys.modules, name, raising=False)
  tracing = sys.gettrace() is not None  # e.g. coverage or a debugger running the tests
  assert runtime.under_debugger_or_profiler() == tracing
  previous = sys.getprofile()
  sys.setprofile(lambda *a: None)
  try:
    assert runtime.under_debugger_or_profiler()
  finally:
    sys.setprofile(previous)
  monkeypatch.setitem(sys.modules, "debugpy", sys)
  assert runtime.under_debugger_or_profiler()
