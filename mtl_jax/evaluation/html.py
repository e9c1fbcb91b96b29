"""A run's report as one self-contained HTML page: `<workdir>/reports/report.html`.

The page reads only the evaluation files a run leaves in `<workdir>/reports/`, and what the
caller passes in; it opens no checkpoint:

- `test.json` and `validation.json` (`report.write_report`): the summary and one row per task.
  The test split is the headline; where it is missing, validation.
- `calibration.json`, if present (`report.write_calibration`): a reliability diagram,

    {"split": "test", "num_examples": N, "num_bins": M, "ece": 0.041,
     "bins": [{"lower": 0.0, "upper": 0.0667, "confidence": 0.05, "accuracy": 0.02,
               "count": 12}, ...]}

  (`metrics.calibration_from_sums`: equal-width bins (i/M, (i+1)/M], a confidence of exactly 0
  in the first; a bin's `confidence` and `accuracy` are its means, null when empty).
- `dypa_events` (the checkpoint's `meta["dypa_events"]`, see dypa.py) and `config` (the run's
  config as a dict), passed by the caller: the train loop passes its own; the command line and
  `read_dypa_events` take them from `mtl_jax.workdir.latest_meta`. Without events the DyPa
  section says so.

Plots are PNGs drawn on matplotlib's Agg canvas (`matplotlib.figure.Figure`, never pyplot, so
that a notebook's backend is left alone) and embedded as base64 data URIs; the CSS and the small
script that sorts the per-task table are inline. The page needs no network and no other file.
The `plot_*` functions draw on a given matplotlib `Axes`, so notebooks reuse them. In a
multi-host run only process 0 writes reports, so only it should call `write_html_report`.

  python -m mtl_jax.evaluation.html --workdir=runs/demo   # writes runs/demo/reports/report.html
"""
import base64
import datetime
import io
import json
import math
from html import escape

import numpy as np
from etils import epath

from mtl_jax.evaluation.report import CALIBRATION_FILE, flatten

REPORT_FILE = "report.html"
# Where rows are many, the top/bottom table shows at most this many tasks at each end.
TOP_BOTTOM_ROWS = 10

_BLUE, _ORANGE, _GREY, _RED = "#2b6cb0", "#dd6b20", "#a0aec0", "#c53030"

# Short labels of the unseen-class scores (metrics.UNSEEN_SCORES), in that order.
UNSEEN_SCORE_NAMES = {"msp": "max softmax", "max_logit": "max logit", "energy": "energy",
                      "mahalanobis": "Mahalanobis"}


# --- Reading a workdir ---------------------------------------------------------------------------

def _read_json(path: epath.Path):
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); re-run the evaluation that writes it, or "
                     "delete it.") from e


def read_dypa_events(workdir) -> tuple[list[dict] | None, dict | None]:
  """(DyPa events, config dict) of the latest checkpoint of `workdir`; (None, None) without one.

  Reads them through `mtl_jax.workdir.latest_meta` (the one module that opens run directories);
  for the command line and notebooks. The train loop passes its own events instead.
  """
  from mtl_jax import workdir as workdir_lib  # Local: the page itself never opens checkpoints.

  meta = workdir_lib.latest_meta(workdir)
  if meta is None:
    return None, None
  config = meta.get("config")
  if isinstance(config, str):
    config = json.loads(config)
  return list(meta.get("dypa_events", [])), config


def read_run(workdir, dypa_events: list | None = None, config: dict | None = None) -> dict:
  """Everything the report shows: the workdir's report files, and the events and config given.

  Returns:
    {"workdir", "test", "validation", "calibration" (each a parsed JSON file or None),
     "dypa_events" (list, or None: unknown), "config" (dict or None)}.

  Raises:
    FileNotFoundError: neither reports/test.json nor reports/validation.json exists.
  """
  workdir = epath.Path(workdir)
  reports = workdir / "reports"
  run = {"workdir": str(workdir)}
  for name, file in (("test", "test.json"), ("validation", "validation.json"),
                     ("calibration", CALIBRATION_FILE)):
    path = reports / file
    run[name] = _read_json(path) if path.exists() else None
  if run["test"] is None and run["validation"] is None:
    raise FileNotFoundError(
        f"No {reports / 'test.json'} or {reports / 'validation.json'}: the report is built from "
        "the evaluation files a run writes when it finishes. Train to the end first "
        "(train.train_and_evaluate), or pass the workdir of a finished run.")
  run["dypa_events"] = None if dypa_events is None else list(dypa_events)
  run["config"] = config
  return run


