"""Reading a :class:`simcal.metrics.Metrics` registry in tests: one sample's value."""

from __future__ import annotations

from simcal.metrics import Metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """A sample's current value for the metrics' study; 0 if absent."""
    value = metrics.registry.get_sample_value(name, {"study": metrics.study, **labels})
    return 0.0 if value is None else value
