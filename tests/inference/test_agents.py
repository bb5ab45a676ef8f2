"""K agents as one vectorised callable: the same scores as K separate networks, the single
agent's samples when the agents are identical, and agents trained alone on their partition
with their class counts recorded."""

import json
import shutil

import pytest
import torch

from fedscore import data, diffusion, inference
from fedscore.config import load_config
from fedscore.errors import FedscoreError
from fedscore.experiments.agents import load_agents, train_agents
from fedscore.inference.agents import StackedAgents, label_weights
from fedscore.io import read_jsonl
from fedscore.models import build_model
from fedscore.runs.train import load_model


def nets(kind, k, seed=0):
    """k networks of one architecture with different weights (class-conditional, 3 labels)."""
    torch.manual_seed(seed)
    if kind == "mlp":
        return [build_model("mlp", dim=2, hidden=16, depth=2, num_classes=3) for _ in range(k)]
    return [build_model("unet", size="tiny", in_channels=1, image_size=8, num_classes=3,
                        base=8, groups=4) for _ in range(k)]


def inputs(kind, b=5):
    g = torch.Generator().manual_seed(1)
    shape = (b, 2) if kind == "mlp" else (b, 1, 8, 8)
    return (torch.randn(shape, generator=g), torch.rand(b, generator=g) + 0.05,
            torch.randint(3, (b,), generator=g))


@pytest.mark.parametrize("kind", ["mlp", "unet"])
@pytest.mark.parametrize("strategy", ["vmap", "sequential", "threads"])
@pytest.mark.parametrize("parameterisation", ["eps", "score"])
def test_stacked_agents_equal_separate_calls(kind, strategy, parameterisation):
    models = nets(kind, 3)
    x, t, y = inputs(kind)
    expected = torch.stack([diffusion.to_score(m(x, t, y), t, parameterisation) for m in models])
    agents = StackedAgents(models[0], models, parameterisation, labels=y, strategy=strategy)
    out = agents(x, t)
    assert out.shape == (3, *x.shape) and agents.n_agents == 3
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # labels passed at call time (the diagnostics' agent_scores(x, t, y)) override the bound
    y2 = (y + 1) % 3
    expected2 = torch.stack([diffusion.to_score(m(x, t, y2), t, parameterisation)
                             for m in models])
    torch.testing.assert_close(agents(x, t, y2), expected2, rtol=1e-5, atol=1e-5)


def test_stacked_parameters_can_be_given_already_stacked():
    models = nets("mlp", 2)
    x, t, y = inputs("mlp")
    stacked, _ = torch.func.stack_module_state(models)
    a = StackedAgents(models[0], models, labels=y)
    b = StackedAgents(models[0], stacked, labels=y)
    torch.testing.assert_close(a(x, t), b(x, t))


def test_with_labels_shares_the_parameters_and_binds_new_labels():
    models = nets("mlp", 2)
    x, t, y = inputs("mlp")
    agents = StackedAgents(models[0], models)
    bound = agents.with_labels(y)
    assert bound.params is agents.params and agents.labels is None
    torch.testing.assert_close(bound(x, t), agents(x, t, y))
    assert not torch.allclose(bound(x, t), agents(x, t))  # None = the "no label" embedding


def test_auto_strategy_is_vmap_for_a_small_mlp_and_sequential_for_a_conv_net_on_cpu():
    assert StackedAgents(nets("mlp", 1)[0], nets("mlp", 2)).strategy == "vmap"
    conv = "threads" if torch.get_num_threads() > 1 else "sequential"
    assert StackedAgents(nets("unet", 1)[0], nets("unet", 2)).strategy == conv
    # naming a strategy overrides the rule
    assert StackedAgents(nets("unet", 1)[0], nets("unet", 2), strategy="vmap").strategy == "vmap"


@pytest.mark.parametrize("name", sorted(inference.AGGREGATORS))
@pytest.mark.parametrize("strategy", ["vmap", "sequential"])
def test_identical_stacked_agents_give_the_single_agents_samples(name, strategy):
    (model,) = nets("mlp", 1, seed=3)
    y = torch.arange(3).repeat_interleave(20)
    times = diffusion.time_grid("exponential", 30, T=5.0, delta=1e-3)

    def run(score_fn):
        g = torch.Generator().manual_seed(7)
        return diffusion.sample(score_fn, torch.randn(len(y), 2, generator=g), times,
                                "exp-integrator", g)

    single = run(diffusion.score_fn_of(lambda x, t: model(x, t, y), "eps"))
    agents = StackedAgents(model, [model] * 4, labels=y, strategy=strategy)
    counts = torch.tensor([[5, 1, 0], [2, 2, 2], [0, 3, 9], [1, 1, 1]])
    combined = run(inference.combine(agents, name, weights=label_weights(counts, y)))
    assert torch.isfinite(single).all()
    torch.testing.assert_close(combined, single, rtol=0, atol=1e-4)