# --- Plots (each draws on a given matplotlib Axes) --------------------------------------------

def _scored(rows: list[dict]) -> list[dict]:
  return [r for r in rows if r.get("accuracy") is not None]


def plot_accuracy_histogram(ax, rows: list[dict], title: str = "Per-task accuracy") -> None:
  """Histogram of per-task accuracy, with the mean accuracy and the mean chance level."""
  scored = _scored(rows)
  accuracy = np.array([r["accuracy"] for r in scored])
  chance = np.array([r["chance"] for r in scored])
  num_bins = int(np.clip(np.sqrt(len(scored)) * 2, 5, 40))
  ax.hist(accuracy, bins=num_bins, range=(0.0, 1.0), color=_BLUE, alpha=0.85,
          edgecolor="white")
  ax.yaxis.get_major_locator().set_params(integer=True)  # Task counts.
  if len(scored):
    ax.axvline(accuracy.mean(), color=_BLUE, linestyle="-", linewidth=2,
               label=f"mean accuracy {accuracy.mean():.3f}")
    ax.axvline(chance.mean(), color=_ORANGE, linestyle="--", linewidth=2,
               label=f"mean chance {chance.mean():.3f}")
    ax.legend(loc="upper right", fontsize=8, frameon=False)
  ax.set_xlim(0, 1)
  ax.set_xlabel("accuracy")
  ax.set_ylabel("tasks")
  ax.set_title(title, fontsize=11)


def plot_accuracy_vs_size(ax, rows: list[dict], adapter_tasks=(),
                          title: str = "Accuracy vs task size") -> None:
  """Per-task accuracy (dots) and chance level (grey ticks) against training examples, log x.

  Tasks in `adapter_tasks` (given a DyPa adapter) are ringed in red.
  """
  scored = _scored(rows)
  size = np.array([max(r["train_examples"], 1) for r in scored], np.float64)
  accuracy = np.array([r["accuracy"] for r in scored])
  chance = np.array([r["chance"] for r in scored])
  ax.scatter(size, chance, marker="_", s=80, color=_GREY, label="chance", zorder=2)
  dot = 22 if len(scored) <= 200 else 8  # Smaller dots where tasks are many.
  ax.scatter(size, accuracy, s=dot, color=_BLUE, alpha=0.8, label="accuracy", zorder=3)
  adapter_tasks = set(adapter_tasks)
  chosen = np.array([r["task"] in adapter_tasks for r in scored], bool)
  if chosen.any():
    ax.scatter(size[chosen], accuracy[chosen], s=90, facecolors="none", edgecolors=_RED,
               linewidths=1.5, label="DyPa adapter", zorder=4)
  ax.set_xscale("log")
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("training examples (log scale)")
  ax.set_ylabel("accuracy")
  ax.set_title(title, fontsize=11)
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(loc="best", fontsize=8, framealpha=0.8)


