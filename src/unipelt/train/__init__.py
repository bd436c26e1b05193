"""Training and evaluation: ``run`` fine-tunes a method on a task; ``evaluate`` scores a saved run."""

from .loop import RunConfig, TrainingDiverged, evaluate, run

__all__ = ["RunConfig", "TrainingDiverged", "evaluate", "run"]
