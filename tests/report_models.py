"""A SEIR model that fails on purpose in parts of its parameter space (test-only code).

Workers import this module as ``report_models``: the report tests send it to every worker
with ``Client.upload_file``.
"""

from __future__ import annotations

import numpy as np

from simcal.models.seir import simulate


class PretendModelError(RuntimeError):
    """Raised on purpose: a model crash the report must show as a failure."""


def seir_with_faults(params: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """The SEIR demo; fails for gamma > 0.4 (an error) and returns NaN for beta > 0.9."""
    if params["gamma"] > 0.4:
        raise PretendModelError("gamma above 0.4 is outside this model's validity")
    output = simulate(params, seed)
    if params["beta"] > 0.9:
        output["incidence"] = np.full_like(output["incidence"], np.nan)
    return output


def always_fails(params: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    raise PretendModelError("this model always fails")
