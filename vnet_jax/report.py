r"""Plots and `report.html` for a training run's workdir.

    python -m vnet_jax.report --workdir=W

Reads what training writes into W (docs/architecture.md): `metrics.jsonl`, `eval/history.jsonl`,
`eval/summary.json`, `plan.json` (class names, target spacing, `cache_dir`) and
`eval/predictions/<case>.npz` ("labels", uint8 (D, H, W) on the preprocessed grid), and writes
- `W/plots/training_curves.png`: losses, accuracy and IoU, learning rate, validation Dice;
- `W/plots/dice_per_class.png`: per-organ Dice over the validation cases (box plot + mean);
- `W/plots/overlay_<case>.png`: axial, coronal and sagittal slices of each predicted case with
  the reference (solid) and predicted (dashed) organ outlines;
- `W/report.html`: one page showing all of it, with images referenced relatively (plots/...),
  so the page stays small and the folder can be copied as a whole.
Everything is regenerated on each call. Missing optional inputs (metrics, history, plan,
predictions, the cache) are skipped with a note on the page; a missing workdir or an unreadable
summary is a DataError.

Display convention (radiological): the viewer faces the patient, so the patient's right is on
the image's left in axial and coronal views; axial slices are seen from the feet with anterior
up, coronal and sagittal slices have superior up, and sagittal slices have anterior on the left.
The arrays are (z, y, x) of the RAS-reoriented volume (x towards the patient's right, y anterior,
z superior), so every view is the array slice flipped in both directions. Pixels are drawn with
the plan's target spacing, so anisotropic voxels keep their physical aspect ratio.

Organ colours are fixed per class id (tab20 without its greys, dark shades first), so the same
organ has the same colour in every plot of every run.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")  # headless: training machines and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from scipy import ndimage  # noqa: E402

from vnet_jax.errors import DataError, one_line  # noqa: E402
from vnet_jax.files import write_text_atomic  # noqa: E402

PLOTS_DIR = "plots"
CURVES_PNG = "training_curves.png"
DICE_PNG = "dice_per_class.png"
REPORT_HTML = "report.html"
METRICS = ("dice", "nsd", "hd95")
WINDOW_PERCENTILES = (1.0, 99.0)
DPI = 100

# tab20 comes in (dark, light) pairs of one hue; taking the dark shades first keeps neighbouring
# ids (the usual 1..13 organs) in different hues. Its greys (14, 15) vanish on a grey CT.
_TAB20_ORDER = (0, 2, 4, 6, 8, 10, 12, 16, 18, 1, 3, 5, 7, 9, 11, 13, 17, 19)
_PALETTE = tuple(matplotlib.colormaps["tab20"].colors[i] for i in _TAB20_ORDER)


# ---------------------------------------------------------------------------- inputs


def class_color(class_id: int) -> tuple[float, float, float]:
  """Fixed RGB colour of a foreground class id (ids past the palette wrap around)."""
  return tuple(_PALETTE[(int(class_id) - 1) % len(_PALETTE)])


def _num(x: Any) -> float:
  # summary.json writes NaN as null.
  if x is None:
    return math.nan
  if isinstance(x, bool) or not isinstance(x, (int, float)):
    raise TypeError(f"expected a number or null, got {x!r}")
  return float(x)


def read_jsonl(path: str | Path) -> tuple[list[dict], int]:
  """(records, number of lines skipped) of a JSON-lines file.

  Lines that do not parse as a JSON object are skipped rather than fatal: training appends to
  these files while a report may be made, so the last line can be half-written.
  """
  records, bad = [], 0
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        bad += 1
        continue
      if isinstance(rec, dict):
        records.append(rec)
      else:
        bad += 1
  return records, bad


def read_summary(path: str | Path) -> dict:
  """eval/summary.json with numbers as floats (null -> NaN); DataError if it cannot be read."""
  path = Path(path)
  try:
    raw = json.loads(path.read_text(encoding="utf-8"))
    per_class = {
      str(name): {m: _num(v.get(m)) for m in METRICS} for name, v in raw["per_class"].items()
    }
    per_case = [
      {
        "case": str(c["case"]),
        "per_class": {
          str(name): {m: _num(v.get(m)) for m in METRICS} for name, v in c["per_class"].items()
        },
      }
      for c in raw.get("per_case") or []
    ]
    return {
      "step": raw.get("step"),
      "mean_dice": _num(raw["mean_dice"]),
      "mean_nsd": _num(raw.get("mean_nsd")),
      "per_class": per_class,
      "per_case": per_case,
    }
  except FileNotFoundError:
    raise DataError(f"{path}: summary file does not exist") from None
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise DataError(f"{path}: unreadable summary ({one_line(e)})") from None


def _class_ids(names: Iterable[str], plan: Mapping | None) -> dict[str, int]:
  """Class name -> id, from the plan's class_names; names it lacks get the next free ids."""
  ids: dict[str, int] = {}
  for k, v in ((plan or {}).get("class_names") or {}).items():
    try:
      ids.setdefault(str(v), int(k))
    except (TypeError, ValueError):
      continue
  out, nxt = {}, max(ids.values(), default=0) + 1
  for name in names:
    if name in ids:
      out[name] = ids[name]
    else:
      out[name], nxt = nxt, nxt + 1
  return out


