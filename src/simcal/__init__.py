"""simcal: calibrate stochastic simulation models on a Dask cluster.

The Python API (:mod:`simcal.api`): ``simcal.Calibration``, ``simcal.Parameter``,
``simcal.Target`` and ``simcal.Result``, imported on first use so that ``import simcal``
(and the ``simcal`` command) stay quick.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("simcal")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

_API = ("Calibration", "Parameter", "Result", "Target")

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        import warnings

        with warnings.catch_warnings():
            # Optuna imports tqdm.auto, which warns in a notebook without ipywidgets; simcal
            # draws its own progress there (simcal.notebook)
            warnings.filterwarnings("ignore", message="IProgress not found")
            from simcal import api

        return getattr(api, name)
    raise AttributeError(f"module 'simcal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
