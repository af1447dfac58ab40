r"""`report.html` for a training run's workdir, with the plots it shows.

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
summary is a DataError; a file that cannot be written (full disk) is a one-line WriteError. The
figures are `plots`'s (display convention and colours there).
"""

import html
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import quote

import numpy as np
from absl import flags

from vnet_jax import cli, plots, summaries
from vnet_jax.errors import DataError, one_line
from vnet_jax.files import reporting_write_errors, write_text_atomic

PLOTS_DIR = "plots"
CURVES_PNG = "training_curves.png"
DICE_PNG = "dice_per_class.png"
REPORT_HTML = "report.html"


# ---------------------------------------------------------------------------- inputs


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
  plots_dir: Path,
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
  from vnet_jax.data.cache import open_cache

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
      plots.plot_overlay(image, label, pred, plots_dir / png, names, spacing, title)
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
  r, g, b = (round(255 * v) for v in plots.class_color(class_id))
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
    summary = summaries.read_summary(summary_path)
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

  plots_dir = workdir / PLOTS_DIR
  curves = bool(metrics or history)
  dice = summary is not None and bool(summary["per_class"])
  with reporting_write_errors(plots_dir):
    plots_dir.mkdir(exist_ok=True)
  if curves:  # plots.py writes through files.replacing: a failure names its PNG
    plots.plot_training_curves(metrics, history, plots_dir / CURVES_PNG, class_ids)
  if dice:
    plots.plot_dice_per_class(summary, plots_dir / DICE_PNG, class_ids)
  overlays = _make_overlays(workdir, plots_dir, plan, summary, class_ids, notes)
  out = workdir / REPORT_HTML
  _write_html(out, workdir, summary, class_ids, curves, dice, overlays, notes)
  # Everything is regenerated; our PNGs not made this time (an overlay whose prediction is gone)
  # go, once the new report is written: a failed write leaves the previous report whole.
  made = [png for _, png in overlays] + [CURVES_PNG] * curves + [DICE_PNG] * dice
  for old in [plots_dir / CURVES_PNG, plots_dir / DICE_PNG, *plots_dir.glob("overlay_*.png")]:
    if old.name not in made:
      old.unlink(missing_ok=True)
  return out


# ---------------------------------------------------------------------------- command line


def main(argv: list[str]) -> None:
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise DataError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.workdir:
    raise DataError("pass --workdir=WORKDIR")
  path = make_report(FLAGS.workdir)
  summary_path = Path(FLAGS.workdir) / "eval" / "summary.json"
  if summary_path.exists():
    print(summaries.format_table(summaries.read_summary(summary_path)))
  print(f"wrote {path}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Training workdir (holds metrics.jsonl, eval/, plan.json).")
  cli.run(main, huge_pages=False)