# ---------------------------------------------------------------------------- plots


def _save(fig, path: Path) -> Path:
  # Written beside and renamed, so a browser showing the report never loads half a PNG.
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    fig.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, path)
  finally:
    plt.close(fig)  # pyplot keeps every open figure alive otherwise
    tmp.unlink(missing_ok=True)
  return path


def _series(records: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
  steps, values = [], []
  for r in records:
    s, v = r.get("step"), r.get(key)
    if isinstance(s, (int, float)) and isinstance(v, (int, float)) and math.isfinite(v):
      steps.append(s)
      values.append(v)
  return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def _empty(ax, text: str) -> None:
  ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def plot_training_curves(
  metrics: Sequence[Mapping],
  history: Sequence[Mapping],
  out_path: str | Path,
  class_ids: Mapping[str, int] | None = None,
) -> Path:
  """Four panels over training steps: losses, accuracy and IoU, learning rate, validation Dice.

  metrics: metrics.jsonl records; history: eval/history.jsonl records (either may be empty).
  class_ids: class name -> id for the per-organ validation Dice colours.
  """
  fig, axes = plt.subplots(2, 2, figsize=(13, 8), layout="constrained", sharex=True)
  panels = (
    (axes[0, 0], "Training losses", ("loss", "dice_loss", "focal_loss")),
    (axes[0, 1], "Training accuracy and IoU", ("accuracy", "iou")),
    (axes[1, 0], "Learning rate", ("learning_rate",)),
  )
  for ax, title, keys in panels:
    ax.set_title(title)
    drawn = False
    for key in keys:
      x, y = _series(metrics, key)
      if x.size:
        ax.plot(x, y, label=key, lw=1.2, marker="." if x.size < 50 else None)
        drawn = True
    if drawn:
      ax.legend(fontsize=8)
      ax.grid(alpha=0.3)
    else:
      _empty(ax, "no metrics.jsonl records")
  axes[1, 0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

  ax = axes[1, 1]
  ax.set_title("Validation Dice")
  x, y = _series(history, "mean_dice")
  if x.size:
    names: list[str] = []
    for r in history:
      names += [n for n in (r.get("per_class") or {}) if n not in names]
    ids = class_ids or {n: i + 1 for i, n in enumerate(names)}
    for name in names:
      # Thin per-organ lines in the overlay colours show which organs lag behind the mean.
      steps = [
        r["step"] for r in history if isinstance((r.get("per_class") or {}).get(name), (int, float))
      ]
      vals = [
        r["per_class"][name]
        for r in history
        if isinstance((r.get("per_class") or {}).get(name), (int, float))
      ]
      if steps:
        ax.plot(steps, vals, lw=0.8, alpha=0.6, color=class_color(ids.get(name, 1)), label=name)
    ax.plot(x, y, color="black", lw=2.2, marker="o", ms=3, label="mean")
    best = int(np.argmax(y))
    ax.annotate(
      f"best {y[best]:.4f} @ {x[best]:g}",
      (x[best], y[best]),
      textcoords="offset points",
      xytext=(0, 8),
      ha="center",
      fontsize=8,
    )
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
  else:
    _empty(ax, "no validation history")
  for ax in axes[1]:
    ax.set_xlabel("step")
  return _save(fig, Path(out_path))


def plot_dice_per_class(
  summary: Mapping, out_path: str | Path, class_ids: Mapping[str, int] | None = None
) -> Path:
  """Per-organ Dice over the validation cases: box plot, the cases as dots, the class mean.

  summary: as returned by `read_summary`. The mean marker is the summary's per-class Dice (the
  number the table reports); the dashed line is the summary's mean Dice over classes.
  """
  names = list(summary["per_class"])
  ids = class_ids or {n: i + 1 for i, n in enumerate(names)}
  values = []
  for name in names:
    v = [
      c["per_class"][name]["dice"] for c in summary.get("per_case", []) if name in c["per_class"]
    ]
    values.append(np.asarray([d for d in v if math.isfinite(d)], np.float64))
  fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(names) + 2.0), 5), layout="constrained")
  pos = np.arange(1, len(names) + 1)
  has = [i for i, v in enumerate(values) if v.size]
  if has:
    bp = ax.boxplot(
      [values[i] for i in has],
      positions=pos[has],
      widths=0.6,
      patch_artist=True,
      showfliers=False,
      medianprops={"color": "black"},
    )
    for box, i in zip(bp["boxes"], has):
      box.set_facecolor((*class_color(ids[names[i]]), 0.35))
    rng = np.random.default_rng(0)  # fixed jitter: the same summary gives the same picture
    for i in has:
      jitter = rng.uniform(-0.15, 0.15, values[i].size)
      ax.scatter(
        pos[i] + jitter,
        values[i],
        s=14,
        color=class_color(ids[names[i]]),
        edgecolors="black",
        linewidths=0.4,
        zorder=3,
      )
  means = [summary["per_class"][n]["dice"] for n in names]
  ax.scatter(
    pos, means, marker="D", s=40, color="white", edgecolors="black", zorder=4, label="class mean"
  )
  if math.isfinite(summary["mean_dice"]):
    ax.axhline(
      summary["mean_dice"],
      color="0.3",
      ls="--",
      lw=1,
      label=f"mean Dice {summary['mean_dice']:.4f}",
    )
  ax.set_xticks(pos, names, rotation=40, ha="right")
  ax.set_xlim(0.4, len(names) + 0.6)
  ax.set_ylim(-0.02, 1.05)
  ax.set_ylabel("Dice")
  n_cases = len(summary.get("per_case", []))
  step = summary.get("step")
  ax.set_title(
    f"Validation Dice per class ({n_cases} case{'s' if n_cases != 1 else ''}"
    + (f", step {step}" if step is not None else "")
    + ")"
  )
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8, loc="lower left")
  return _save(fig, Path(out_path))


