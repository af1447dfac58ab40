r"""Train or evaluate a VNet on one fold: `python -m vnet_jax.main --experiment=flare22 --fold=2`.

Any config field can be overridden: `--config.num_steps=200 --config.model.filters=8,16,32,64,64`.
Re-running the same command resumes from the latest checkpoint in the workdir.
"""

import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


def _experiment_from_argv(argv: list[str], default: str = "flare22") -> str:
  # The config file flag must exist before flags are parsed, so --experiment is read early.
  for i, arg in enumerate(argv):
    if arg.startswith("--experiment="):
      return arg.split("=", 1)[1]
    if arg == "--experiment" and i + 1 < len(argv):
      return argv[i + 1]
  return default


_EXPERIMENT_NAME = _experiment_from_argv(sys.argv)
flags.DEFINE_string("experiment", "flare22", "Experiment module in experiments/ (its get_config()).")
config_flags.DEFINE_config_file("config", str(EXPERIMENTS_DIR / f"{_EXPERIMENT_NAME}.py"),
                                "Experiment config; override fields with --config.FIELD=VALUE.")
flags.DEFINE_string("fold", "0", "Validation fold index, or 'all' to train on every case.")
flags.DEFINE_string("workdir", None, "Output directory (default runs/<experiment>/fold<K>).")
flags.DEFINE_string("data_dir", None, "Dataset directory (overrides config.data.data_dir).")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes automatically) or eval (best checkpoint).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
FLAGS = flags.FLAGS


def _maybe_initialize_distributed() -> None:
  """jax.distributed.initialize before any JAX computation, from flags or the scheduler's environment."""
  env = os.environ
  import jax
  # Lets CPU processes run cross-host collectives (tests on loopback); the GPU backend ignores it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()  # JAX reads SLURM / Open MPI variables itself


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not (EXPERIMENTS_DIR / f"{FLAGS.experiment}.py").exists():
    sys.exit(f"--experiment={FLAGS.experiment}: no experiments/{FLAGS.experiment}.py")
  if not FLAGS["verbosity"].present:  # Orbax and Grain log every save and read at INFO
    logging.set_verbosity(logging.WARNING)
  _maybe_initialize_distributed()
  from vnet_jax import checkpoint, train
  from vnet_jax.data import DataError

  config = FLAGS.config
  if FLAGS.data_dir:
    config.data.data_dir = FLAGS.data_dir
  fold = FLAGS.fold if FLAGS.fold == "all" else int(FLAGS.fold)
  workdir = Path(FLAGS.workdir or f"runs/{FLAGS.experiment}/fold{fold}")
  try:
    train.train_and_evaluate(config, workdir, fold=fold, mode=FLAGS.mode)
  except (DataError, train.TrainingError, checkpoint.CheckpointError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  from vnet_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.exec_with_huge_pages()
  app.run(main)