def plot_reliability(ax, calibration: dict, label: str | None = None, color: str = _BLUE,
                     show_gaps: bool = True) -> None:
  """Reliability diagram: each non-empty bin's accuracy against its mean confidence.

  Bars span the bin; the hatched red part is the gap between the bin's accuracy and its mean
  confidence (zero for a perfectly calibrated model, on the diagonal). Call it on
  one Axes per model, or with `show_gaps=False` and several labels to overlay lines.
  """
  bins = [b for b in calibration["bins"] if b["count"]]
  lower = np.array([b["lower"] for b in bins])
  width = np.array([b["upper"] - b["lower"] for b in bins])
  confidence = np.array([b["confidence"] for b in bins])
  accuracy = np.array([b["accuracy"] for b in bins])
  ece = calibration.get("ece")
  name = f"{label}: " if label else ""
  text = f"{name}ECE {ece:.3f}" if ece is not None else f"{name}ECE -"
  ax.plot([0, 1], [0, 1], color=_GREY, linestyle="--", linewidth=1)
  if show_gaps:
    ax.bar(lower, accuracy, width=width, align="edge", color=color, alpha=0.8,
           edgecolor="white", label=text)
    # Hatched, not filled: the gap is readable above a bar and inside it alike.
    ax.bar(lower, np.abs(confidence - accuracy), bottom=np.minimum(confidence, accuracy),
           width=width, align="edge", facecolor="none", edgecolor=_RED, hatch="///",
           linewidth=0.8, label="gap to confidence")
  else:
    ax.plot(confidence, accuracy, marker="o", markersize=4, color=color, label=text)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel("confidence (max softmax probability)")
  ax.set_ylabel("accuracy")
  ax.set_aspect("equal")
  ax.legend(loc="upper left", fontsize=8, frameon=False)


def dypa_task_accuracy(events: list[dict], rows: list[dict]) -> list[dict]:
  """For each task given an adapter: when, its score then, its validation accuracy then and its
  accuracy in `rows` now.

  The accuracy then is the event's `validation_accuracy`; events without that field give it only
  for the `lowest_accuracy` selector, whose score is minus the accuracy (else None).
  """
  now = {r["task"]: r["accuracy"] for r in rows}
  out = []
  for event in events:
    then = event.get("validation_accuracy")
    if then is None:
      then = [-s if event["select"] == "lowest_accuracy" else None for s in event["scores"]]
    for task, score, accuracy in zip(event["tasks"], event["scores"], then):
      out.append({"task": task, "step": event["step"], "select": event["select"],
                  "score": score + 0.0,  # + 0.0: no "-0.000" for a zero accuracy.
                  "accuracy_then": accuracy, "accuracy_now": now.get(task)})
  return out


def plot_dypa_tasks(ax, events: list[dict], rows: list[dict], title: str | None = None) -> None:
  """Tasks given an adapter: accuracy at allocation -> accuracy in `rows` (arrows), beside the
  accuracy of the tasks without one (grey strip)."""
  allocated = dypa_task_accuracy(events, rows)
  chosen = {a["task"] for a in allocated}
  others = [r["accuracy"] for r in _scored(rows) if r["task"] not in chosen]
  rng = np.random.default_rng(0)  # Fixed jitter: the page is the same on every render.
  ax.scatter(rng.uniform(-0.25, 0.25, len(others)), others, s=14, color=_GREY,
             label="tasks without adapter")
  for i, a in enumerate(allocated):
    x = 1.0 + (i - (len(allocated) - 1) / 2) * min(0.5 / max(len(allocated), 1), 0.12)
    if a["accuracy_then"] is not None and a["accuracy_now"] is not None:
      ax.annotate("", xy=(x, a["accuracy_now"]), xytext=(x, a["accuracy_then"]),
                  arrowprops={"arrowstyle": "->", "color": _RED, "linewidth": 1.2})
      ax.scatter([x], [a["accuracy_then"]], s=60, facecolors="none", edgecolors=_ORANGE,
                 linewidths=1.5, zorder=5, label="at allocation" if i == 0 else None)
    if a["accuracy_now"] is not None:
      ax.scatter([x], [a["accuracy_now"]], s=22, color=_RED, zorder=4,
                 label="at the end" if i == 0 else None)
  ax.set_xticks([0, 1], ["without adapter", "with DyPa adapter"])
  ax.set_xlim(-0.6, 1.6)
  ax.set_ylim(-0.02, 1.02)
  ax.set_ylabel("accuracy")
  ax.set_title(title or "DyPa: accuracy of the tasks given adapters", fontsize=11)
  ax.grid(True, axis="y", alpha=0.3)
  ax.legend(loc="best", fontsize=8, frameon=False)


