"""plots.py: slice choice, colours, the radiological overlay view and the figure files."""

import math

import matplotlib.image as mpimg
import numpy as np

from vnet_jax import plots


def assert_png(path):
  assert path.is_file(), path
  img = mpimg.imread(path)
  assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.shape[2] in (3, 4)
  assert img[..., :3].std() > 0.01  # not a blank canvas


def test_select_slices_through_organs():
  lab = np.zeros((20, 30, 40), np.uint8)
  lab[2:18, 5:25, 5:30] = 1  # a large organ
  lab[12:15, 20:23, 32:36] = 2  # a small one beside it, in a few slices only
  k, j, i = plots.select_slices(lab)
  # Every view cuts both organs: the small one is not outvoted by the large one's area.
  assert (lab[k] == 1).any() and (lab[k] == 2).any()
  assert (lab[:, j] == 1).any() and (lab[:, j] == 2).any()
  assert lab[:, :, i].any()  # no sagittal slice holds both: ties go towards the centroid
  # Empty reference: the prediction's organs, then the middle.
  empty = np.zeros_like(lab)
  k, j, i = plots.select_slices(empty, lab)
  assert lab[k].any() and lab[:, j].any() and lab[:, :, i].any()
  assert plots.select_slices(empty) == (10, 15, 20)


def test_class_colors_fixed_and_distinct():
  colors = [plots.class_color(c) for c in range(1, 14)]
  assert len(set(colors)) == 13
  assert plots.class_color(1) == plots.class_color(1 + len(plots._PALETTE))


def test_overlay_orientation(tmp_path):
  # A bright block at high x (patient's right) and high y (anterior) must appear on the image's
  # left and top in the axial view (radiological convention).
  img = np.zeros((4, 10, 10), np.float32)
  img[:, 7:, 7:] = 1.0
  view = plots._view(img, 0, 2)
  assert view[:3, :3].all() and not view[3:, 3:].any()
  lab = (img > 0).astype(np.uint8)
  assert_png(plots.plot_overlay(img, lab, lab, tmp_path / "o.png", {1: "block"}, (3.0, 1.0, 1.0)))


def test_curves_and_dice_files(tmp_path):
  metrics = [{"step": s, "loss": 1.0 / s, "learning_rate": 1e-3} for s in (1, 2, 3)]
  history = [{"step": 3, "mean_dice": 0.5, "per_class": {"liver": 0.6, "spleen": 0.4}}]
  assert_png(plots.plot_training_curves(metrics, history, tmp_path / "c.png"))
  summary = {
    "step": 3,
    "mean_dice": 0.5,
    "per_class": {"liver": {"dice": 0.6}, "spleen": {"dice": 0.4}},
    "per_case": [
      {"case": "a", "per_class": {"liver": {"dice": 0.7}, "spleen": {"dice": math.nan}}},
      {"case": "b", "per_class": {"liver": {"dice": 0.5}, "spleen": {"dice": 0.4}}},
    ],
  }
  assert_png(plots.plot_dice_per_class(summary, tmp_path / "sub" / "d.png"))
  assert sorted(p.name for p in tmp_path.rglob("*")) == ["c.png", "d.png", "sub"]  # no tmp left
