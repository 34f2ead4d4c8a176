"""The probe before the first trial: every worker imports the model, one call fits the targets.

``simcal run`` calls :func:`probe_cluster` once, after connecting and before asking the
optimizer for anything, so a broken setup fails fast and no trial counts against the budget:

1. every connected worker imports the model and each user loss (``Client.run``: one probe
   task per worker); a worker that cannot, or that has another version of a local
   single-file module than the driver (an edited ``mysir.py``: compared by SHA-256), gets the
   driver's copy shipped (:mod:`simcal.shipping`), reloads it, and is probed again;
2. one replicate of the model runs on the cluster for the *probe parameters*: the midpoint
   of every parameter's range (the geometric midpoint on a log scale), with the config's
   seed; its outputs must have every target's output key with the observed data's shape,
   and each target's loss must accept them.

A worker that cannot import, an output that is not arrays, or a key/shape mismatch raises
:class:`ProbeError` naming the module, the worker and the real exception, or the mismatch
(``simcal run`` exits 1): every trial would fail the same way. An exception of the model's
own at the probe parameters is retried with other seeds (:data:`PROBE_SEEDS` calls in all):
the same exception every time raises :class:`ModelFailsError` (``simcal run`` exits 2; a
``KeyError`` also lists the config's parameters: a misnamed parameter fails every trial);
a failure that varies with the seed (or a hang, or a lost worker) is only logged: a
stochastic model may fail at one point, and trials tell their own failures.
``simcal check-config --probe`` runs step 2 in-process with :func:`probe_locally` (exit 2 on
failure: the config does not work).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simcal.config import BUILTIN_LOSSES, CalibrationConfig
from simcal.failures import (
    FailureReason,
    ModelImportError,
    ModelOutputError,
    classify,
    describe,
)
from simcal.service import SimulationService
from simcal.shipping import local_code, ship, top_module
from simcal.targets import Objective, make_objective, misfits
from simcal.tasks import ReplicateOutput, resolve_on_worker, run_replicate

log = logging.getLogger(__name__)


class ProbeError(RuntimeError):
    """The cluster cannot run the model, or the model's output does not fit the targets."""


class ModelFailsError(ProbeError):
    """The model raised the same exception for every seed at the probe parameters: the
    config (a parameter's name, a model option) or the model is wrong, not one trial."""


PROBE_SEEDS = 3  # calls at the probe parameters before a model's own exception stops the run


def probe_parameters(config: CalibrationConfig) -> dict[str, float]:
    """The midpoint of every parameter's range (geometric on a log scale)."""
    return {
        name: math.sqrt(spec.low * spec.high) if spec.log else (spec.low + spec.high) / 2
        for name, spec in config.parameters.items()
    }


def references(config: CalibrationConfig) -> list[str]:
    """The ``module:callable`` references workers import: the model and each user loss."""
    losses = [t.loss for t in config.targets if t.loss not in BUILTIN_LOSSES]
    model = [config.model] if isinstance(config.model, str) else []  # a function: by value
    return list(dict.fromkeys([*model, *losses]))


LOADED_DIGEST = "__simcal_sha256__"


def import_references(refs: Sequence[str], sources: Mapping[str, str]) -> dict[str, str]:
    """Runs on a worker: import every reference (raises ModelImportError naming the worker).

    ``sources`` maps local single-file modules to the SHA-256 of the driver's copy: a module
    this worker imported earlier from other contents (an older upload) is reloaded. Returns
    the hash of each such module's file as this worker now has it.
    """
    importlib.invalidate_caches()  # a module uploaded a moment ago
    for reference in refs:
        resolve_on_worker(reference)
    found = {}
    for module, digest in sources.items():
        loaded = sys.modules[module]
        # The digest of what was loaded, not of the file now: an upload may have replaced it.
        if getattr(loaded, LOADED_DIGEST, None) != digest:
            loaded = importlib.reload(loaded)
            setattr(loaded, LOADED_DIGEST, file_digest(loaded))
        found[module] = getattr(loaded, LOADED_DIGEST)
    return found


def file_digest(module: Any) -> str:
    """SHA-256 of a module's source file ("" without one)."""
    path = getattr(module, "__file__", None)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""