def _png(draw, size=(5.4, 3.5)) -> str:
  """A base64 data URI of the PNG that `draw(ax)` makes on a fresh Agg figure."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Local: only reports draw.
  from matplotlib.figure import Figure

  figure = Figure(figsize=size, dpi=110)
  FigureCanvasAgg(figure)
  ax = figure.add_subplot()
  draw(ax)
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --- HTML ----------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif;
       margin: 0; background: #f7fafc; color: #1a202c; font-size: 14px; }
main { max-width: 1120px; margin: 0 auto; padding: 20px 24px 48px; }
h1 { font-size: 24px; margin: 8px 0 2px; }
h2 { font-size: 18px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #e2e8f0; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.sub { color: #4a5568; margin: 10px 0 12px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 12px; }
.card { background: white; border: 1px solid #e2e8f0; border-radius: 8px; padding: 10px 14px; }
.card .label { color: #718096; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 24px; font-weight: 600; margin: 2px 0; }
.card .note { color: #4a5568; font-size: 12px; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 12px; }
.plots img { width: 100%; background: white; border: 1px solid #e2e8f0; border-radius: 8px; }
.split { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; align-items: start; }
table { border-collapse: collapse; width: 100%; background: white; font-size: 13px; }
th, td { padding: 4px 8px; border-bottom: 1px solid #edf2f7; text-align: right; }
th { background: #edf2f7; position: sticky; top: 0; }
th:first-child, td:first-child, th.names, td.names { text-align: left; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th:after { content: " \\2195"; color: #a0aec0; }
.scroll { max-height: 640px; overflow: auto; border: 1px solid #e2e8f0; border-radius: 8px; }
.good { color: #2f855a; } .bad { color: #c53030; }
.empty { color: #718096; font-style: italic; }
details { margin-top: 8px; }
ul.config { columns: 3 280px; list-style: none; padding: 8px 12px; margin: 0; background: white;
            border: 1px solid #e2e8f0; border-radius: 8px; font-size: 12px; }
ul.config li { padding: 1px 0; break-inside: avoid; overflow-wrap: anywhere; }
"""

_SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var ascending = th.dataset.order !== "asc";
      table.querySelectorAll("th").forEach(function (h) { delete h.dataset.order; });
      th.dataset.order = ascending ? "asc" : "desc";
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[column].dataset.v, y = b.cells[column].dataset.v;
        if (x === "" || y === "") { return (x === "") - (y === ""); }  // Blanks last.
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
        return ascending ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _e(value) -> str:
  return escape(str(value))


def _num(value, digits: int = 3) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if isinstance(value, int):
    return f"{value:,}"
  return f"{value:.{digits}f}"


def _card(label: str, value: str, note: str = "") -> str:
  return (f'<div class="card"><div class="label">{_e(label)}</div>'
          f'<div class="value">{value}</div><div class="note">{note}</div></div>')


def _table(headers: list[str], rows: list[list], sortable: bool = False,
           text_columns: tuple[int, ...] = ()) -> str:
  """An HTML table; each cell is (shown HTML, sort value) or a plain value (escaped).

  Columns in `text_columns` hold prose: left-aligned and wrapped.
  """
  names = ' class="names"'
  head = "".join(f"<th{names if i in text_columns else ''}>{_e(h)}</th>"
                 for i, h in enumerate(headers))
  body = []
  for row in rows:
    cells = []
    for column, cell in enumerate(row):
      text, key = cell if isinstance(cell, tuple) else (_e(cell), cell)
      key = "" if key is None or (isinstance(key, float) and math.isnan(key)) else key
      cls = names if column in text_columns else ""
      cells.append(f'<td{cls} data-v="{_e(key)}">{text}</td>')
    body.append(f"<tr>{''.join(cells)}</tr>")
  cls = ' class="sortable"' if sortable else ""
  return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _lift(row: dict) -> tuple[str, float | None]:
  if row.get("accuracy") is None:
    return "-", None
  lift = row["accuracy"] - row["chance"]
  css = "good" if lift > 0 else "bad" if lift < 0 else ""
  return f'<span class="{css}">{lift:+.3f}</span>', lift


