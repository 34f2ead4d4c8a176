"""simcal: calibrate stochastic simulation models on a Dask cluster.

The Python API (:mod:`simcal.api`): ``simcal.Calibration``, ``simcal.Parameter``,
``simcal.Target`` and ``simcal.Result``, imported on first use so that ``import simcal``
(and the ``simcal`` command) stay quick.
"""

from typing import Any

_API = ("Calibration", "Parameter", "Result", "Target")

__all__ = ["__version__", *_API]


def _version() -> str:
    """The installed distribution's version, read on first use: importlib.metadata took 0.03 s
    of the console script's start, before the worker server it starts first (simcal.launch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("simcal")
    except PackageNotFoundError:  # running from a source tree without installation
        return "0.0.0"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        globals()["__version__"] = value = _version()
        return value
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
    return sorted({*globals(), "__version__", *_API})
