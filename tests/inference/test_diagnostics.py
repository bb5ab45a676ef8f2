"""The FI paper's score diagnostics (eqs. 9-13) on hand-computed and exact-score inputs."""

import math

import torch

from fedscore import toy
from fedscore.inference import diagnostics


def test_magnitude_and_cosine_of_two_orthogonal_agents():
    v = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # K=2 agents, S=1 sample, D=2
    m, c = diagnostics.batch_diagnostics(v, v.mean(0))
    assert math.isclose(m, math.sqrt(0.5), rel_tol=1e-9)
    assert math.isclose(c, math.sqrt(0.5), rel_tol=1e-9)


def test_agreeing_agents_have_cosine_one_and_opposing_agents_cancel():
    v = torch.randn(1, 5, 3).expand(4, 5, 3)
    assert math.isclose(diagnostics.batch_diagnostics(v, v.mean(0))[1], 1.0, rel_tol=1e-6)
    w = torch.stack([v[0], -v[0]])
    assert diagnostics.batch_diagnostics(w, w.mean(0))[0] == 0.0


def test_records_and_table_cover_every_label_time_and_input():
    gm = toy.preset("two-clients")
    agents = [gm.components([0, 1]), gm.components([2, 3])]

    def agent_scores(x, t, y):
        return torch.stack([a.score(x, t) for a in agents])

    g = torch.Generator().manual_seed(0)
    inputs = {label: {"noise": torch.randn(10, 2, generator=g),
                      "real": gm.sample(10, generator=g)} for label in (0, 1)}
    records = diagnostics.score_diagnostics(agent_scores, inputs, T=5.0)
    assert len(records) == 2 * 4 * 2
    assert all(0 <= r["magnitude"] and -1 <= r["cosine"] <= 1 for r in records)
    # near the data the two clients' scores point to opposite sides: low agreement
    late = [r["cosine"] for r in records if r["t"] == 0.01 and r["input"] == "real"]
    early = [r["cosine"] for r in records if r["t"] == 1.0 and r["input"] == "noise"]
    assert max(late) < min(early)
    table = diagnostics.markdown_table(records)
    assert table.count("\n") == 1 + 4 and "t=0.01 cos" in table
