"""The one report renderer's pure parts: markdown and HTML from one list of blocks, number
formatting, the results table (which names its reference split and IS splits), the pruning
summary, and each experiment's verdict sentences reading the numbers the right way round."""

import math

import pytest

from fedscore.experiments.prose import (
    baselines_sentence,
    demo_verdict,
    fi_verdict,
    pruning_verdict,
    route_sentence,
)
from fedscore.experiments.report import fmt, metric_table, to_html, to_markdown
from fedscore.experiments.sections import pruning_summary

BLOCKS = [
    ("h1", "title"),
    ("p", "a `code` word and **bold** <tag>"),
    ("ul", ["one", "two"]),
    ("table", ["a", "b"], [["1", "2"], ["3", "4"]]),
    ("img", "a grid", "grid.png"),
]


def test_markdown_renders_every_block_kind():
    md = to_markdown(BLOCKS)
    assert md.startswith("# title\n")
    assert "- one\n- two" in md
    assert "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |" in md
    assert "![a grid](grid.png)" in md


def test_html_embeds_images_and_escapes_text(tmp_path):
    (tmp_path / "grid.png").write_bytes(b"\x89PNG fake")
    page = to_html(BLOCKS, tmp_path, "t")
    assert "<code>code</code>" in page and "<strong>bold</strong>" in page
    assert "&lt;tag&gt;" in page and "<tag>" not in page
    assert 'src="data:image/png;base64,' in page  # opens anywhere, no side files
    assert "<td>4</td>" in page
    (tmp_path / "grid.png").unlink()
    assert 'src="grid.png"' in to_html(BLOCKS, tmp_path, "t")  # missing: the link stays


def test_unknown_block_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown block kind"):
        to_markdown([("video", "x")])
    with pytest.raises(ValueError, match="unknown block kind"):
        to_html([("video", "x")], tmp_path, "t")


def test_fmt_never_crashes_on_non_finite_numbers():
    assert fmt(1.23456) == "1.235"
    assert fmt(math.nan) == "nan" and fmt(math.inf) == "inf" and fmt(-math.inf) == "-inf"
    assert fmt(None) == "–"


def _record(round_, sent, uncovered=0, w2=0.1):
    return {"round": round_, "keep_fraction": [1.0, 0.8, 0.75], "gamma_star": 1,
            "coverage_hist": [0, 5, 10, 85], "uncovered": uncovered, "w2": w2,
            "bytes_sent": sent, "bytes_received": 400}


def test_pruning_summary_reads_the_round_records():
    s = pruning_summary([_record(1, [400, 330, 310], uncovered=2, w2=0.2),
                         _record(2, [400, 320, 300], uncovered=1, w2=0.1)])
    assert s["rounds"] == 2 and s["gamma_star"] == 1
    assert s["uncovered_total"] == 3 and s["w2_max"] == 0.2
    assert s["bytes_up_per_round"] == pytest.approx((1040 + 1020) / 2)
    assert s["bytes_dense_per_round"] == 3 * 400
    assert s["upload_saving"] == pytest.approx(1 - 1030 / 1200)
    with pytest.raises(ValueError, match="no federated rounds"):
        pruning_summary([])


def _rows(fed_acc, mean_fid, mix_fid, fi_acc=(0.3, 0.6)):
    return [{"samples": "federated model", "cell": "federated", "fid": 50.0,
             "class_accuracy": fed_acc},
            {"samples": "federated inference, mean", "cell": "agents", "aggregator": "mean",
             "fid": mean_fid, "class_accuracy": fi_acc[0]},
            {"samples": "federated inference, mixture", "cell": "agents",
             "aggregator": "mixture", "fid": mix_fid, "class_accuracy": fi_acc[1],
             "mixture_max_weight": 0.9}]


def test_verdicts_say_what_the_numbers_say():
    good = " ".join(demo_verdict(_rows(0.8, 90.0, 60.0), floor=0.5))
    assert "80%" in good and "recognisable digits" in good
    assert "`mixture` beats `mean` on FID (60.0 vs 90.0)" in good
    assert "the best aggregator by class accuracy is `mixture` (0.60; the FI paper's `mean` " \
           "0.30)" in good
    assert "0.90 on one agent" in good
    bad = " ".join(demo_verdict(_rows(0.2, 60.0, 90.0, fi_acc=(0.1, 0.12)), floor=0.5))
    assert "below the floor" in bad and "does not beat" in bad
    assert "No aggregator" in bad and "No aggregator" not in good


def _fi(regime, aggregator, fid, unrecognisable, acc=0.8):
    return {"samples": f"{regime}, {aggregator}", "regime": regime, "aggregator": aggregator,
            "fid": fid, "unrecognisable": unrecognisable, "class_accuracy": acc}