def test_label_weights_are_each_agents_count_of_the_samples_label():
    counts = torch.tensor([[4, 0, 0], [1, 0, 3]])
    w = label_weights(counts, torch.tensor([0, 2, 1]))
    # label 1 is held by nobody: the agents' total sizes (4, 4) stand in
    assert w.tolist() == [[4.0, 1.0], [0.0, 3.0], [4.0, 4.0]]


def test_bad_agent_inputs_are_clear_errors():
    models = nets("mlp", 2)
    with pytest.raises(FedscoreError, match="strategy"):
        StackedAgents(models[0], models, strategy="processes")
    with pytest.raises(FedscoreError, match="one architecture"):
        StackedAgents(models[0], [models[0], nets("unet", 1)[0]])
    with pytest.raises(FedscoreError, match="at least one agent"):
        StackedAgents(models[0], [])
    x, t, y = inputs("mlp")
    with pytest.raises(FedscoreError, match="with_labels"):
        StackedAgents(models[0], models, labels=y[:2])(x, t)


# ---------------------------------------------------------------- train_agents / load_agents


def agent_cfg(tmp_path, **model):
    return load_config(
        None, name="agents", out_dir=str(tmp_path), data={"name": "gmm:two-clients"},
        model={"kind": "mlp", "conditional": True, "options": {"hidden": 16, "depth": 1},
               **model},
        diffusion={"grid": "exponential", "steps": 10, "T": 5.0, "delta": 1e-3},
        train={"steps": 3, "batch_size": 16, "checkpoint_every": 3, "log_every": 3,
               "eval_batch": 8},
    )


def test_train_agents_writes_one_run_folder_per_partition_with_its_class_counts(tmp_path):
    cfg = agent_cfg(tmp_path)
    dirs = train_agents(cfg, "heterogeneous", tmp_path / "het", n_agents=3, progress=False)
    assert [d.name for d in dirs] == ["agent-00", "agent-01", "agent-02"]
    _, labels = data.load("gmm:two-clients", split="train")
    parts = data.partition(labels, "dominant", n_workers=3, seed=cfg.seed)
    expected = data.class_histogram(labels, parts, n_classes=int(labels.max()) + 1)
    for j, d in enumerate(dirs):
        assert (d / "model.safetensors").is_file()
        recorded = json.loads((d / "class_counts.json").read_text())
        assert recorded["class_counts"] == expected[j].tolist()
        assert recorded["n_samples"] == len(parts[j])
    summary = json.loads((tmp_path / "het" / "agents.json").read_text())
    assert summary["regime"] == "heterogeneous" and len(summary["agents"]) == 3

    agents = load_agents(dirs)
    assert agents.n_agents == 3 and agents.counts.tolist() == expected.tolist()
    x, t = torch.randn(4, 2), torch.full((4,), 0.5)
    y = torch.tensor([0, 1, 2, 3])
    separate = []
    for d in dirs:
        model, run = load_model(d)
        separate.append(diffusion.to_score(model(x, t, y), t, run.diffusion.parameterisation))
    torch.testing.assert_close(agents(x, t, y), torch.stack(separate), rtol=1e-5, atol=1e-6)
    # the agents differ: each trained alone from its own seed on its own data
    assert not torch.allclose(separate[0], separate[1])


def test_control_has_one_agent_and_finished_agents_are_reused(tmp_path):
    cfg = agent_cfg(tmp_path)
    (only,) = train_agents(cfg, "control", tmp_path / "ctl", n_agents=10, progress=False)
    counts = json.loads((only / "class_counts.json").read_text())["class_counts"]
    assert sum(counts) == len(data.load("gmm:two-clients", split="train")[1])
    stamp = (only / "model.safetensors").stat().st_mtime_ns
    train_agents(cfg, "control", tmp_path / "ctl", progress=False)
    assert (only / "model.safetensors").stat().st_mtime_ns == stamp


