"""Training: state, the pmap'd train step, validation and the loop with exact resume."""

import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import jax_utils
from flax.training import train_state

from vnet_jax import (
  augment,
  checkpoint,
  hosts,
  losses,
  metric_writers,
  metrics,
  preemption,
  resume_check,
  runtime,
  summaries,
  validate,
  workdir_lock,
)
from vnet_jax import model as model_lib
from vnet_jax.data import folds, layouts, pipeline
from vnet_jax.data.cache import prepare_dataset
from vnet_jax.data.plan import PreprocessSettings
from vnet_jax.errors import ConfigError, DataError
from vnet_jax.files import write_json_atomic
from vnet_jax.model import VNet

AXIS = "batch"  # pmap axis: gradients, BatchNorm statistics and metrics are averaged over it


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array  # raw uint32 key: dropout keys are folded from it with the step and device


# ---------------------------------------------------------------------------- model and optimizer


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """`config.lr_schedule` after `warmup_steps` of linear warm-up: constant, cosine (to 0 at
  num_steps) or poly (nnU-Net's lr * (1 - t / T)^0.9, to 0 at num_steps)."""
  decay_steps = max(config.num_steps - config.warmup_steps, 1)
  if config.lr_schedule == "constant":
    main = optax.constant_schedule(config.learning_rate)
  elif config.lr_schedule == "cosine":
    main = optax.cosine_decay_schedule(config.learning_rate, decay_steps)
  elif config.lr_schedule == "poly":
    main = optax.polynomial_schedule(config.learning_rate, 0.0, 0.9, decay_steps)
  else:
    raise ConfigError(
      f"config.lr_schedule must be 'constant', 'cosine' or 'poly', got {config.lr_schedule!r}"
    )
  if config.warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  return optax.join_schedules([warmup, main], [config.warmup_steps])


def create_train_state(config: ml_collections.ConfigDict, model: VNet) -> TrainState:
  """Unreplicated initial state; the same seed gives the same state on every host."""
  init_key, dropout_key = jax.random.split(jax.random.PRNGKey(config.seed))
  x = jnp.zeros((1, *config.patch_size, model.in_channels), jnp.float32)
  # The partitionable threefry makes XLA:CPU compile a network's initializers ~4x slower; init
  # runs once, unsharded, so the classic bit generator is used for it.
  with jax.threefry_partitionable(False):
    variables = jax.jit(functools.partial(model.init, train=False))(init_key, x)
  tx = optax.adam(learning_rate_schedule(config))
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    tx=tx,
    batch_stats=variables.get("batch_stats", {}),
    rng=dropout_key,
  )


def class_weights(config: ml_collections.ConfigDict, num_classes: int) -> np.ndarray | None:
  weights = config.loss.class_weights
  if weights is None:
    return None
  weights = np.asarray(weights, np.float32)
  if weights.shape != (num_classes,):
    raise ConfigError(
      f"config.loss.class_weights has {weights.size} values; the dataset has {num_classes} classes"
    )
  return weights / weights.mean() if config.loss.normalize_class_weights else weights


# ---------------------------------------------------------------------------- the step


