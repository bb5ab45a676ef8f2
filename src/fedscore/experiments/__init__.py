"""One experiment harness: a preset (YAML) lists cells; one runner trains, samples,
evaluates and reports them (fedscore.experiments.runner). `fedscore reproduce pruning`,
`fedscore reproduce federated-inference` and `fedscore demo` are the presets `pruning`,
`federated-inference` and `demo`."""

from fedscore.experiments.preset import Preset, load_preset, preset_names
from fedscore.experiments.runner import ExperimentResult, run_experiment

__all__ = ["ExperimentResult", "Preset", "load_preset", "preset_names", "run_experiment"]
