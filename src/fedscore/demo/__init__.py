"""`fedscore demo`: federated training with pruning and federated inference on mnist5k,
evaluated side by side in one report (pipeline.py runs it, report.py writes it)."""

from fedscore.demo.pipeline import BUDGETS, Budget, DemoResult, run_demo

__all__ = ["BUDGETS", "Budget", "DemoResult", "run_demo"]