def train_step(
  state: TrainState,
  batch: dict,
  *,
  num_classes: int,
  loss_config: ml_collections.ConfigDict,
  weights: np.ndarray | None,
  augmentation: augment.AugmentConfig,
  anisotropic: bool,
):
  """One optimizer step on this device's share of the global batch (run under pmap).

  The patches are augmented here, on the device. Keys come from the run's seed (state.rng), the
  step and the device's index among all devices of all processes, so a step's patches and
  dropout masks are the same whatever resumes or restarts came before.
  """
  device = jax.lax.axis_index(AXIS)
  dropout_key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), device)
  augment_key = jax.random.fold_in(dropout_key, 1)
  # pmap runs each device's program unpartitioned, so the partitionable threefry buys nothing
  # here; the classic one draws random numbers 3x faster on CPU (docs/performance.md).
  with jax.threefry_partitionable(False):
    images, labels = augment.augment_batch(
      augment_key, batch["image"], batch["label"], augmentation, anisotropic
    )

    def loss_fn(params):
      outputs, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        images,
        train=True,
        rngs={"dropout": dropout_key},
        mutable=["batch_stats"],
      )
      outputs = outputs if isinstance(outputs, tuple) else (outputs,)
      total, parts = 0.0, None
      # Deep supervision: output i is at 1/2^i of the resolution, with labels sampled to match.
      level_weights = model_lib.deep_supervision_weights(len(outputs))
      for i, (w, logits) in enumerate(zip(level_weights, outputs)):
        level_labels = model_lib.downsample_labels(labels, 2**i) if i else labels
        loss, probs, level_parts = losses.segmentation_loss(
          logits, level_labels, num_classes, loss_config, weights, axis_name=AXIS
        )
        total = total + w * loss
        if i == 0:
          full_probs, parts = probs, level_parts
      return total, (updates, full_probs, parts)

    (loss, (updates, probs, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  state = state.apply_gradients(
    grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats)
  )
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  mask = (labels >= 0).astype(jnp.float32)
  step_metrics = {
    "loss": loss,
    **parts,
    "accuracy": metrics.accuracy(probs, onehot, mask),
    "iou": metrics.iou_score(probs, onehot, axis_name=AXIS, mask=mask),
  }
  return state, jax.lax.pmean(step_metrics, AXIS)


def make_p_train_step(config: ml_collections.ConfigDict, num_classes: int, target_spacing=None):
  """The pmap'd train step; `target_spacing` (z, y, x) of the data decides whether rotations stay
  in-plane (`augment.is_anisotropic`)."""
  step = functools.partial(
    train_step,
    num_classes=num_classes,
    loss_config=config.loss,
    weights=class_weights(config, num_classes),
    augmentation=augment.AugmentConfig.from_dict(config.augment),
    anisotropic=augment.is_anisotropic(target_spacing),
  )
  return runtime.pmap(step, axis_name=AXIS, donate_argnums=(0,))


# ---------------------------------------------------------------------------- data


def resolve_data_dir(config: ml_collections.ConfigDict, workdir: Path) -> Path:
  """The dataset directory; the demo generates a synthetic one into the workdir on first use."""
  if config.data.data_dir is None and config.data.synthetic_cases > 0:
    data_dir = workdir / "synthetic_data"
  elif config.data.data_dir is None:
    raise DataError("config.data.data_dir is not set: pass --data_dir=DIR")
  else:
    data_dir = Path(config.data.data_dir)
  if not data_dir.exists() and config.data.synthetic_cases > 0:
    from vnet_jax.data import synthetic

    logging.info("generating %d synthetic cases in %s", config.data.synthetic_cases, data_dir)
    synthetic.write_dataset(
      data_dir, config.data.synthetic_cases, seed=config.seed, shape=config.data.synthetic_size
    )
  elif not data_dir.exists():
    raise DataError(
      f"{data_dir}: dataset not found; download FLARE22Train.zip from Zenodo record 7860267 "
      f"and unzip it there (or pass --data_dir), or run the synthetic demo with ./run.sh"
    )
  return data_dir


def preprocess_settings(config: ml_collections.ConfigDict) -> PreprocessSettings:
  d = config.data
  return PreprocessSettings(
    target_spacing=d.target_spacing,
    normalization=d.normalization,
    ct_window=d.ct_window,
    crop_to_nonzero=d.crop_to_nonzero,
    image_dtype=d.image_dtype,
    label_map=d.label_map,
  )


def cache_root(config: ml_collections.ConfigDict) -> Path:
  if config.data.cache_dir:
    return Path(config.data.cache_dir)
  return Path(os.environ.get("VNET_JAX_CACHE", Path.home() / ".cache" / "vnet_jax"))


def prepare_data(config: ml_collections.ConfigDict, workdir: Path, fold: int | str):
  """Validates, preprocesses (cached) and splits the dataset; returns (cache, train ids, val
  ids)."""
  data_dir = resolve_data_dir(config, workdir)
  dataset = layouts.discover_dataset(data_dir)
  # Fold arguments are checked before the slow part; prepare_dataset checks every header itself.
  folds.check_num_folds(len(dataset.cases), config.num_folds, str(data_dir))
  folds.parse_fold(fold, config.num_folds, str(data_dir))
  prepare = lambda: prepare_dataset(
    dataset,
    preprocess_settings(config),
    cache_root(config),
    num_workers=config.data.preprocess_workers,
    progress=jax.process_index() == 0,
  )
  # Process 0 fills a shared cache first; the others then find it complete (or, without a
  # shared filesystem, build their own copy) instead of racing on the same files.
  cache = prepare() if jax.process_index() == 0 else None
  hosts.wait_for_all("vnet_jax preprocessing")
  cache = cache or prepare()
  user_splits = [
    data_dir / n for n in ("splits.json", "splits_final.json") if (data_dir / n).exists()
  ]
  splits_path = user_splits[0] if user_splits else cache.dir / "splits.json"
  splits = folds.load_or_create_splits(
    splits_path, cache.case_ids, config.num_folds, config.split_seed
  )
  folds.write_splits(workdir / "splits.json", splits)
  train_ids, val_ids = folds.select_fold(splits, fold, cache.case_ids)
  return cache, train_ids, val_ids


def class_names(config: ml_collections.ConfigDict, cache) -> dict[int, str]:
  if config.data.class_names is None:
    return dict(cache.class_names)
  if len(config.data.class_names) != cache.num_classes:
    raise DataError(
      f"config.data.class_names has {len(config.data.class_names)} names; the preprocessed "
      f"labels have {cache.num_classes} classes"
    )
  return dict(enumerate(config.data.class_names))


def make_train_iterator(config: ml_collections.ConfigDict, cache, train_ids):
  dataset = pipeline.make_train_dataset(
    cache.dir,
    train_ids,
    patch_size=tuple(config.patch_size),
    per_device_batch=config.per_device_batch_size,
    num_local_devices=jax.local_device_count(),
    seed=config.seed,
    foreground_fraction=config.data.foreground_fraction,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_workers=config.data.loader_workers,
  )
  return iter(dataset)


# ---------------------------------------------------------------------------- the loop


def _variables(p_state: TrainState) -> dict:
  state = jax_utils.unreplicate(p_state)
  return {"params": state.params, "batch_stats": state.batch_stats}


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | Path, fold: int | str = 0, mode: str = "train"
) -> dict:
  """Trains on the other folds and validates on `fold` (or evaluates only, with mode='eval').

  Re-running the same command resumes from the latest intact checkpoint in WORKDIR/checkpoints.
  Faults: `workdir_lock`, `resume_check`, `preemption` (raises `preemption.Stopped`).
  Returns the last validation summary.
  """
  workdir = Path(workdir)
  with (
    workdir_lock.WorkdirLock(workdir) as lock,
    checkpoint.make_manager(workdir, config.keep_checkpoints) as manager,
  ):
    resume_check.write_config(config, workdir, bool(manager.all_steps()), fold)
    return _train_and_evaluate(config, workdir, fold, mode, manager, lock)