def _summary_section(run: dict, split: str, rows: list[dict], summary: dict, step: int,
                     adapter_tasks: set) -> str:
  scored = _scored(rows)
  cards = []
  if scored:
    weights = np.array([r["eval_examples"] for r in scored], np.float64)
    chance = np.array([r["chance"] for r in scored])
    weighted_chance = float((chance * weights).sum() / weights.sum())
    mean, mean_chance = summary["mean_accuracy"], summary["mean_chance"]
    ratio = f" &middot; {mean / mean_chance:.1f}&times; chance" if mean_chance else ""
    cards.append(_card(f"Mean accuracy ({split})", _num(mean),
                       f"chance {_num(mean_chance)}{ratio}"))
    cards.append(_card("Size-weighted accuracy", _num(summary["weighted_accuracy"]),
                       f"weighted chance {_num(weighted_chance)}"))
    cards.append(_card("Mean top-5 accuracy", _num(summary.get("mean_top5_accuracy")),
                       "tasks with more than 5 classes"))
    cards.append(_card("Median / worst task", f"{_num(summary['median_accuracy'])} / "
                       f"{_num(summary['min_accuracy'])}",
                       f"mean loss {_num(summary['mean_loss'])}"))
  num_classes = [r["num_classes"] for r in rows]
  train_total = sum(r["train_examples"] for r in rows)
  cards.append(_card("Tasks", f"{summary.get('tasks_evaluated', 0)} / {len(rows)}",
                     f"evaluated / total; {min(num_classes)}&ndash;{max(num_classes)} classes"))
  cards.append(_card("Training examples", f"{train_total:,}",
                     f"{min(r['train_examples'] for r in rows):,}&ndash;"
                     f"{max(r['train_examples'] for r in rows):,} per task"))
  total_steps = (run["config"] or {}).get("total_steps")
  cards.append(_card("Steps", f"{step:,}", f"of {total_steps:,} configured" if total_steps
                     else ""))
  validation = run["validation"]
  if validation is not None and split != "validation":
    vs = validation["summary"]
    cards.append(_card("Validation mean accuracy", _num(vs.get("mean_accuracy")),
                       f"size-weighted {_num(vs.get('weighted_accuracy'))}"))
  events = run["dypa_events"]
  if events is not None:
    cards.append(_card("DyPa adapters", str(len(adapter_tasks)),
                       f"{len(events)} allocation{'s' if len(events) != 1 else ''}"))
  if summary.get("mean_macro_auroc") is not None:
    cards.append(_card("Mean macro AUROC", _num(summary["mean_macro_auroc"]),
                       "one-vs-rest per trained class, mean over classes, then tasks"))
  ece, calibration = summary.get("ece"), run["calibration"]
  if ece is not None or summary.get("mean_ece") is not None:
    cards.append(_card("Calibration (ECE)", _num(ece),
                       f"{split}, all examples pooled; mean over tasks "
                       f"{_num(summary.get('mean_ece'))}"))
  elif calibration is not None:  # A report written before the summary held the ECE.
    cards.append(_card("Calibration (ECE)", _num(calibration.get("ece")),
                       f"{calibration.get('split', '')}, {calibration.get('num_bins', '')} bins"))
  if "mean_unseen_auroc" in summary:
    cards.append(_card("Unseen classes: AUROC / AUPR",
                       f"{_num(summary['mean_unseen_auroc'])} / "
                       f"{_num(summary.get('mean_unseen_aupr'))}",
                       "held-out classes vs seen by 1 - max softmax, mean over tasks; pooled "
                       f"{_num(summary.get('pooled_unseen_auroc'))} / "
                       f"{_num(summary.get('pooled_unseen_aupr'))}"))
    cards.append(_card("Unseen classes: AUROC by score", " / ".join(
        _num(summary.get(f"mean_unseen_auroc_{name}")) for name in UNSEEN_SCORE_NAMES),
        " / ".join(UNSEEN_SCORE_NAMES.values()) + ", mean over tasks; pooled " + " / ".join(
            _num(summary.get(f"pooled_unseen_auroc_{name}")) for name in UNSEEN_SCORE_NAMES)))
  if summary.get("skipped_records"):
    cards.append(_card("Skipped records", f"{summary['skipped_records']:,}",
                       f"bad {_e(split)} records dropped (data.on_bad_record=skip)"))
  if summary.get("skipped_train_records"):
    cards.append(_card("Skipped training records", f"{summary['skipped_train_records']:,}",
                       "bad train records dropped (data.on_bad_record=skip)"))
  return ('<section id="summary"><h2>Run summary</h2>'
          f'<div class="cards">{"".join(cards)}</div></section>')