def test_an_agent_stopped_before_its_first_checkpoint_starts_over(tmp_path):
    """Killed after logging but before any checkpoint: no --resume is possible and none is
    needed; the next run trains it from the start instead of refusing the folder."""
    cfg = agent_cfg(tmp_path)
    (only,) = train_agents(cfg, "control", tmp_path / "ctl", progress=False)
    (only / "model.safetensors").unlink()
    (only / "checkpoint.safetensors").unlink()  # as if killed between log and checkpoint
    assert (only / "metrics.jsonl").is_file()
    train_agents(cfg, "control", tmp_path / "ctl", progress=False)
    assert (only / "model.safetensors").is_file()
    steps = [r["step"] for r in read_jsonl(only / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == cfg.train.steps  # one clean log


def test_a_moved_agents_folder_is_reused_and_another_config_refused(tmp_path):
    cfg = agent_cfg(tmp_path)
    (only,) = train_agents(cfg, "control", tmp_path / "ctl", progress=False)
    shutil.copytree(tmp_path / "ctl", tmp_path / "moved")
    stamp = (tmp_path / "moved" / only.name / "model.safetensors").stat().st_mtime_ns
    train_agents(cfg, "control", tmp_path / "moved", progress=False)  # kept, not retrained
    assert (tmp_path / "moved" / only.name / "model.safetensors").stat().st_mtime_ns == stamp
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 4})})
    with pytest.raises(FedscoreError, match="another config"):
        train_agents(longer, "control", tmp_path / "ctl", progress=False)


def test_agents_must_be_class_conditional_and_regimes_known(tmp_path):
    with pytest.raises(FedscoreError, match="conditional"):
        train_agents(agent_cfg(tmp_path, conditional=False), "control", tmp_path, progress=False)
    with pytest.raises(FedscoreError, match="heterogeneous"):
        train_agents(agent_cfg(tmp_path), "iid", tmp_path, progress=False)
    with pytest.raises(FedscoreError, match="class_counts.json"):
        load_agents([tmp_path / "nowhere"])


# ---------------------------------------------------------------- route through sample_agents


@pytest.fixture(scope="module")
def three_agents(tmp_path_factory):
    root = tmp_path_factory.mktemp("route-agents")
    return train_agents(agent_cfg(root), "heterogeneous", root / "het", n_agents=3,
                        progress=False)


def test_sample_agents_routes_each_sample_to_one_agent_drawn_from_the_seed(three_agents,
                                                                           tmp_path):
    """`fedscore agents sample --aggregator route`: sample b is agent a_b's own sample, where
    a ~ pi (each agent's count of b's label), drawn from route_generator(seed); the prior
    and the sampler's noise are draw's for that seed, as for every aggregator."""
    from fedscore.experiments.agents import SAMPLER, sample_agents
    from fedscore.inference.sampling import route_generator
    from fedscore.runs.evaluate import load_samples

    kw = {"aggregator": "route", "per_label": 6, "steps": 4, "progress": False}
    got, labels = load_samples(sample_agents(three_agents, tmp_path / "a", seed=5, **kw)
                               ["samples"], (2,))
    agents = load_agents(three_agents)
    pi = agents.weights_for(labels)
    assignment = torch.multinomial(pi / pi.sum(1, keepdim=True), 1,
                                   generator=route_generator(5))[:, 0]
    assert set(assignment.tolist()) == {0, 1, 2}  # every agent has rows in this draw
    times = diffusion.time_grid("exponential", 4, T=5.0, delta=1e-3)
    for i in range(3):  # agent i alone on the whole batch, from the same seed
        alone = inference.draw(lambda x, t, i=i: agents(x, t, labels)[i], len(labels), (2,),
                               times, SAMPLER, 5)
        rows = assignment == i
        torch.testing.assert_close(got[rows], alone[rows], rtol=1e-5, atol=1e-5)
    again, _ = load_samples(sample_agents(three_agents, tmp_path / "b", seed=5, **kw)
                            ["samples"], (2,))
    other, _ = load_samples(sample_agents(three_agents, tmp_path / "c", seed=6, **kw)
                            ["samples"], (2,))
    assert torch.equal(again, got) and not torch.allclose(other, got)


def test_every_sampling_call_routes_afresh(three_agents):
    """diffusion.sample's begin_sampling hook: one route score function used for two draws
    draws a new assignment for each (the generator's next draw), not the first one again."""
    from fedscore.inference.sampling import route_generator

    agents = load_agents(three_agents)
    labels = torch.arange(4).repeat_interleave(8)
    route = inference.agents_score_fn(agents, labels, "route", generator=route_generator(0))
    times = diffusion.time_grid("exponential", 2, T=5.0, delta=1e-3)
    pi = agents.weights_for(labels)
    g = route_generator(0)
    expected = [torch.multinomial(pi / pi.sum(1, keepdim=True), 1, generator=g)[:, 0]
                for _ in range(2)]
    for want in expected:
        inference.draw(route, len(labels), (2,), times, "exp-integrator", 1)
        assert torch.equal(route.assignment, want)
    assert not torch.equal(expected[0], expected[1])
    assert route.evaluations == 2 * 2 * len(labels)  # one agent per sample per step
