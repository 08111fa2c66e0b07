"""instructrl.report's plots from small report dicts: the bars carry the report's numbers in its order, and
no two texts of a figure overlap or leave it (model names like "GPT prompted (T=1)" overlapped as x labels)."""

import itertools
import subprocess
import sys

import matplotlib
import numpy as np
import pytest

from instructrl import report

NAMES = ["GPT", "GPT prompted", "GPT prompted (T=1)", "SFT", "SFT (T=0.7)", "PPO-ptx", "PPO",
         "PPO-ptx (4-RM ensemble, beta 0.05, T=0.7)"]


def fake_report(names=NAMES):
  res = {}
  for i, n in enumerate(names):
    m = 0.2 + 0.7 * i / max(len(names) - 1, 1)
    res[n] = {"temperature": 1.0, "win_rate_vs_sft": {"mean": m, "ci_low": m - 0.08, "ci_high": min(m + 0.1, 1.0)},
              "heldout_lm_loss": 2.0 + 0.1 * i, "cloze_accuracy": 0.3 + 0.05 * i}
  res[names[0]]["cloze_accuracy"] = None   # not measured: no bar, no crash
  return {"models": list(names), "results": res}


def drawn_texts(fig) -> list:
  """(text, window extent) of every non-empty text the figure draws: titles, axis labels, the tick labels
  inside each axis's view, annotations."""
  fig.canvas.draw()
  r = fig.canvas.get_renderer()
  texts = [fig._suptitle] if fig._suptitle else []
  for ax in fig.axes:
    texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
    for axis in (ax.xaxis, ax.yaxis):
      lo, hi = sorted(axis.get_view_interval())
      texts += [t.label1 for t in axis.get_major_ticks() if lo - 1e-9 <= t.get_loc() <= hi + 1e-9 and t.label1.get_visible()]
  return [(t.get_text(), t.get_window_extent(r)) for t in texts if t.get_visible() and t.get_text()]


def assert_readable(fig):
  texts = drawn_texts(fig)
  box = fig.bbox
  for s, b in texts:
    assert box.x0 <= b.x0 and b.x1 <= box.x1 and box.y0 <= b.y0 and b.y1 <= box.y1, f"{s!r} leaves the figure"
  clash = [(s, t) for (s, a), (t, b) in itertools.combinations(texts, 2) if a.overlaps(b)]
  assert not clash, f"overlapping texts: {clash}"


def y_labels(ax) -> list[str]:
  """The y tick labels top to bottom."""
  ticks = sorted(ax.yaxis.get_major_ticks(), key=lambda t: t.get_loc(), reverse=not ax.yaxis_inverted())
  return [t.label1.get_text() for t in ticks]


def bars_top_down(ax) -> list[float]:
  return [p.get_width() for p in sorted(ax.patches, key=lambda p: p.get_y(), reverse=not ax.yaxis_inverted())]


@pytest.mark.parametrize("n", [2, len(NAMES)])
def test_win_rates_figure_is_the_report_and_readable(n):
  rep = fake_report(NAMES[:n])
  fig = report.win_rates_figure(rep)
  (ax,) = fig.axes
  assert_readable(fig)
  names = rep["models"]
  assert y_labels(ax) == names                                # the report's order from the top
  assert all(t.label1.get_fontsize() >= matplotlib.rcParams["font.size"] for t in ax.yaxis.get_major_ticks())
  w = [rep["results"][m]["win_rate_vs_sft"] for m in names]
  np.testing.assert_allclose(bars_top_down(ax), [x["mean"] for x in w])
  # The error bars span each 95% interval, bar by bar.
  (segs,) = [c for c in ax.collections if len(c.get_segments()) == n]
  spans = sorted(((s[:, 1].mean(), s[0, 0], s[1, 0]) for s in map(np.asarray, segs.get_segments())),
                 reverse=not ax.yaxis_inverted())
  np.testing.assert_allclose([(lo, hi) for _, lo, hi in spans], [(x["ci_low"], x["ci_high"]) for x in w])
  # The SFT baseline: a dashed vertical line at 50%.
  (base,) = [l for l in ax.lines if l.get_linestyle() == "--"]
  assert list(base.get_xdata()) == [0.5, 0.5]
  assert [t.get_text() for t in ax.texts] == [f"{100 * x['mean']:.1f}%" for x in w]


def test_alignment_tax_figure_is_the_report_and_readable():
  rep = fake_report()
  fig = report.alignment_tax_figure(rep)
  loss, cloze = fig.axes
  assert_readable(fig)
  assert y_labels(loss) == NAMES
  assert not any(t.label1.get_visible() for t in cloze.yaxis.get_major_ticks())   # the names once, on the left
  np.testing.assert_allclose(bars_top_down(loss), [rep["results"][m]["heldout_lm_loss"] for m in NAMES])
  acc = bars_top_down(cloze)
  assert np.isnan(acc[0])
  np.testing.assert_allclose(acc[1:], [rep["results"][m]["cloze_accuracy"] for m in NAMES[1:]])


def test_plots_are_saved_as_pngs_of_their_figures(tmp_path):
  rep = {**fake_report(), "ppo_curves": {"PPO-ptx": {"step": [1, 2], "rm_score": [0.1, 0.3], "gold_score": [0.5, 0.6],
                                                     "kl": [0.0, 1.0]}}}
  for fn, make in ((report.plot_win_rates, report.win_rates_figure), (report.plot_alignment_tax,
                   report.alignment_tax_figure), (report.plot_ppo_curves, report.ppo_curves_figure)):
    path = tmp_path / f"{fn.__name__}.png"
    fn(rep, path)
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    size = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    w, h = make(rep).get_size_inches()
    assert abs(size[0] - w * 120) <= 1 and abs(size[1] - h * 120) <= 1, (size, w, h)   # saved at dpi 120


def test_importing_report_leaves_the_backend_alone():
  # A notebook's inline backend must survive `from instructrl import report`.
  code = "import matplotlib; matplotlib.use('svg'); from instructrl import report; print(matplotlib.get_backend())"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.strip() == "svg"


def test_rm_summary_and_report_carry_the_three_labeler_agreements(tmp_path):
  import json
  from instructrl.stages import evaluate
  (tmp_path / "metrics").mkdir()
  final = {"final/valid/accuracy": 0.7, "final/valid/heldout_group/accuracy": 0.68,
           "final/labeler_agreement/train_groups": 0.726, "final/labeler_agreement/heldout": 0.773,
           "final/labeler_agreement/heldout_vs_train": 0.75}
  (tmp_path / "metrics" / "rm.jsonl").write_text(json.dumps({"step": 12, **final}) + "\n")
  rm = evaluate.rm_summary(tmp_path)
  assert {k: rm[k] for k in ("labeler_agreement_train_groups", "labeler_agreement_heldout",
                             "labeler_agreement_heldout_vs_train")} == \
      {"labeler_agreement_train_groups": 0.726, "labeler_agreement_heldout": 0.773,
       "labeler_agreement_heldout_vs_train": 0.75}
  text = report.markdown({"models": [], "results": {}, "n_prompts": {"eval": 1, "truthful": 1, "toxicity": 1},
                          "judged_by": {"group": 4, "labelers": ["L04"]}, "rm": rm})
  assert ("labeler agreement, training groups: 72.6% (paper: 72.6%); held-out group: 77.3% (paper: 77.3%); "
          "held-out vs training: 75.0%") in text
