"""Dataset discovery: FLARE22 and nnU-Net v2 layouts, and image grouping for prediction.

Layouts (auto-detected by `discover_dataset`):
- FLARE22: `DIR/images/<case>_0000.nii.gz` + `DIR/labels/<case>.nii.gz`; one "CT" channel and the
  13 FLARE22 organ classes (`FLARE22_CLASSES`).
- nnU-Net v2: `DIR/dataset.json` + `DIR/imagesTr/<case>_XXXX<ending>` (one file per channel) +
  `DIR/labelsTr/<case><ending>`.
`.nii` and `.nii.gz` are both accepted everywhere. Problems raise `DataError` with one line that
names the offending path.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from pathlib import Path

from vnet_jax.errors import DataError

FLARE22 = "flare22"
NNUNET_V2 = "nnunetv2"

# Background plus the 13 FLARE22 organs (label ids of the official ground truth).
FLARE22_CLASSES: dict[int, str] = {
  0: "background",
  1: "liver",
  2: "right kidney",
  3: "spleen",
  4: "pancreas",
  5: "aorta",
  6: "inferior vena cava",
  7: "right adrenal gland",
  8: "left adrenal gland",
  9: "gallbladder",
  10: "esophagus",
  11: "stomach",
  12: "duodenum",
  13: "left kidney",
}

# Normalised-surface-Dice tolerance (mm) per organ, from the FLARE22 scorer (no background entry).
FLARE22_TOLERANCES_MM: dict[int, float] = {
  1: 5.0,
  2: 3.0,
  3: 3.0,
  4: 5.0,
  5: 2.0,
  6: 2.0,
  7: 2.0,
  8: 2.0,
  9: 2.0,
  10: 3.0,
  11: 5.0,
  12: 7.0,
  13: 3.0,
}

NIFTI_ENDINGS = (".nii.gz", ".nii")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")

_EXPECTED_LAYOUTS = (
  "expected FLARE22 (images/<case>_0000.nii.gz + labels/<case>.nii.gz) or "
  "nnU-Net v2 (dataset.json + imagesTr/<case>_0000.nii.gz + labelsTr/<case>.nii.gz)"
)


@dataclasses.dataclass(frozen=True)
class Case:
  """One case: its channel files in channel order and, for training data, its label file."""

  case_id: str
  image_files: tuple[Path, ...]
  label_file: Path | None = None


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A discovered dataset. `cases` are sorted by id; `class_names` include 0 (background)."""

  root: Path
  layout: str
  cases: tuple[Case, ...]
  channel_names: tuple[str, ...]
  class_names: dict[int, str]

  @property
  def case_ids(self) -> tuple[str, ...]:
    return tuple(c.case_id for c in self.cases)

  @property
  def num_channels(self) -> int:
    return len(self.channel_names)

  @property
  def num_classes(self) -> int:
    return max(self.class_names) + 1

  def case(self, case_id: str) -> Case:
    for c in self.cases:
      if c.case_id == case_id:
        return c
    raise KeyError(case_id)


def split_nifti_name(name: str) -> tuple[str, str] | None:
  """'a_0000.nii.gz' -> ('a_0000', '.nii.gz'); None when the name is not a NIfTI file."""
  if name.startswith("."):  # hidden files, macOS '._x.nii.gz' resource forks
    return None
  for ending in NIFTI_ENDINGS:
    if name.endswith(ending) and len(name) > len(ending):
      return name[: -len(ending)], ending
  return None


def _nifti_files(folder: Path) -> list[Path]:
  return sorted(p for p in folder.iterdir() if p.is_file() and split_nifti_name(p.name))


def _group_channels(files: Iterable[Path]) -> dict[str, dict[int, Path]]:
  """Groups `<case>_XXXX` files by case."""
  groups: dict[str, dict[int, Path]] = {}
  for f in files:
    stem, _ = split_nifti_name(f.name)
    m = _CHANNEL_RE.match(stem)
    if m:
      case_id, channel = m.group("case"), int(m.group("channel"))
    else:
      raise DataError(f"{f}: image name must end in _XXXX (channel index), e.g. {stem}_0000.nii.gz")
    chans = groups.setdefault(case_id, {})
    if channel in chans:
      raise DataError(
        f"{f}: duplicate file for case {case_id!r} channel {channel} (also {chans[channel].name})"
      )
    chans[channel] = f
  return groups


