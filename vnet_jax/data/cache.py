"""The on-disk preprocessed cache: building it (resumable, in a process pool) and reading it.

Layout (docs/architecture.md): `<cache_root>/<hash>/plan.json` and
`cases/<case_id>/{image.npy, label.npy, meta.json}` (`load_case`). The hash covers the
dataset's file list and every setting (`plan.cache_hash`), so a change gives a new directory,
never a stale one. plan.json is written last, when every case is complete, so its presence
marks a complete cache. Work in progress lives in `.tmp/` (partially written case directories,
renamed into place when complete), `.stage/` (first pass of CT datasets: cropped and resampled
but not yet normalised, plus foreground intensity samples) and `plan.pending.json` (the dataset
statistics once known). A rerun resumes from whatever is complete; a DataError removes the hash
directory (the fix changes the hash).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from vnet_jax.data.layouts import Case, Dataset, discover_dataset
from vnet_jax.data.plan import (
  CACHE_VERSION,
  FG_SAMPLES_MIN_PER_CASE,
  FG_SAMPLES_TOTAL,
  PreprocessSettings,
  base_plan,
  cache_hash,
  compute_ct_stats,
  ct_stats_known,
)
from vnet_jax.data.preprocess import apply_ct_normalization, preprocess_arrays
from vnet_jax.data.validation import (
  CaseHeader,
  check_case_content,
  read_case_arrays,
  validate_dataset,
)
from vnet_jax.errors import DataError
from vnet_jax.files import write_json_atomic

PLAN_FILE = "plan.json"
PENDING_PLAN_FILE = "plan.pending.json"
_STALE_TMP_S = 24 * 3600


def case_dir(cache_dir: str | Path, case_id: str) -> Path:
  """Where a case's image.npy, label.npy and meta.json are."""
  return Path(cache_dir) / "cases" / case_id


def load_case(
  cache_dir: str | Path, case_id: str, *, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """(image (D, H, W, C) float32|float16, label (D, H, W)) of a cached case; DataError if bad."""
  d = case_dir(cache_dir, case_id)
  arrays = []
  for name in ("image.npy", "label.npy"):
    path = d / name
    try:
      arrays.append(np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False))
    except FileNotFoundError:
      raise DataError(f"{path}: missing from the preprocessed cache") from None
    except (ValueError, OSError) as e:
      raise DataError(f"{path}: unreadable ({e})") from None
  image, label = arrays
  if image.ndim != 4 or image.dtype not in (np.float32, np.float16):
    raise DataError(
      f"{d / 'image.npy'}: expected (D, H, W, C) float32|float16, got {image.shape} {image.dtype}"
    )
  if label.shape != image.shape[:3] or not np.issubdtype(label.dtype, np.integer):
    raise DataError(
      f"{d / 'label.npy'}: expected integer {image.shape[:3]}, got {label.shape} {label.dtype}"
    )
  return image, label