def select_slices(
  reference: np.ndarray, prediction: np.ndarray | None = None
) -> tuple[int, int, int]:
  """(k, j, i): axial, coronal and sagittal slice indices of a (D, H, W) label volume.

  Per axis, the slice through the most organs: each class scores its area in the slice
  relative to its own largest cross-section along that axis, so every organ counts at most 1
  and one large organ (the liver) cannot decide alone. Ties go to the slice nearest the
  foreground centroid. An empty reference falls back to the prediction, then to the middle.
  """
  lab = np.asarray(reference)
  if lab.ndim != 3:
    raise ValueError(f"expected a (D, H, W) label volume, got shape {lab.shape}")
  if not lab.any() and prediction is not None:
    lab = np.asarray(prediction)
  if not lab.any():
    return tuple(n // 2 for n in lab.shape)
  lab = lab.astype(np.int32, copy=False)
  scores = [np.zeros(n) for n in lab.shape]
  # Bounding boxes first, so each class is counted on its crop only.
  for c, box in enumerate(ndimage.find_objects(lab), start=1):
    if box is None:
      continue
    m = lab[box] == c
    for axis in range(3):
      area = m.sum(axis=tuple(a for a in range(3) if a != axis)).astype(np.float64)
      scores[axis][box[axis]] += area / area.max()
  centroid = ndimage.center_of_mass(lab > 0)
  out = []
  for axis in range(3):
    s = scores[axis]
    best = np.flatnonzero(s >= s.max() - 1e-9)
    out.append(int(best[np.argmin(np.abs(best - centroid[axis]))]))
  return tuple(out)


# view name, fixed axis, (row, column) spacing axes, (top, bottom, left, right) edge letters
_VIEWS = (
  ("axial", 0, (1, 2), "APRL"),
  ("coronal", 1, (0, 2), "SIRL"),
  ("sagittal", 2, (0, 1), "SIAP"),
)


def _view(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
  # Flipping both in-plane axes gives the radiological view of every plane (module docstring).
  return np.asarray(np.take(volume, index, axis=axis))[::-1, ::-1]


def _outline(ax, mask: np.ndarray, color, linestyle: str) -> None:
  if not mask.any() or mask.all():
    return  # nothing to outline (and contour would warn about a constant field)
  # A zero border closes outlines of organs cut by the volume's edge.
  padded = np.pad(mask.astype(np.float32), 1)
  ys = np.arange(-1, mask.shape[0] + 1)
  xs = np.arange(-1, mask.shape[1] + 1)
  ax.contour(xs, ys, padded, levels=[0.5], colors=[color], linestyles=[linestyle], linewidths=1.4)


def plot_overlay(
  image: np.ndarray,
  reference: np.ndarray,
  prediction: np.ndarray,
  out_path: str | Path,
  class_names: Mapping[int, str] | None = None,
  spacing: Sequence[float] = (1.0, 1.0, 1.0),
  title: str = "",
  slices: Sequence[int] | None = None,
) -> Path:
  """Axial, coronal and sagittal slices: image in grey, reference outlines solid, prediction dashed.

  image: (D, H, W) or (D, H, W, C) (channel 0 is shown), windowed to its 1st-99th percentiles.
  reference, prediction: (D, H, W) integer labels on the image's grid.
  spacing: (z, y, x) voxel size in mm, for the aspect ratio.
  slices: (k, j, i), default `select_slices(reference, prediction)`.
  """
  image = np.asarray(image)
  if image.ndim == 4:
    image = image[..., 0]
  reference, prediction = np.asarray(reference), np.asarray(prediction)
  if not image.shape == reference.shape == prediction.shape:
    raise ValueError(
      f"image {image.shape}, reference {reference.shape} and prediction "
      f"{prediction.shape} must be on one (D, H, W) grid"
    )
  class_names = dict(class_names or {})
  spacing = tuple(float(s) for s in spacing)
  slices = tuple(slices) if slices is not None else select_slices(reference, prediction)
  # Volume-wide window (subsampled for speed): the three views share one grey scale.
  step = max(1, round((image.size / 2e6) ** (1 / 3)))
  sample = np.asarray(image[::step, ::step, ::step], np.float32)
  sample = sample[np.isfinite(sample)]
  lo, hi = np.percentile(sample, WINDOW_PERCENTILES) if sample.size else (0.0, 1.0)
  if not hi > lo:
    hi = lo + 1.0

  # Panel widths follow the physical widths so the three views share one scale.
  widths = [image.shape[cols] * spacing[cols] for _, _, (_, cols), _ in _VIEWS]
  heights = [image.shape[rows] * spacing[rows] for _, _, (rows, _), _ in _VIEWS]
  fig_w = 14.0
  fig_h = min(9.0, max(3.5, fig_w * max(heights) / sum(widths) + 1.6))
  fig, axes = plt.subplots(
    1, 3, figsize=(fig_w, fig_h), layout="constrained", gridspec_kw={"width_ratios": widths}
  )
  shown: set[int] = set()
  for ax, (name, axis, (rows, cols), letters), index in zip(axes, _VIEWS, slices):
    img = _view(image, axis, index).astype(np.float32)
    ref, pred = _view(reference, axis, index), _view(prediction, axis, index)
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    for c in sorted({int(c) for c in np.unique(ref)} | {int(c) for c in np.unique(pred)}):
      if c == 0:
        continue
      shown.add(c)
      _outline(ax, ref == c, class_color(c), "solid")
      _outline(ax, pred == c, class_color(c), (0, (3, 2)))
    ax.set_xlim(-0.5, img.shape[1] - 0.5)
    ax.set_ylim(img.shape[0] - 0.5, -0.5)
    ax.set_aspect(spacing[rows] / spacing[cols])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{name} {'zyx'[axis]}={index}", fontsize=10)
    for (x, y), letter in zip(((0.5, 0.98), (0.5, 0.02), (0.02, 0.5), (0.98, 0.5)), letters):
      # Dark halo: the letters stay legible on bright bone as on air.
      ax.text(
        x,
        y,
        letter,
        transform=ax.transAxes,
        color="yellow",
        fontsize=9,
        fontweight="bold",
        ha="center",
        va="center",
        path_effects=[patheffects.withStroke(linewidth=2, foreground="black")],
      )
  handles = [
    Line2D([], [], color=class_color(c), lw=3, label=class_names.get(c, f"class {c}"))
    for c in sorted(shown)
  ]
  handles += [
    Line2D([], [], color="black", lw=1.4, ls="solid", label="reference"),
    Line2D([], [], color="black", lw=1.4, ls=(0, (3, 2)), label="prediction"),
  ]
  fig.legend(
    handles=handles,
    loc="outside lower center",
    ncol=min(len(handles), 8),
    fontsize=8,
    frameon=False,
  )
  if title:
    fig.suptitle(title, fontsize=11)
  return _save(fig, Path(out_path))


# ---------------------------------------------------------------------------- the report


def _safe_name(case: str) -> str:
  # Case ids come from file names, but a report file name must not leave plots/.
  return re.sub(r"[^A-Za-z0-9._-]", "_", case)


def _fmt(x: float, prec: int = 4) -> str:
  return f"{x:.{prec}f}" if math.isfinite(x) else "n/a"


def _case_mean_dice(case: Mapping) -> float:
  v = [s["dice"] for s in case["per_class"].values() if math.isfinite(s["dice"])]
  return float(np.mean(v)) if v else math.nan


def _read_plan(path: Path, notes: list[str]) -> dict | None:
  if not path.is_file():
    notes.append(f"{path.name} missing: class names and spacing unknown, overlays skipped")
    return None
  try:
    plan = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(plan, dict):
      raise TypeError("not a JSON object")
    return plan
  except (OSError, ValueError, TypeError) as e:
    notes.append(f"{path.name} unreadable ({one_line(e)}): overlays skipped")
    return None


def _make_overlays(
  workdir: Path,
  plots: Path,
  plan: dict | None,
  summary: dict | None,
  class_ids: Mapping[str, int],
  notes: list[str],
) -> list[tuple[str, str]]:
  """[(case, png name)] of the overlays written; reasons for anything skipped go to notes."""
  pred_dir = workdir / "eval" / "predictions"
  files = {p.stem: p for p in pred_dir.glob("*.npz")} if pred_dir.is_dir() else {}
  if not files:
    notes.append("no eval/predictions/*.npz: no overlays")
    return []
  if plan is None:
    return []
  cache_dir = plan.get("cache_dir")
  if not cache_dir:
    notes.append("plan.json has no cache_dir: overlays skipped")
    return []
  if not Path(cache_dir).is_dir():
    notes.append(f"cache directory {cache_dir} no longer exists: overlays skipped")
    return []
  from vnet_jax.data.preprocess import open_cache

  try:
    cache = open_cache(cache_dir)
  except DataError as e:
    notes.append(f"overlays skipped: {e}")
    return []
  spacing = plan.get("target_spacing") or cache.plan.get("target_spacing")
  if not spacing:
    notes.append("no target_spacing in plan.json: overlays drawn with 1 mm voxels")
    spacing = (1.0, 1.0, 1.0)
  names = {i: n for n, i in class_ids.items()}
  for k, v in (plan.get("class_names") or {}).items():
    if str(k).isdigit():
      names.setdefault(int(k), str(v))
  by_case = {c["case"]: c for c in (summary or {}).get("per_case", [])}
  # Summary order first (the table's order), then any other prediction files.
  order = [c for c in by_case if c in files] + sorted(c for c in files if c not in by_case)
  done = []
  for case in order:
    if case not in cache.case_ids:
      notes.append(f"{case}: not in the cache {cache_dir}, overlay skipped")
      continue
    try:
      with np.load(files[case]) as z:
        pred = z["labels"]
      image, label = cache.load_case(case)
      title = case
      if case in by_case:
        title += f"  (mean Dice {_fmt(_case_mean_dice(by_case[case]), 3)})"
      png = f"overlay_{_safe_name(case)}.png"
      plot_overlay(image, label, pred, plots / png, names, spacing, title)
    except (OSError, ValueError, KeyError) as e:
      notes.append(f"{files[case].name}: overlay skipped ({one_line(e)})")
      continue
    done.append((case, png))
  return done


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1400px; margin: 1em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.mean td { font-weight: bold; border-top: 2px solid #888; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em;
          vertical-align: middle; }
.notes { color: #8a5a00; }
img { max-width: 100%; }
figure { margin: 0 0 1.5em; }
figcaption { color: #555; font-size: 0.9em; }
"""


def _img(png: str, alt: str) -> str:
  return (
    f'<img src="{html.escape(PLOTS_DIR + "/" + quote(png))}" '
    f'alt="{html.escape(alt)}" loading="lazy">'
  )


def _swatch(class_id: int) -> str:
  r, g, b = (round(255 * v) for v in class_color(class_id))
  return f'<span class="swatch" style="background: rgb({r}, {g}, {b})"></span>'


def _summary_tables(summary: dict, class_ids: Mapping[str, int]) -> list[str]:
  e = html.escape
  out = ["<table>", "<tr><th>class</th><th>Dice</th><th>NSD</th><th>HD95 (mm)</th></tr>"]
  for name, s in summary["per_class"].items():
    out.append(
      f"<tr><td>{_swatch(class_ids[name])}{e(name)}</td><td>{_fmt(s['dice'])}</td>"
      f"<td>{_fmt(s['nsd'])}</td><td>{_fmt(s['hd95'], 2)}</td></tr>"
    )
  out.append(
    f'<tr class="mean"><td>mean</td><td>{_fmt(summary["mean_dice"])}</td>'
    f'<td>{_fmt(summary["mean_nsd"])}</td><td></td></tr>'
  )
  out.append("</table>")
  if summary["per_case"]:
    names = list(summary["per_class"])
    out += [
      "<h3>Dice per case</h3>",
      "<table>",
      "<tr><th>case</th><th>mean</th>" + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>",
    ]
    for c in summary["per_case"]:
      cells = "".join(
        f"<td>{_fmt(c['per_class'][n]['dice'], 3) if n in c['per_class'] else ''}</td>"
        for n in names
      )
      out.append(f"<tr><td>{e(c['case'])}</td><td>{_fmt(_case_mean_dice(c), 3)}</td>{cells}</tr>")
    out.append("</table>")
  return out


def _write_html(
  path: Path,
  workdir: Path,
  summary: dict | None,
  class_ids: Mapping[str, int],
  curves: bool,
  dice: bool,
  overlays: list[tuple[str, str]],
  notes: list[str],
) -> None:
  e = html.escape
  title = f"vnet_jax report: {workdir.resolve().name}"
  parts = [
    "<!DOCTYPE html>",
    '<html lang="en">',
    "<head>",
    '<meta charset="utf-8">',
    f"<title>{e(title)}</title>",
    f"<style>{_CSS}</style>",
    "</head>",
    "<body>",
    f"<h1>{e(title)}</h1>",
    f"<p>Workdir <code>{e(str(workdir.resolve()))}</code>",
  ]
  if summary is not None:
    step = summary.get("step")
    parts[-1] += (
      f"; validation{f' at step {e(str(step))}' if step is not None else ''}: "
      f"mean Dice <b>{_fmt(summary['mean_dice'])}</b>, "
      f"mean NSD <b>{_fmt(summary['mean_nsd'])}</b> over "
      f"{len(summary['per_case'])} case(s)"
    )
  parts[-1] += ".</p>"
  if notes:
    parts += ['<ul class="notes">'] + [f"<li>{e(n)}</li>" for n in notes] + ["</ul>"]
  if summary is not None:
    parts += ["<h2>Validation summary</h2>"] + _summary_tables(summary, class_ids)
  if curves:
    parts += ["<h2>Training curves</h2>", f"<figure>{_img(CURVES_PNG, 'training curves')}</figure>"]
  if dice:
    parts += [
      "<h2>Dice per class</h2>",
      f"<figure>{_img(DICE_PNG, 'Dice per class')}<figcaption>Boxes over the validation "
      "cases (dots); diamonds: per-class mean; dashed line: mean Dice.</figcaption>"
      "</figure>",
    ]
  if overlays:
    parts += [
      "<h2>Overlays</h2>",
      "<p>Solid outlines: reference; dashed: prediction. Radiological convention: the "
      "patient's right is on the image's left; axial slices seen from the feet with "
      "anterior up; coronal and sagittal with superior up, sagittal with anterior on the "
      "left. Slices cut through the most reference organs.</p>",
    ]
    for case, png in overlays:
      parts += [f"<h3>{e(case)}</h3>", f"<figure>{_img(png, f'overlay {case}')}</figure>"]
  parts += ["</body>", "</html>", ""]
  write_text_atomic(path, "\n".join(parts))


def make_report(workdir: str | Path) -> Path:
  """Regenerates W/plots/*.png and W/report.html from a training workdir; returns the HTML path.

  Optional inputs that are missing or unreadable are skipped with a note on the page. DataError
  if the workdir does not exist, eval/summary.json exists but cannot be read, or there is
  neither a summary nor metrics.jsonl (not a training workdir).
  """
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise DataError(f"{workdir}: workdir does not exist")
  notes: list[str] = []
  summary_path = workdir / "eval" / "summary.json"
  summary = None
  if summary_path.exists():
    summary = read_summary(summary_path)
  else:
    notes.append("eval/summary.json missing (no validation yet): no summary, Dice plot or overlays")

  def jsonl(rel: str) -> list[dict]:
    p = workdir / rel
    if not p.is_file():
      notes.append(f"{rel} missing")
      return []
    try:
      records, bad = read_jsonl(p)
    except OSError as e:
      notes.append(f"{rel} unreadable ({one_line(e)})")
      return []
    if bad:
      notes.append(f"{rel}: {bad} malformed line(s) skipped")
    return records

  metrics = jsonl("metrics.jsonl")
  history = jsonl("eval/history.jsonl")
  if summary is None and not metrics:
    raise DataError(
      f"{workdir}: neither eval/summary.json nor metrics.jsonl; not a training workdir?"
    )
  plan = _read_plan(workdir / "plan.json", notes)
  names: list[str] = list(summary["per_class"]) if summary else []
  for r in history:
    names += [n for n in (r.get("per_class") or {}) if n not in names]
  class_ids = _class_ids(names, plan)

  plots = workdir / PLOTS_DIR
  plots.mkdir(exist_ok=True)
  # Everything is regenerated: drop our old PNGs so no stale overlay outlives its prediction.
  for old in [plots / CURVES_PNG, plots / DICE_PNG, *plots.glob("overlay_*.png")]:
    old.unlink(missing_ok=True)
  curves = bool(metrics or history)
  if curves:
    plot_training_curves(metrics, history, plots / CURVES_PNG, class_ids)
  dice = summary is not None and bool(summary["per_class"])
  if dice:
    plot_dice_per_class(summary, plots / DICE_PNG, class_ids)
  overlays = _make_overlays(workdir, plots, plan, summary, class_ids, notes)
  out = workdir / REPORT_HTML
  _write_html(out, workdir, summary, class_ids, curves, dice, overlays, notes)
  return out


# ---------------------------------------------------------------------------- command line


def _define_flags():
  # Defined only when run as a program, so importing this module adds no global flags.
  from absl import flags

  flags.DEFINE_string("workdir", None, "Training workdir (holds metrics.jsonl, eval/, plan.json).")
  return flags.FLAGS


def main(argv: list[str]) -> int:
  from absl import flags

  FLAGS = flags.FLAGS
  try:
    if len(argv) > 1:
      raise DataError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdir:
      raise DataError("pass --workdir=WORKDIR")
    path = make_report(FLAGS.workdir)
    summary_path = Path(FLAGS.workdir) / "eval" / "summary.json"
    if summary_path.exists():
      from vnet_jax.evaluate import format_table

      print(format_table(read_summary(summary_path)))
    print(f"wrote {path}")
    return 0
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