def _ordered_channels(
  case_id: str, chans: dict[int, Path], num_channels: int, folder: Path, ending: str
) -> tuple[Path, ...]:
  for ch in sorted(chans):
    if ch >= num_channels:
      raise DataError(f"{chans[ch]}: channel {ch} but the dataset has {num_channels} channel(s)")
  for ch in range(num_channels):
    if ch not in chans:
      raise DataError(
        f"{folder / f'{case_id}_{ch:04d}{ending}'}: missing channel file for case {case_id!r}"
      )
  return tuple(chans[ch] for ch in range(num_channels))


def _pair_labels(
  groups: dict[str, dict[int, Path]],
  label_dir: Path,
  image_dir: Path,
  num_channels: int,
  ending: str,
) -> tuple[Case, ...]:
  if not label_dir.is_dir():
    raise DataError(f"{label_dir}: label directory missing")
  labels: dict[str, Path] = {}
  for f in _nifti_files(label_dir):
    stem, _ = split_nifti_name(f.name)
    if stem in labels:
      raise DataError(f"{f}: duplicate label for case {stem!r} (also {labels[stem].name})")
    labels[stem] = f
  if not groups and not labels:
    raise DataError(f"{image_dir}: empty dataset, no .nii/.nii.gz images found")
  for case_id in sorted(groups):
    if case_id not in labels:
      first = groups[case_id][min(groups[case_id])]
      raise DataError(f"{first}: image without label (expected {label_dir / (case_id + ending)})")
  for case_id in sorted(labels):
    if case_id not in groups:
      raise DataError(
        f"{labels[case_id]}: label without image (expected {image_dir / f'{case_id}_0000{ending}'})"
      )
  return tuple(
    Case(
      case_id,
      _ordered_channels(case_id, groups[case_id], num_channels, image_dir, ending),
      labels[case_id],
    )
    for case_id in sorted(groups)
  )


def read_dataset_json(path: Path) -> tuple[tuple[str, ...], dict[int, str], str]:
  """(channel names, {id: name} with background 0, file ending) of an nnU-Net v2 dataset.json."""
  try:
    spec = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read ({e})") from None
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: invalid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
  if not isinstance(spec, dict):
    raise DataError(f"{path}: expected a JSON object")
  for key in ("channel_names", "labels"):
    if not isinstance(spec.get(key), dict) or not spec[key]:
      raise DataError(f"{path}: missing or empty {key!r} (a non-empty object)")
  try:
    idx = sorted((int(k), str(v)) for k, v in spec["channel_names"].items())
  except (TypeError, ValueError):
    raise DataError(f"{path}: 'channel_names' keys must be channel indices 0, 1, ...") from None
  if [i for i, _ in idx] != list(range(len(idx))):
    raise DataError(
      f"{path}: 'channel_names' keys must be 0..{len(idx) - 1}, got {[i for i, _ in idx]}"
    )
  channel_names = tuple(n for _, n in idx)
  class_names: dict[int, str] = {}
  for name, value in spec["labels"].items():
    if isinstance(value, bool) or not isinstance(value, int):
      raise DataError(
        f"{path}: label {name!r} has value {value!r}; only integer labels are "
        "supported (no region-based training)"
      )
    if value in class_names:
      raise DataError(f"{path}: labels {class_names[value]!r} and {name!r} share value {value}")
    if not 0 <= value <= 255:
      raise DataError(f"{path}: label {name!r} value {value} outside 0..255")
    class_names[value] = str(name)
  if 0 not in class_names:
    raise DataError(f"{path}: 'labels' must declare background as 0")
  ending = spec.get("file_ending", ".nii.gz")
  if ending not in NIFTI_ENDINGS:
    raise DataError(f"{path}: file_ending {ending!r} not supported (only .nii.gz and .nii)")
  return channel_names, dict(sorted(class_names.items())), ending


