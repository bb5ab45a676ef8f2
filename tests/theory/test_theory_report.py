"""`fedscore bound`'s report: bound.md and bound_vs_Q.png from measured or given constants,
violated conditions named, a violated bound explained, and load_params' errors."""

from __future__ import annotations

import json
import re

import pytest

from fedscore.errors import FedscoreError
from fedscore.theory import bounds as B
from fedscore.theory import report as R
from fedscore.theory import theorem1

PNG = b"\x89PNG\r\n\x1a\n"

# Theorem 1's conditions hold: eta = 1e-3 <= 1/(27 S L) = 1/270, w < sqrt(2)/2, 1 <= G <= N
GOOD = dict(L=2.0, w=0.3, sigma1=0.1, sigma2=0.2, N=10, gamma_star=6, S=5, Q=300, eta=1e-3,
            F0=5.0, FQ=1.0, theta0_sq=40.0)  # fmt: skip


def test_report_writes_both_files_and_puts_the_observation_below_the_bound(tmp_path):
    total = theorem1(**GOOD).total
    path = R.bound_report({**GOOD, "observed_lhs": 0.5 * total}, tmp_path / "out")
    assert path == tmp_path / "out" / "bound.md"
    text = path.read_text()
    png = tmp_path / "out" / "bound_vs_Q.png"
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    assert "BELOW the bound" in text and "VIOLATED" not in text
    assert "conditions: all met" in text
    dominant = theorem1(**GOOD).dominant
    assert f"dominant term `{dominant}`" in text
    assert f"**{R.fmt(total)}**" in text  # the bound's total, as computed by theorem1
    for term in theorem1(**GOOD).terms:
        assert f"| {term} |" in text
    assert "## Corollary 1" in text


def test_report_names_a_violated_step_size_condition(tmp_path):
    eta = 1 / (27 * 5 * 2.0) * 1.01  # just above 1/(27 S L)
    text = R.bound_report({**GOOD, "eta": eta}, tmp_path).read_text()
    assert "conditions VIOLATED" in text
    assert B.COND_ETA_STEP.replace("|", "\\|") in text and "eta=" in text
    assert "[ ] `eta <= 1/(27 S L)`" in text


def test_violated_bound_says_which_estimate_is_likely_too_small(tmp_path):
    total = theorem1(**GOOD).total
    observed = 3 * total
    text = R.bound_report({**GOOD, "observed_lhs": observed}, tmp_path).read_text()
    assert "VIOLATED by the observation" in text
    assert "L is a LOWER estimate" in text and "sigma_1, sigma_2" in text
    assert "F(theta_0) - F(theta_Q)" in text


def test_suspects_give_the_l_and_sigma_that_close_the_gap():
    bound = theorem1(**GOOD)
    observed = 4 * bound.total
    lines = R.suspects(GOOD, bound, observed)
    assert not any("hypotheses fail" in s for s in lines)  # conditions hold at GOOD
    (l_line,) = [s for s in lines if s.startswith("L is a LOWER")]
    L_needed = float(re.search(r"at L >= ([0-9.e+-]+)", l_line).group(1))
    # the printed L (4 significant digits) brings the bound to the observation, and
    # 0.99 of it does not
    assert theorem1(**{**GOOD, "L": L_needed * 1.001}).total >= observed
    assert theorem1(**{**GOOD, "L": L_needed * 0.99}).total < observed
    (s_line,) = [s for s in lines if s.startswith("sigma_1")]
    k = float(re.search(r"if both are ([0-9.e+-]+) x", s_line).group(1))
    scaled = {**GOOD, "sigma1": k * 1.001 * 0.1, "sigma2": k * 1.001 * 0.2}
    assert theorem1(**scaled).total >= observed
    scaled = {**GOOD, "sigma1": k * 0.99 * 0.1, "sigma2": k * 0.99 * 0.2}
    assert theorem1(**scaled).total < observed


def test_suspects_lead_with_failed_hypotheses():
    bad = {**GOOD, "w": 0.1, "eta": 0.01}  # eta > 1/270
    bound = theorem1(**bad)
    lines = R.suspects(bad, bound, 10 * bound.total)
    assert "hypotheses fail" in lines[0] and "1/(27 S L)" in lines[0]


def test_missing_eta_uses_corollary_1_step_size(tmp_path):
    given = {k: v for k, v in GOOD.items() if k != "eta"}
    text = R.bound_report(given, tmp_path).read_text()
    eta = (6 / (5 * 300)) ** 0.5
    assert f"Corollary 1's eta = sqrt(Gamma*/(S Q))={R.fmt(eta)}" in text


