"""fedscore: federated diffusion models."""

__version__ = "0.1.0"
