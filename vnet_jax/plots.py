"""Figures of a training run: training curves, Dice per class, slice overlays (PNG files).

Figures are built with matplotlib's object-oriented API (`Figure`, `fig.savefig`), never pyplot:
importing or calling this module leaves the user's matplotlib backend and open figures alone.

Display convention (radiological): the viewer faces the patient, so the patient's right is on
the image's left in axial and coronal views; axial slices are seen from the feet with anterior
up, coronal and sagittal slices have superior up, and sagittal slices have anterior on the left.
The arrays are (z, y, x) of the RAS-reoriented volume (x towards the patient's right, y anterior,
z superior), so every view is the array slice flipped in both directions. Pixels are drawn with
the plan's target spacing, so anisotropic voxels keep their physical aspect ratio.

Organ colours are fixed per class id (tab20 without its greys, dark shades first), so the same
organ has the same colour in every plot of every run.
"""

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import ndimage

from vnet_jax import files

WINDOW_PERCENTILES = (1.0, 99.0)
DPI = 100

# tab20 comes in (dark, light) pairs of one hue; taking the dark shades first keeps neighbouring
# ids (the usual 1..13 organs) in different hues. Its greys (14, 15) vanish on a grey CT.
_TAB20_ORDER = (0, 2, 4, 6, 8, 10, 12, 16, 18, 1, 3, 5, 7, 9, 11, 13, 17, 19)
_PALETTE = tuple(matplotlib.colormaps["tab20"].colors[i] for i in _TAB20_ORDER)


def class_color(class_id: int) -> tuple[float, float, float]:
  """Fixed RGB colour of a foreground class id (ids past the palette wrap around)."""
  return tuple(_PALETTE[(int(class_id) - 1) % len(_PALETTE)])


def _save(fig: Figure, path: Path) -> Path:
  # Written beside and renamed, so a browser showing the report never loads half a PNG.
  with files.replacing(path) as tmp:
    fig.savefig(tmp, format="png", dpi=DPI)
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
  fig = Figure(figsize=(13, 8), layout="constrained")
  axes = fig.subplots(2, 2, sharex=True)
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

  summary: as returned by `summaries.read_summary`. The mean marker is the summary's per-class
  Dice (the number the table reports); the dashed line is the summary's mean Dice over classes.
  """
  names = list(summary["per_class"])
  ids = class_ids or {n: i + 1 for i, n in enumerate(names)}
  values = []
  for name in names:
    v = [
      c["per_class"][name]["dice"] for c in summary.get("per_case", []) if name in c["per_class"]
    ]
    values.append(np.asarray([d for d in v if math.isfinite(d)], np.float64))
  fig = Figure(figsize=(max(6.0, 0.75 * len(names) + 2.0), 5), layout="constrained")
  ax = fig.subplots()
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


# ---------------------------------------------------------------------------- overlays


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
  fig = Figure(figsize=(fig_w, fig_h), layout="constrained")
  axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": widths})
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