def discover_dataset(path: str | Path) -> Dataset:
  """Finds the cases of a FLARE22 or nnU-Net v2 dataset directory (layout auto-detected)."""
  root = Path(path).expanduser()
  if not root.exists():
    raise DataError(f"{root}: dataset directory does not exist")
  if not root.is_dir():
    raise DataError(f"{root}: not a directory; {_EXPECTED_LAYOUTS}")
  if (root / "dataset.json").is_file():
    channel_names, class_names, ending = read_dataset_json(root / "dataset.json")
    image_dir = root / "imagesTr"
    if not image_dir.is_dir():
      raise DataError(f"{image_dir}: image directory missing (nnU-Net v2 layout)")
    groups = _group_channels(_nifti_files(image_dir))
    cases = _pair_labels(groups, root / "labelsTr", image_dir, len(channel_names), ending)
    return Dataset(root, NNUNET_V2, cases, channel_names, class_names)
  if (root / "images").is_dir():
    image_dir = root / "images"
    files = _nifti_files(image_dir)
    groups = _group_channels(files)
    num_channels = max((max(ch) + 1 for ch in groups.values()), default=1)
    ending = split_nifti_name(files[0].name)[1] if files else ".nii.gz"
    cases = _pair_labels(groups, root / "labels", image_dir, num_channels, ending)
    channel_names = (
      ("CT",) if num_channels == 1 else tuple(f"channel{i}" for i in range(num_channels))
    )
    return Dataset(root, FLARE22, cases, channel_names, dict(FLARE22_CLASSES))
  raise DataError(f"{root}: unknown dataset layout; {_EXPECTED_LAYOUTS}")


def discover_images(path: str | Path) -> list[Case]:
  """Cases to predict (no labels) from a folder or a single NIfTI file.

  Files named `<case>_XXXX.nii(.gz)` are grouped into one multi-channel case per `<case>`
  (channels must be 0..C-1); any other NIfTI file is a single-channel case named by its stem.
  A single file given directly is always its own single-channel case.
  """
  p = Path(path).expanduser()
  if not p.exists():
    raise DataError(f"{p}: does not exist")
  if p.is_file():
    parts = split_nifti_name(p.name)
    if parts is None:
      raise DataError(f"{p}: not a NIfTI file (.nii or .nii.gz)")
    m = _CHANNEL_RE.match(parts[0])
    return [Case(m.group("case") if m else parts[0], (p,), None)]
  files = _nifti_files(p)
  if not files:
    raise DataError(f"{p}: no .nii/.nii.gz images found")
  # A plain `a.nii.gz` beside `a_0000.nii.gz` would give two cases named 'a': refuse it.
  groups: dict[str, dict[int, Path]] = {}
  plain: dict[str, Path] = {}
  for f in files:
    stem, _ = split_nifti_name(f.name)
    m = _CHANNEL_RE.match(stem)
    if m is None:
      if stem in plain:
        raise DataError(f"{f}: duplicate image for case {stem!r} (also {plain[stem].name})")
      plain[stem] = f
      continue
    chans = groups.setdefault(m.group("case"), {})
    ch = int(m.group("channel"))
    if ch in chans:
      raise DataError(
        f"{f}: duplicate file for case {m.group('case')!r} channel {ch} (also {chans[ch].name})"
      )
    chans[ch] = f
  cases = []
  for case_id, f in plain.items():
    if case_id in groups:
      raise DataError(f"{f}: clashes with the channel files of case {case_id!r}")
    cases.append(Case(case_id, (f,), None))
  for case_id, chans in groups.items():
    ending = split_nifti_name(chans[min(chans)].name)[1]
    cases.append(Case(case_id, _ordered_channels(case_id, chans, max(chans) + 1, p, ending), None))
  return sorted(cases, key=lambda c: c.case_id)