def _task_cells(r: dict, validation: dict, adapter_step: dict) -> dict:
  """A task's table cells by column name."""
  v = validation.get(r["task"])
  trained = r.get("trained_classes", r["num_classes"])
  classes = (str(r["num_classes"]) if trained == r["num_classes"]
             else f'{trained} <span class="empty">of {r["num_classes"]}</span>')
  number = lambda key: (_num(r.get(key)), r.get(key))
  return {
      "task": r["task"], "classes": (classes, trained), "train": r["train_examples"],
      "eval": r["eval_examples"], "accuracy": number("accuracy"),
      "vs chance": _lift(r), "top-5": number("top5_accuracy"),
      "chance": number("chance"), "loss": number("loss"),
      "macro AUROC": number("macro_auroc"), "ECE": number("ece"),
      "unseen": r.get("unseen_examples", ""), "unseen AUROC": number("unseen_auroc"),
      "unseen AUPR": number("unseen_aupr"), "skipped": r.get("skipped_records", 0),
      **{f"unseen AUROC {label}": number(f"unseen_auroc_{name}")
         for name, label in UNSEEN_SCORE_NAMES.items() if name != "msp"},
      "skipped train": r.get("skipped_train_records", 0),
      "validation acc.": (_num(v), v),
      "DyPa adapter": (f"step {adapter_step[r['task']]}" if r["task"] in adapter_step else "",
                       adapter_step.get(r["task"])),
  }