def test_fi_verdict_says_beats_only_when_mixture_is_lower():
    rows = [_fi("control", "single agent", 1.0, 0.0, acc=0.3),
            _fi("heterogeneous", "mean", 50.0, 0.6), _fi("heterogeneous", "mixture", 40.0, 0.7)]
    fid, unr, baselines, caution = fi_verdict(rows)
    assert baselines.startswith("Against the centralised model on the pooled data")
    assert "`mixture` **beats** `mean` (40.00 vs 50.00)" in fid
    assert "**does not beat**" in unr and "0.700 vs 0.600" in unr
    assert "Caution" in caution and "30%" in caution  # the control agent draws no digits


def test_pruning_verdict_compares_the_measured_order_with_the_papers():
    losses = {"F": 0.1, "L": 0.2, "M": 0.3, "S": 0.4}
    rows = [{"policy": "R", "level": lv, "final_loss": v} for lv, v in losses.items()]
    rows += [{"policy": "T", "level": lv, "final_loss": 1 - v} for lv, v in losses.items()]
    random_, topk = pruning_verdict(rows)
    assert "R: measured order F < L < M < S" in random_ and "holds here" in random_
    assert "T: measured order S < M < L < F" in topk and "does not hold" in topk


def test_every_results_table_names_its_reference_split_and_is_splits():
    rows = [{"samples": "a", "reference": "test", "fid": 12.345, "is_mean": 2.0,
             "is_std": 0.1, "is_splits": 5, "class_accuracy": 0.5, "unrecognisable": 0.25,
             "final_loss": 0.01, "gamma_star": 3, "bytes_sent": 12345}]
    kind, header, body = metric_table(rows, ["fid", "is", "recognisable", "bytes_sent"])
    assert kind == "table"
    assert header == ["samples", "FID vs test split ↓", "IS ± std (5 splits) ↑",
                      "recognisable ↑", "bytes sent / round"]
    assert body == [["a", "12.35", "2.00 ± 0.10", "0.750", "12,345"]]
    one = [dict(rows[0], is_splits=1, reference="train")]
    header = metric_table(one, ["fid", "is"])[1]
    assert header[1:] == ["FID vs train split ↓", "IS ± std (1 split) ↑"]


def _row(samples, acc, fid, **tags):
    return {"samples": samples, "class_accuracy": acc, "fid": fid, **tags}


def test_the_baselines_sentence_names_every_row_against_the_centralised_model():
    central = _row("central", 0.9, 20.0)
    fed = _row("federated model", 0.7, 30.0)
    fi = [_row("FI, mean", 0.2, 80.0, aggregator="mean", evals_per_step=10.0),
          _row("FI, route", 0.5, 40.0, aggregator="route", evals_per_step=1.0),
          _row("FI, mixture", 0.4, 45.0, aggregator="mixture", evals_per_step=10.0)]
    assert baselines_sentence(central, fed, fi) == (
        "Against the centralised model on the pooled data (class accuracy 0.90, FID 20.0): "
        "the federated model class accuracy 0.70, FID 30.0; the best federated-inference "
        "row, FI, route, class accuracy 0.50, FID 40.0. Closest by class accuracy: "
        "federated model (0.20 below it).")
    above = baselines_sentence(_row("central", 0.1, 90.0), None, fi)
    assert above.endswith("Closest by class accuracy: FI, route (0.40 above it).")
    level = baselines_sentence(_row("central", 0.5, 90.0), None, fi)
    assert level.endswith("(level with it).")
    assert baselines_sentence(central, None, []).endswith("no other row to compare.")
    assert route_sentence(fi) == (
        "`route` samples the agents' mixture at 1 network evaluation(s) per sample per step "
        "against `mixture`'s 10: class accuracy 0.50, FID 40.0 vs class accuracy 0.40, FID "
        "45.0.")
    assert route_sentence(fi[:1]) is None  # no route row, no sentence


def test_the_fi_verdict_compares_the_heterogeneous_rows_with_the_control_agent():
    rows = [_fi("control", "single agent", 10.0, 0.1, acc=0.9),
            _fi("heterogeneous", "mean", 50.0, 0.6, acc=0.3),
            _fi("heterogeneous", "mixture", 40.0, 0.7, acc=0.4),
            dict(_fi("heterogeneous", None, 30.0, 0.2, acc=0.6), training="federated")]
    rows[-1]["samples"] = "heterogeneous, federated"
    del rows[-1]["aggregator"]
    lines = fi_verdict(rows)
    baselines = next(line for line in lines if line.startswith("Against the centralised"))
    assert "(class accuracy 0.90, FID 10.0)" in baselines
    assert "Closest by class accuracy: heterogeneous, federated (0.30 below it)." in baselines
    assert not any("Caution" in line for line in lines)  # the control agent draws digits