def test_missing_constant_is_named_with_a_hint(tmp_path):
    given = {k: v for k, v in GOOD.items() if k != "L"}
    with pytest.raises(FedscoreError, match="missing constant.*L.*two theory observations"):
        R.bound_report(given, tmp_path)


def _write(path, text):
    path.write_text(text)
    return path


def test_load_params_reads_numbers_and_yaml_exponents(tmp_path):
    text = "\n".join(f"{k}: {v}" for k, v in GOOD.items() if k != "eta") + "\neta: 1e-3\n"
    got = R.load_params(_write(tmp_path / "p.yaml", text))
    assert got == {**GOOD, "eta": 1e-3}
    assert isinstance(got["Q"], int) and isinstance(got["N"], int)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"Lip": 1.0}, "unknown key 'Lip'; allowed keys: L, w"),
        ({"sigma1_sq": 0.04}, "give sigma1 \\(not its square\\), e.g. sigma1: 0.2"),
        ({"w2": 0.09}, "give w \\(not its square\\)"),
        ({"L": "abc"}, "L must be a number \\(got 'abc'\\)"),
        ({"L": True}, "L must be a number"),
        ({"sigma2": [1, 2]}, "sigma2 must be a number"),
        ({"F0": None}, "F0 must be a number"),
        ({"Q": 2.5}, "Q must be a whole number"),
        ({"eta": ".inf"}, "eta must be finite"),
    ],
)
def test_load_params_errors_name_the_field(tmp_path, change, match):
    raw = {**GOOD, **change}
    text = "\n".join(f"{k}: {json.dumps(v) if not isinstance(v, str) else v}"
                     for k, v in raw.items())  # fmt: skip
    with pytest.raises(FedscoreError, match=match):
        R.load_params(_write(tmp_path / "p.yaml", text))


def test_load_params_missing_keys_and_bad_files(tmp_path):
    with pytest.raises(FedscoreError, match="missing key\\(s\\) FQ, theta0_sq"):
        R.load_params(_write(tmp_path / "a.yaml", "L: 1\nw: 0.1\nsigma1: 0\nsigma2: 0\nN: 2\n"
                             "gamma_star: 1\nS: 1\nQ: 10\nF0: 1\n"))  # fmt: skip
    with pytest.raises(FedscoreError, match="does not exist"):
        R.load_params(tmp_path / "nope.yaml")
    with pytest.raises(FedscoreError, match="must be a mapping"):
        R.load_params(_write(tmp_path / "b.yaml", "- 1\n- 2\n"))
    with pytest.raises(FedscoreError, match="not valid YAML"):
        R.load_params(_write(tmp_path / "c.yaml", "L: [1\n"))


def test_run_bound_from_params_and_argument_errors(tmp_path):
    text = "\n".join(f"{k}: {v}" for k, v in GOOD.items())
    params = _write(tmp_path / "given.yaml", text)
    path = R.run_bound(None, params, tmp_path / "report")
    assert path == tmp_path / "report" / "bound.md" and "given.yaml" in path.read_text()
    assert (tmp_path / "report" / "bound_vs_Q.png").is_file()
    with pytest.raises(FedscoreError, match="either a run folder"):
        R.run_bound(None, None, None)
    with pytest.raises(FedscoreError, match="either a run folder"):
        R.run_bound(tmp_path, params, None)
    with pytest.raises(FedscoreError, match="no metrics.jsonl"):
        R.run_bound(tmp_path / "empty", None, None)


def test_run_bound_from_a_run_folder_uses_measured_constants(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    obs = [dict(q=q, N=4, F=3.0 - 0.5 * q, theta_sq=9.0, grad_sq=1.0 / (q + 1),
                sigma1_sq_max=0.04, sigma1_sq_mean=0.02, sigma2_sq_max=0.09, sigma2_sq_mean=0.05,
                S=2, eta=1e-3, **({"L_est": 1.5 + 0.1 * q} if q else {}))
           for q in (0, 2, 4)]  # fmt: skip
    records = [{"round": r, "min_coverage": 3 - (r == 3), "w2": 0.1 * r / 4,
                **({"theory": obs[r // 2]} if r % 2 == 0 else {})} for r in range(4)]
    records[0].pop("round")
    records.append({"round": 4, "min_coverage": 3, "w2": 0.1, "theory": obs[2]})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = R.run_bound(run, None, None)
    assert path == run / "bound.md"
    text = path.read_text()
    assert "| gamma_star | 2 |" in text  # min coverage over rounds
    assert "| L | 1.9 | LOWER estimate" in text  # max L_est (q = 4)
    assert "| sigma1 | 0.2 |" in text and "| sigma2 | 0.3 |" in text
    assert "observed_lhs" in text and (run / "bound_vs_Q.png").is_file()
