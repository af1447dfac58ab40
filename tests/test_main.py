"""The training command line: --experiment by name or path, flag files, config overrides."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vnet_jax import main
from vnet_jax.errors import DataError

ROOT = Path(__file__).resolve().parent.parent

# Parses a command line exactly as `python -m vnet_jax.main` does, then prints what it selected.
_PARSE = textwrap.dedent("""
  import sys
  from vnet_jax import main
  main.parse_flags(["vnet_jax.main", *sys.argv[1:]])
  c = main.FLAGS.config
  print(main.FLAGS.experiment, c.num_steps, c.loss.class_weights, c.data.synthetic_cases)
""")


def _parse(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", _PARSE, *args], capture_output=True, text=True, timeout=120, cwd=cwd
  )


def test_shipped_experiments_are_found_by_name_inside_the_package():
  for name in ("flare22", "seed", "demo"):
    path = main.experiment_path(name)
    assert path.name == f"{name}.py" and path.parent.name == "experiments"
    assert path.parent.parent.name == "vnet_jax"


def test_an_unknown_experiment_is_one_line_naming_the_shipped_ones():
  with pytest.raises(DataError, match=r"--experiment=nope: .*shipped: demo, flare22, seed"):
    main.experiment_path("nope")
  with pytest.raises(DataError, match="missing.py"):
    main.experiment_path("/tmp/missing.py")


@pytest.mark.slow
def test_experiment_and_overrides_come_from_a_flag_file(tmp_path):
  flagfile = tmp_path / "flags.txt"
  flagfile.write_text("--experiment=seed\n--config.num_steps=7\n")
  out = _parse(f"--flagfile={flagfile}", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["seed", "7", "(0.26,", "22.53,", "22.53,", "26.21)", "0"]


@pytest.mark.slow
def test_a_users_own_config_file_by_path_from_any_directory(tmp_path):
  mine = tmp_path / "configs" / "mine.py"
  mine.parent.mkdir()
  mine.write_text(
    "from vnet_jax.experiments import demo\n\n\n"
    "def get_config():\n  c = demo.get_config()\n  c.num_steps = 3\n  return c\n"
  )
  out = _parse(f"--experiment={mine}", "--config.data.synthetic_cases=4", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == [str(mine), "3", "None", "4"]


@pytest.mark.slow
def test_a_bad_experiment_or_flag_is_one_line_without_traceback(tmp_path):
  for args, expected in (
    (["--experiment=nope"], "no config file"),
    (["--experiment=demo", "--config.no_such_field=1"], "no_such_field"),
  ):
    out = _parse(*args, cwd=tmp_path)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    assert expected in out.stderr
