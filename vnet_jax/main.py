r"""Train or evaluate a VNet on one fold: `python -m vnet_jax.main --experiment=flare22 --fold=2`.

--experiment names a config shipped with the package (vnet_jax/experiments/NAME.py: flare22, seed,
demo) or is the path of your own config file (a module with `get_config()`). Any config field can
be overridden: `--config.num_steps=200 --config.model.filters=8,16,32,64,64`. Flags may come from
a --flagfile. Re-running the same command resumes from the latest checkpoint in the workdir.

SIGTERM or Ctrl-C (SIGINT) stops training after the current step with a checkpoint and exits
with status 143 or 130 (128 + the signal number) and a line giving the command that resumes;
a second signal exits at once (vnet_jax/preemption.py).
"""

import os
import shlex
import sys
from importlib import resources
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from vnet_jax import cli
from vnet_jax.errors import DataError, one_line

flags.DEFINE_string(
  "experiment",
  "flare22",
  "A config shipped with the package (flare22, seed, demo: vnet_jax/experiments/NAME.py) or the "
  "path of your own config file with a get_config().",
)
flags.DEFINE_string("fold", "0", "Validation fold index, or 'all' to train on every case.")
flags.DEFINE_string("workdir", None, "Output directory (default runs/<experiment>/fold<K>).")
flags.DEFINE_string("data_dir", None, "Dataset directory (overrides config.data.data_dir).")
flags.DEFINE_enum(
  "mode", "train", ["train", "eval"], "train (resumes automatically) or eval (best checkpoint)."
)
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
FLAGS = flags.FLAGS


def experiment_path(experiment: str) -> Path:
  """The config file of a shipped experiment's name, or the user's own file's path."""
  if experiment.endswith(".py") or os.sep in experiment:
    path = Path(experiment)
  else:
    path = Path(str(resources.files("vnet_jax.experiments") / f"{experiment}.py"))
  if not path.is_file():
    shipped = sorted(
      p.stem
      for p in Path(str(resources.files("vnet_jax.experiments"))).glob("*.py")
      if not p.stem.startswith("_") and p.stem != "base"
    )
    raise DataError(
      f"--experiment={experiment}: no config file {path} (shipped: {', '.join(shipped)}; "
      f"or give the path of your own .py file)"
    )
  return path


def _experiment_in(argv: list[str]) -> str:
  """The last --experiment in argv (as absl takes the last), or the flag's default."""
  experiment = FLAGS["experiment"].default
  for i, arg in enumerate(argv):
    if arg.startswith("--experiment="):
      experiment = arg.split("=", 1)[1]
    elif arg == "--experiment" and i + 1 < len(argv):
      experiment = argv[i + 1]
  return experiment


def parse_flags(argv: list[str]) -> list[str]:
  """Defines --config from --experiment (flag files expanded first), then parses every flag."""
  argv = [argv[0], *FLAGS.read_flags_from_files(argv[1:], force_gnu=False)]
  try:
    path = experiment_path(_experiment_in(argv))
  except DataError as e:
    sys.exit(f"error: {e}")
  try:
    config_flags.DEFINE_config_file(
      "config",
      str(path),
      "The experiment's config; override fields with --config.FIELD=VALUE.",
      sys_argv=argv,
    )
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections reports an unknown --config.FIELD as a bare AttributeError.
    sys.exit(f"error: bad flags ({type(e).__name__}: {one_line(e)}); see --help")


def _maybe_initialize_distributed() -> None:
  """jax.distributed.initialize before any JAX computation, from flags or the scheduler's
  environment."""
  env = os.environ
  import jax

  # Lets CPU processes run cross-host collectives (tests on loopback); the GPU backend ignores it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  elif int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()  # JAX reads SLURM / Open MPI variables itself


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _maybe_initialize_distributed()
  from vnet_jax import preemption, train

  config = FLAGS.config
  if FLAGS.data_dir:
    config.data.data_dir = FLAGS.data_dir
  fold = FLAGS.fold if FLAGS.fold == "all" else int(FLAGS.fold)
  name = Path(FLAGS.experiment).stem
  workdir = Path(FLAGS.workdir or f"runs/{name}/fold{fold}")
  try:
    train.train_and_evaluate(config, workdir, fold=fold, mode=FLAGS.mode)
  except preemption.Stopped as e:  # the exit status tells schedulers the run is unfinished
    print(f"{e}; resume with: {shlex.join(sys.orig_argv)}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)


if __name__ == "__main__":
  cli.run(main, flags_parser=parse_flags)