def _train_and_evaluate(config, workdir, fold, mode, manager, lock) -> dict:
  cache, train_ids, val_ids = prepare_data(config, workdir, fold)
  names = class_names(config, cache)
  num_classes = len(names)
  if jax.process_index() == 0:  # plan.json: all predict needs to preprocess scans like these
    write_json_atomic(
      workdir / "plan.json",
      {
        **cache.plan,
        "cache_dir": str(cache.dir.absolute()),
        "class_names": {str(k): v for k, v in names.items()},
      },
    )
    print(
      f"{workdir}: fold {fold}, {len(train_ids)} training and {len(val_ids)} validation cases, "
      f"{num_classes} classes, {jax.device_count()} device(s), cache {cache.dir}",
      flush=True,
    )
  model = model_lib.build_model(config, num_classes, cache.num_channels, bn_axis_name=AXIS)
  state = create_train_state(config, model)

  validator = None

  def run_validation(variables, step):
    nonlocal validator
    if validator is None:  # built (and compiled) once per run
      validator = validate.Validator(config, model, variables, cache, val_ids, names)
    summary = {"step": step, **validator(variables, workdir / "eval" / "predictions")}
    if jax.process_index() == 0:
      summaries.write_summary(summary, workdir / "eval" / "summary.json")
    return summary

  if mode == "eval":
    step, state = checkpoint.restore_intact(manager, "best", state)
    summary = run_validation({"params": state.params, "batch_stats": state.batch_stats}, step)
    print(summaries.format_table(summary))
    return summary
  if mode != "train":
    raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")

  train_iter = make_train_iterator(config, cache, train_ids)
  summary, log, stopped, stop = None, None, None, preemption.StopRequest(lock.release)
  try:
    start_step, state = checkpoint.resume(manager, state, train_iter)
    p_state = jax_utils.replicate(state)
    del state
    p_train_step = make_p_train_step(config, num_classes, cache.plan["target_spacing"])
    log = metric_writers.TrainingLog(
      workdir, learning_rate_schedule(config), config.num_steps, start_step
    )
    for step in range(start_step + 1, config.num_steps + 1):
      batch = next(train_iter)
      p_state, step_metrics = p_train_step(p_state, batch)
      log.add(step, step_metrics)
      is_last = step == config.num_steps
      stopped = step if stop.agreed() and not is_last else None
      do_eval = step % config.eval_every == 0 or is_last
      do_save = step % config.checkpoint_every == 0 or is_last or do_eval or stopped
      if step % config.log_every == 0 or do_save:
        log.flush(log=step % config.log_every == 0 or is_last)
      if do_eval:
        summary = run_validation(_variables(p_state), step)
        log.add_eval(step, summary)
        print(f"step {step}: validation mean Dice {summary['mean_dice']:.4f}", flush=True)
      if do_save:
        checkpoint.save(
          manager,
          step,
          jax_utils.unreplicate(p_state),
          train_iter,
          summary["mean_dice"] if do_eval else None,
        )
      if stopped:
        break
  finally:
    stop.close()
    manager.wait_until_finished()
    if log:
      log.close()
    train_iter.close()
  if stopped:
    raise preemption.Stopped(stop.signum, stopped, manager.directory / str(stopped))

  if summary is None:  # nothing left to train: report the latest checkpoint's validation
    summary = run_validation(_variables(p_state), config.num_steps)
  if jax.process_index() == 0:
    print(summaries.format_table(summary))
    from vnet_jax import report  # here: importing training must not import matplotlib

    try:
      print(f"report: {report.make_report(workdir)}")
    except (DataError, OSError) as e:  # the trained run stays usable; the report can be redone
      print(f"warning: no report ({e}); retry with python -m vnet_jax.report --workdir={workdir}")
  return summary