def import_failures(
    service: SimulationService, refs: Sequence[str], sources: Mapping[str, str]
) -> dict[str, BaseException]:
    """Worker address -> why it cannot run ``refs`` as the driver has them (empty: all can):
    the exception it raised importing them, or a ``ModelImportError`` for another version."""
    results = service.client.run(import_references, list(refs), dict(sources), on_error="return")
    failures: dict[str, BaseException] = {}
    for worker, result in sorted(results.items()):
        if isinstance(result, BaseException):
            failures[worker] = result
            continue
        stale = sorted(m for m, digest in sources.items() if result.get(m) != digest)
        if stale:
            failures[worker] = ModelImportError(
                f"worker {worker}: its {', '.join(stale)} differs from the driver's copy"
            )
    return failures


def local_sources(refs: Sequence[str]) -> dict[str, str]:
    """Top-level modules of ``refs`` that are local single files here -> their SHA-256."""
    sources = {}
    for module in dict.fromkeys(top_module(r) for r in refs):
        path = local_code(module)
        if path is not None and path.is_file():
            sources[module] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sources


def model_parameters(config: CalibrationConfig, params: Mapping[str, float]) -> dict[str, float]:
    """``params`` without the search parameters that only a loss uses (dispersion, sd)."""
    loss_only = {name for t in config.targets for name in t.loss_parameters}
    return {k: v for k, v in params.items() if k not in loss_only}


def objectives(config: CalibrationConfig, params: Mapping[str, float]) -> dict[str, Objective]:
    """Every target's objective at the probe parameters, as a trial's aggregation gets it."""
    return {target.name: make_objective(target).bind(params) for target in config.targets}


def check_output(
    config: CalibrationConfig, output: ReplicateOutput, params: Mapping[str, float]
) -> list[str]:
    """What is wrong with one replicate's output for the config's targets, judged here (empty:
    nothing); warnings are logged. :func:`probe_cluster` judges on a worker instead."""
    return _logged(misfits(objectives(config, params), output))


def _logged(checked: tuple[list[str], list[str]]) -> list[str]:
    problems, warnings = checked
    for warning in warnings:
        log.warning("probe: %s at the probe parameters", warning)
    return problems


def _fail(what: str, problems: Sequence[str], params: Mapping[str, float]) -> ProbeError:
    shown = ", ".join(f"{k}={v:.6g}" for k, v in params.items())
    lines = "\n".join(f"  {p}" for p in problems)
    return ProbeError(f"probe failed: {what} (probe parameters: {shown}):\n{lines}")


def _on(worker: str, text: str) -> str:
    return text if worker in text else f"worker {worker}: {text}"


def probe_cluster(service: SimulationService, config: CalibrationConfig) -> list[str]:
    """Probe every worker, ship local code where needed, run one replicate; returns what was
    shipped (module names). Raises :class:`ProbeError` on any failure."""
    refs = references(config)
    sources = local_sources(refs)
    failures = import_failures(service, refs, sources)
    shipped: list[str] = []
    if failures:
        modules = [top_module(r) for r in refs]
        try:
            shipped = [str(path) for path in ship(service.client, modules)]
        except Exception as exc:  # a worker's import of the upload failed
            raise ProbeError(
                f"probe failed: shipping {', '.join(modules)} to the workers failed: "
                f"{describe(exc)}"
            ) from None
        if shipped:
            failures = import_failures(service, refs, sources)
    if failures:
        lines = [_on(worker, describe(error)) for worker, error in failures.items()]
        hint = (
            "install the model in the workers' image, or run the driver where the model is "
            "a local module or package it can ship"
        )
        raise ProbeError(
            f"probe failed: {len(failures)} worker(s) cannot import {', '.join(refs)} ({hint}):\n"
            + "\n".join(f"  {line}" for line in lines)
        )
    params = probe_parameters(config)
    [future] = service.submit_replicates(
        config.model,
        model_parameters(config, params),
        1,
        config.seed,
        trial_id="probe",
        model_options=config.model_options,
    )
    # the output judged where it is, on the worker, as a trial's aggregation is: the driver
    # then computes no loss (scipy.stats stays out of it: 0.6 s of its start)
    check = service.client.submit(
        misfits, objectives(config, params), future, key=f"probe-check-{service.run_id}",
        pure=False,
    )
    [outcome, checked] = service.gather([future, check], timeout=config.trial_timeout)
    if isinstance(outcome, BaseException):
        if classify(outcome) is FailureReason.MODEL_IMPORT or isinstance(
            outcome, ModelOutputError
        ):  # every trial would fail the same way
            raise _fail(
                f"one call of {config.model_label} on the cluster", [describe(outcome)], params
            )
        if classify(outcome) is FailureReason.SIMULATION_ERROR:
            _fail_if_every_seed_fails(service, config, params, outcome)
        # An error of the model's own at one point (or a hang, a lost worker) is what trials
        # tell, one by one; it says nothing about the setup.
        log.warning(
            "probe: one call of %s at the probe parameters failed (%s); the import check "
            "passed, so the calibration starts and each trial tells its own outcome",
            config.model_label,
            describe(outcome),
        )
        service.cancel([future, check])
        if isinstance(outcome, TimeoutError):
            service.restart_stuck_workers([future])
        return shipped
    assert isinstance(outcome, ReplicateOutput), f"unexpected probe result {outcome!r}"
    if isinstance(checked, BaseException):  # the check itself did not run (a lost worker)
        checked = misfits(objectives(config, params), outcome)
    problems = _logged(checked)
    if problems:
        raise _fail(
            f"the output of {config.model_label} does not fit the targets", problems, params
        )
    log.info(
        "probe: %d worker(s) import %s; one call at the probe parameters fits every target",
        len(service.client.scheduler_info(n_workers=-1)["workers"]),
        ", ".join(refs),
    )
    return shipped