def _tasks_sections(split: str, rows: list[dict], validation: dict, adapter_step: dict) -> str:
  """The top/bottom tables and the sortable table of every task.

  `validation`: task -> validation accuracy (a column where not empty); `adapter_step`: task ->
  step of its DyPa adapter (a column where not empty).
  """
  scored = sorted(_scored(rows), key=lambda r: (-r["accuracy"], r["task"]))
  k = min(TOP_BOTTOM_ROWS, max(1, len(scored) // 2))
  top, bottom = scored[:k], scored[::-1][:k]
  short_columns = ["task", "classes", "train", "eval", "accuracy", "vs chance"]
  columns = short_columns + ["top-5", "chance", "loss"]
  columns += [c for c, key in (("macro AUROC", "macro_auroc"), ("ECE", "ece"))
              if any(key in r for r in rows)]
  if any("unseen_examples" in r for r in rows):
    columns += ["unseen", "unseen AUROC", "unseen AUPR"]
    columns += [f"unseen AUROC {label}" for name, label in UNSEEN_SCORE_NAMES.items()
                if name != "msp" and any(r.get(f"unseen_auroc_{name}") is not None
                                         for r in rows)]
  columns += ["skipped"] if any(r.get("skipped_records") for r in rows) else []
  columns += ["skipped train"] if any(r.get("skipped_train_records") for r in rows) else []
  columns += ["validation acc."] if validation else []
  columns += ["DyPa adapter"] if adapter_step else []

  def table(rs, names, **kwargs):
    cells = [_task_cells(r, validation, adapter_step) for r in rs]
    return _table(names, [[c[n] for n in names] for c in cells], **kwargs)

  top_bottom = (f'<section id="top-bottom"><h2>Best and worst tasks ({_e(split)})</h2>'
                f'<div class="split"><div><h3>Top {k} by accuracy</h3>'
                f"{table(top, short_columns)}</div>"
                f'<div><h3>Bottom {k} by accuracy</h3>{table(bottom, short_columns)}</div>'
                "</div></section>")
  ordered = sorted(rows, key=lambda r: -r["train_examples"])
  per_task = (f'<section id="tasks"><h2>Every task ({_e(split)}, {len(rows)} tasks)</h2>'
              '<p class="sub">Largest first; click a column to sort. "vs chance" is accuracy '
              "minus 1 / trained classes. Classes: those trained on (\"of\" the task's "
              "classes where some are held out of training as unseen).</p>"
              f'<div class="scroll">{table(ordered, columns, sortable=True)}</div></section>')
  return top_bottom + per_task


def _dypa_section(events: list[dict] | None, rows: list[dict], rows_split: str) -> str:
  head = '<section id="dypa"><h2>DyPa allocations</h2>'
  if events is None:
    return head + ('<p class="empty">DyPa events unknown: none were given with the report (no '
                   "checkpoint in this workdir, or the caller passed none).</p></section>")
  if not events:
    return head + ('<p class="empty">No allocation in this run (config.dypa.at_steps and '
                   "config.dypa.every_evals schedule them).</p></section>")
  event_rows = []
  for e in events:
    tasks = ", ".join(_e(t) for t in e["tasks"]) or '<span class="empty">none</span>'
    event_rows.append([
        e["step"], e["select"], len(e["tasks"]), (tasks, len(e["tasks"])),
        (f"{e['adapters_before']} &rarr; {e['adapters_after']}", e["adapters_after"]),
        (f"{e['parameters_before']:,} &rarr; {e['parameters_after']:,}", e["parameters_after"]),
        (f"{100 * e['task_specific_share_after']:.2f}%", e["task_specific_share_after"]),
    ])
  events_table = _table(["step", "selector", "new", "tasks", "adapters", "parameters",
                         "task-specific share"], event_rows, text_columns=(3,))
  task_rows = []
  for a in dypa_task_accuracy(events, rows):
    change = (a["accuracy_now"] - a["accuracy_then"]
              if None not in (a["accuracy_now"], a["accuracy_then"]) else None)
    task_rows.append([a["task"], a["step"], (f"{a['score']:+.3f}", a["score"]),
                      (_num(a["accuracy_then"]), a["accuracy_then"]),
                      (_num(a["accuracy_now"]), a["accuracy_now"]),
                      (f"{change:+.3f}" if change is not None else "-", change)])
  tasks_table = _table(["task", "step", "score", "validation then", f"{rows_split} now",
                        "change"], task_rows)
  plot = _png(lambda ax: plot_dypa_tasks(ax, events, rows))
  return (head + events_table +
          '<p class="sub">A task\'s score is its need for capacity when it was chosen (higher: '
          "needier; <code>lowest_accuracy</code> scores minus the validation accuracy then). "
          f"&ldquo;Now&rdquo; is its {_e(rows_split)} accuracy at the end of the run.</p>"
          f'<div class="split"><div class="scroll">{tasks_table}</div>'
          f'<div><img alt="DyPa tasks" style="width:100%" src="{plot}"></div></div></section>')


def _calibration_section(calibration: dict | None) -> str:
  if calibration is None:
    return ""
  plot = _png(lambda ax: plot_reliability(ax, calibration), size=(4.4, 4.0))
  rows = [[(f"{b['lower']:.2f}&ndash;{b['upper']:.2f}", b["lower"]), b["count"],
           (_num(b["confidence"]), b["confidence"]), (_num(b["accuracy"]), b["accuracy"])]
          for b in calibration["bins"] if b["count"]]
  table = _table(["confidence bin", "examples", "mean confidence", "accuracy"], rows)
  return ('<section id="calibration"><h2>Calibration</h2>'
          f'<p class="sub">{_e(calibration.get("split", ""))} split, '
          f'{calibration.get("num_examples", 0):,} examples, expected calibration error '
          f'{_num(calibration.get("ece"))}.</p>'
          f'<div class="split"><div><img alt="Reliability diagram" '
          f'style="width:100%; max-width:440px" src="{plot}"></div><div>{table}</div></div>'
          "</section>")


def _config_section(config: dict | None) -> str:
  """The config's main fields, and every field behind a fold."""
  if not config:
    return ""
  flat = flatten(config)
  main = ("total_steps", "batch_size", "seed", "model.hidden_size", "model.num_layers",
          "model.max_classes", "model.adapter_size", "model.text_init", "sampling.kind",
          "sampling.alpha_start", "sampling.alpha_end", "augment.kind", "augment.inputs",
          "dypa.at_steps", "dypa.every_evals", "dypa.select", "dypa.fraction",
          "eval.holdout_classes", "data.catalogue_dir", "optimizer.learning_rate",
          "optimizer.task_update")
  item = lambda k: f"<li><code>{_e(k)}</code> = <code>{_e(json.dumps(flat[k]))}</code></li>"
  brief = "".join(item(k) for k in main if k in flat)
  everything = "".join(item(k) for k in sorted(flat))
  return ('<section id="config"><h2>Configuration</h2>'
          f'<ul class="config">{brief}</ul><details><summary>Every field</summary>'
          f'<ul class="config">{everything}</ul></details></section>')


def render_html(run: dict) -> str:
  """The report page for `run` (from `read_run`)."""
  split = "test" if run["test"] is not None else "validation"
  report = run[split]
  rows, summary, step = report["tasks"], report["summary"], int(report["step"])
  if not rows:
    raise ValueError(f"{run['workdir']}/reports/{split}.json has no task rows; re-run the "
                     "evaluation.")
  validation = ({r["task"]: r["accuracy"] for r in run["validation"]["tasks"]}
                if run["validation"] is not None and split != "validation" else {})
  events = run["dypa_events"]
  adapter_step = {t: e["step"] for e in (events or []) for t in e["tasks"]}
  histogram = _png(lambda ax: plot_accuracy_histogram(ax, rows, f"Per-task accuracy ({split})"))
  scatter = _png(lambda ax: plot_accuracy_vs_size(ax, rows, adapter_step,
                                                  f"Accuracy vs task size ({split})"))
  generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  parts = [
      "<!DOCTYPE html>",
      '<html lang="en"><head><meta charset="utf-8">',
      '<meta name="viewport" content="width=device-width, initial-scale=1">',
      f"<title>mtl_jax report: {_e(run['workdir'])}</title>",
      f"<style>{_CSS}</style></head><body><main>",
      "<h1>mtl_jax run report</h1>",
      f'<p class="sub"><code>{_e(run["workdir"])}</code> &middot; step {step:,} &middot; '
      f"{_e(split)} split &middot; generated {generated}</p>",
      _summary_section(run, split, rows, summary, step, set(adapter_step)),
      '<section id="distribution"><h2>Per-task accuracy</h2><div class="plots">',
      f'<img alt="Per-task accuracy histogram" src="{histogram}">',
      f'<img alt="Accuracy vs task size" src="{scatter}">',
      "</div></section>",
      _tasks_sections(split, rows, validation, adapter_step),
      # DyPa chose on validation accuracy: compare with the same split where there is one.
      _dypa_section(events, (run["validation"] or report)["tasks"],
                    "validation" if run["validation"] is not None else split),
      _calibration_section(run["calibration"]),
      _config_section(run["config"]),
      f"</main><script>{_SORT_SCRIPT}</script></body></html>",
  ]
  return "\n".join(parts)


def write_html_report(workdir, dypa_events: list | None = None,
                      config: dict | None = None) -> epath.Path:
  """Builds `<workdir>/reports/report.html` from the run's report files and returns its path.

  Args:
    workdir: the run's directory (its `reports/*.json` are read).
    dypa_events: the run's DyPa events (the checkpoint's `meta["dypa_events"]`); None: unknown.
    config: the run's config as a (nested) dict, shown at the end of the page; None: no section.

  Raises:
    FileNotFoundError: the workdir has no evaluation report (see `read_run`).
  """
  run = read_run(workdir, dypa_events, config)
  path = epath.Path(workdir) / "reports" / REPORT_FILE
  path.write_text(render_html(run))
  return path


def main(argv=None):
  from absl import flags
  from mtl_jax import cli
  args = cli.flag_values()
  flags.DEFINE_string("workdir", None, "A finished run's workdir.", flag_values=args,
                      required=True)
  cli.parse(args, argv, "python -m mtl_jax.evaluation.html")
  events, config = read_dypa_events(args.workdir)
  print(write_html_report(args.workdir, events, config))


if __name__ == "__main__":
  from mtl_jax import cli
  cli.run(main)