@dataclasses.dataclass(frozen=True)
class CachedDataset:
  """A complete preprocessed cache directory (`<cache_root>/<hash>`)."""

  dir: Path
  plan: dict

  @property
  def case_ids(self) -> tuple[str, ...]:
    return tuple(self.plan["case_ids"])

  @property
  def num_channels(self) -> int:
    return int(self.plan["num_channels"])

  @property
  def num_classes(self) -> int:
    return int(self.plan["num_classes"])

  @property
  def class_names(self) -> dict[int, str]:
    return {int(k): v for k, v in self.plan["class_names"].items()}

  @property
  def target_spacing(self) -> tuple[float, float, float]:
    return tuple(self.plan["target_spacing"])

  def case_dir(self, case_id: str) -> Path:
    return case_dir(self.dir, case_id)

  def load_case(self, case_id: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(image (D,H,W,C) float32/float16, label (D,H,W) uint8), memory-mapped read-only by
    default; see `load_case`."""
    return load_case(self.dir, case_id, mmap=mmap)

  def load_meta(self, case_id: str) -> dict:
    return json.loads((self.case_dir(case_id) / "meta.json").read_text())


def open_cache(directory: str | Path) -> CachedDataset:
  """Opens a complete cache directory; DataError if it is missing, incomplete or foreign."""
  d = Path(directory)
  try:
    plan = json.loads((d / PLAN_FILE).read_text())
  except FileNotFoundError:
    raise DataError(f"{d}: not a complete preprocessed cache ({PLAN_FILE} missing)") from None
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{d / PLAN_FILE}: unreadable ({' '.join(str(e).split())})") from None
  if plan.get("version") != CACHE_VERSION:
    raise DataError(
      f"{d / PLAN_FILE}: cache version {plan.get('version')} != {CACHE_VERSION}; preprocess again"
    )
  for cid in plan["case_ids"]:
    for name in ("image.npy", "label.npy", "meta.json"):
      if not (case_dir(d, cid) / name).is_file():
        raise DataError(
          f"{case_dir(d, cid)}: incomplete cache, {name} missing; rerun preprocessing to resume"
        )
  return CachedDataset(d, plan)


def prepare_dataset(
  dataset: Dataset | str | Path,
  settings: PreprocessSettings | None = None,
  cache_root: str | Path = ".vnet_jax_cache",
  num_workers: int = 2,
  progress: bool = True,
) -> CachedDataset:
  """Preprocesses every case once into `<cache_root>/<hash>/`, resuming and reusing the cache.

  Header checks run on all cases first; content checks run as each case is read. A bad case
  raises DataError and removes this hash directory (fixing the file changes the hash anyway).
  plan.json is written only once every case is complete, so an interrupted run (crash, kill)
  is never trusted; rerunning resumes from its finished cases. `num_workers` 0 or 1 runs in
  this process. `dataset` may be a path (layout auto-detected).
  """
  if not isinstance(dataset, Dataset):
    dataset = discover_dataset(dataset)
  settings = settings or PreprocessSettings()
  digest = cache_hash(dataset, settings)
  hdir = Path(cache_root).expanduser() / digest
  if (hdir / PLAN_FILE).exists():
    try:
      return open_cache(hdir)
    except DataError:
      pass  # incomplete (e.g. a case directory deleted): resume below
  headers = validate_dataset(dataset)
  hdir.mkdir(parents=True, exist_ok=True)
  _clean_stale_tmp(hdir / ".tmp")
  try:
    _prepare(dataset, settings, headers, digest, hdir, num_workers, progress)
  except DataError:
    # Fixing the bad file changes its size/mtime and so the hash: nothing in this directory
    # could ever be reused, and nothing in it may be trusted.
    if not (hdir / PLAN_FILE).exists():
      shutil.rmtree(hdir, ignore_errors=True)
    raise
  return open_cache(hdir)


def _prepare(
  dataset: Dataset,
  settings: PreprocessSettings,
  headers: dict[str, CaseHeader],
  digest: str,
  hdir: Path,
  num_workers: int,
  progress: bool,
) -> None:
  if (hdir / PLAN_FILE).exists():
    plan = json.loads((hdir / PLAN_FILE).read_text())
  elif (hdir / PENDING_PLAN_FILE).exists():
    plan = json.loads((hdir / PENDING_PLAN_FILE).read_text())
  else:
    plan = base_plan(dataset, settings, headers, digest)
  n_cases = len(dataset.cases)
  n_samples = max(FG_SAMPLES_MIN_PER_CASE, FG_SAMPLES_TOTAL // n_cases)
  stage_dir = hdir / ".stage"

  def done(c: Case) -> bool:
    return (case_dir(hdir, c.case_id) / "meta.json").exists()

  def staged(c: Case) -> bool:
    return (stage_dir / c.case_id / "meta.json").exists()

  if not ct_stats_known(plan):
    # First pass of CT data: the window and mean/std need every case's foreground intensities,
    # so cases are cropped and resampled (and sampled) first, normalised in the second pass.
    tasks = [
      ("stage", c, headers[c.case_id], plan, str(hdir), n_samples)
      for c in dataset.cases
      if not staged(c) and not done(c)
    ]
    _run(tasks, num_workers, progress, "preprocess (pass 1/2)")
    plan = compute_ct_stats(plan, stage_dir, [c.case_id for c in dataset.cases])
    write_json_atomic(hdir / PENDING_PLAN_FILE, plan, indent=1)
  tasks = []
  for c in dataset.cases:
    if done(c):
      continue
    kind = "finish" if staged(c) else "full"
    tasks.append((kind, c, headers[c.case_id], plan, str(hdir), n_samples))
  two_pass = any(t[0] == "finish" for t in tasks)
  _run(tasks, num_workers, progress, "preprocess (pass 2/2)" if two_pass else "preprocess")
  if not (hdir / PLAN_FILE).exists():
    write_json_atomic(hdir / PLAN_FILE, plan, indent=1)
  (hdir / PENDING_PLAN_FILE).unlink(missing_ok=True)
  shutil.rmtree(stage_dir, ignore_errors=True)
  with contextlib.suppress(OSError):  # not empty: a concurrent run's work in progress
    (hdir / ".tmp").rmdir()


def _worker(task: tuple) -> str:
  """One unit of work (top-level so spawned processes can run it)."""
  kind, case, header, plan, hdir, n_samples = task
  hdir = Path(hdir)
  final = case_dir(hdir, case.case_id)
  if kind == "finish":  # staged (cropped, resampled) case: apply the CT normalisation now
    stage = hdir / ".stage" / case.case_id
    image = np.load(stage / "image.npy")
    apply_ct_normalization(image, plan)
    _write_dir_atomic(
      final,
      hdir / ".tmp",
      case.case_id,
      {
        "image.npy": image.astype(plan["image_dtype"], copy=False),
        "label.npy": np.load(stage / "label.npy"),
      },
      {"meta.json": json.loads((stage / "meta.json").read_text())},
    )
    shutil.rmtree(stage, ignore_errors=True)
    return case.case_id
  images, label = read_case_arrays(case)
  check_case_content(case, images, label, plan["original_class_ids"])
  image, lab, meta, samples = preprocess_arrays(
    images, label, header, plan, case.case_id, n_samples if kind == "stage" else 0
  )
  del images, label
  meta["image_files"] = [str(f) for f in case.image_files]
  meta["label_file"] = str(case.label_file) if case.label_file is not None else None
  if kind == "stage":
    arrays = {"image.npy": image, "label.npy": lab}
    for c, s in samples.items():
      arrays[f"fg_samples_{c}.npy"] = s
    _write_dir_atomic(
      hdir / ".stage" / case.case_id, hdir / ".tmp", case.case_id, arrays, {"meta.json": meta}
    )
  else:
    _write_dir_atomic(
      final,
      hdir / ".tmp",
      case.case_id,
      {"image.npy": image.astype(plan["image_dtype"], copy=False), "label.npy": lab},
      {"meta.json": meta},
    )
  return case.case_id


def _run(tasks: list[tuple], num_workers: int, progress: bool, desc: str) -> None:
  if not tasks:
    return
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  with tqdm(total=len(tasks), desc=desc, unit="case", disable=not progress) as bar:
    if num_workers <= 1 or len(tasks) == 1:
      for t in tasks:
        bar.set_postfix_str(t[1].case_id)
        _worker(t)
        bar.update()
      return
    ex = concurrent.futures.ProcessPoolExecutor(
      max_workers=min(num_workers, len(tasks)), mp_context=_mp_context()
    )
    try:
      futures = [ex.submit(_worker, t) for t in tasks]
      for f in concurrent.futures.as_completed(futures):
        bar.set_postfix_str(f.result())
        bar.update()
    except concurrent.futures.process.BrokenProcessPool as e:
      ex.shutdown(wait=True, cancel_futures=True)
      raise RuntimeError(
        "a preprocessing worker died (out of memory? or, with the 'spawn' start method, a "
        "script that calls prepare_dataset outside `if __name__ == '__main__':`); "
        "retry with fewer num_workers, or 0 to preprocess in this process"
      ) from e
    except BaseException:
      ex.shutdown(wait=True, cancel_futures=True)  # running cases finish or clean up after them
      raise
    ex.shutdown(wait=True)


def _mp_context():
  # fork is fast and works from any script, but copying a process that already runs JAX's
  # threads can deadlock the child: then spawn (fresh interpreters importing this module).
  if "jax" in sys.modules or "fork" not in multiprocessing.get_all_start_methods():
    return multiprocessing.get_context("spawn")
  return multiprocessing.get_context("fork")


def _tmp_name(case_id: str) -> str:
  return f"{case_id}__{socket.gethostname()}__{os.getpid()}__{uuid.uuid4().hex[:8]}"


def _write_dir_atomic(
  final: Path, tmp_root: Path, case_id: str, arrays: dict[str, np.ndarray], jsons: dict[str, Any]
) -> None:
  """Writes a directory under .tmp/ and renames it into place only once every file is written."""
  tmp_root.mkdir(parents=True, exist_ok=True)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = tmp_root / _tmp_name(case_id)
  tmp.mkdir()
  try:
    for name, arr in arrays.items():
      np.save(tmp / name, arr, allow_pickle=False)
    for name, obj in jsons.items():
      (tmp / name).write_text(json.dumps(obj))
    try:
      os.rename(tmp, final)
    except OSError:
      if not (final / "meta.json").exists():
        raise
      shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same case
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _clean_stale_tmp(tmp_root: Path) -> None:
  """Removes leftovers of interrupted runs: ours (same host, dead pid) or over a day old."""
  if not tmp_root.is_dir():
    return
  host = socket.gethostname()
  for d in tmp_root.iterdir():
    parts = d.name.rsplit("__", 3)
    stale = False
    if len(parts) == 4 and parts[1] == host and parts[2].isdigit():
      stale = not _pid_alive(int(parts[2]))
    if not stale:  # another host's (shared file system) or a live run's: only when very old
      try:
        stale = time.time() - d.stat().st_mtime > _STALE_TMP_S
      except OSError:
        continue
    if stale and d.is_dir():
      shutil.rmtree(d, ignore_errors=True)
    elif stale:
      d.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  return True