def _fail_if_every_seed_fails(
    service: SimulationService,
    config: CalibrationConfig,
    params: Mapping[str, float],
    first: BaseException,
) -> None:
    """The probe's call raised ``first``: call again with other seeds; the same exception
    from every call raises :class:`ModelFailsError`."""
    futures = service.submit_replicates(
        config.model,
        model_parameters(config, params),
        PROBE_SEEDS - 1,
        config.seed,
        trial_id="probe",
        model_options=config.model_options,
        first=1,
    )
    outcomes = service.gather(futures, timeout=config.trial_timeout)
    service.cancel(futures)
    same = all(
        isinstance(o, BaseException) and describe(o) == describe(first) for o in outcomes
    )
    if not same:
        return
    problems = [describe(first)]
    if isinstance(first, KeyError):
        names = ", ".join(config.parameters) or "none"
        problems.append(
            f"a KeyError in the model often means a parameter it reads is named differently "
            f"in the config; the config's parameters: {names}"
        )
    problems.append(
        "fix the model or the config and run again: no trial was run, the budget is intact"
    )
    raise ModelFailsError(
        _fail(
            f"{config.model_label} raised the same exception for all {PROBE_SEEDS} seeds tried",
            problems,
            params,
        ).args[0]
    )


def probe_locally(config: CalibrationConfig) -> dict[str, Any]:
    """``check-config --probe``: one in-process call at the probe parameters, checked.

    Returns what the model produced (key -> shape); raises :class:`ProbeError`.
    """
    params = probe_parameters(config)
    try:
        output = run_replicate(
            config.model, model_parameters(config, params), config.seed, config.model_options
        )
    except Exception as exc:  # the user's model: report whatever it raised
        raise _fail(f"one call of {config.model_label}", [describe(exc)], params) from None
    problems = check_output(config, output, params)
    if problems:
        raise _fail(
            f"the output of {config.model_label} does not fit the targets", problems, params
        )
    return {
        "parameters": params,
        "outputs": {key or "<array>": list(a.shape) for key, a in output.outputs.items()},
        "summary": summarize_outputs(output.outputs),
        "seconds": round(output.seconds, 4),
    }


FIRST_VALUES = 5


def summarize_outputs(outputs: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Each output in one line: shape, min, max and its first values (not every value)."""
    lines = {}
    for key, array in outputs.items():
        flat = np.ravel(array)
        first = ", ".join(f"{v:.6g}" for v in flat[:FIRST_VALUES])
        more = ", ..." if flat.size > FIRST_VALUES else ""
        finite = flat[np.isfinite(flat)]
        span = (f"min {finite.min():.6g}, max {finite.max():.6g}" if finite.size
                else "no finite value")
        nonfinite = flat.size - finite.size
        lines[key or "<array>"] = (
            f"shape {tuple(array.shape)}, {span}"
            + (f" ({nonfinite} not finite)" if nonfinite else "")
            + f", first {first}{more}"
        )
    return lines
