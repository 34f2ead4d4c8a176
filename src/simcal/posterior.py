"""Approximate posterior from a study's stored trials, and the ``simcal posterior`` command.

Two methods, both importance-weighted to undo the optimizer's non-uniform proposals
(docs/posterior.md):

- ``importance`` (all targets are likelihoods): the trial loss is a negative
  log-likelihood, so ``w_i = L(theta_i) * prior(theta_i) / q(theta_i)`` with the prior
  uniform on each parameter's search scale (log-uniform for ``log: true``) and ``q`` a
  Gaussian KDE (scipy.stats.gaussian_kde) of every proposal the sampler made;
- ``abc`` (any loss): ABC rejection keeping the trials whose loss is in the lowest
  ``quantile``, each weighted ``prior / q`` for the same reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simcal.argtypes import add_study_arguments, resolve_study_config
from simcal.config import LIKELIHOODS, CalibrationConfig, ParameterSpec

log = logging.getLogger(__name__)

METHODS = ("auto", "importance", "abc")
LOW_ESS = 30.0
BANDWIDTH_FACTOR = 0.5  # times Scott's rule


class PosteriorError(RuntimeError):
    """The stored trials cannot give a posterior (none completed, too few proposals)."""


@dataclass(frozen=True)
class Proposal:
    """One trial the sampler proposed: its parameters, and its loss if it completed."""

    params: Mapping[str, float]
    loss: float | None  # None: failed, pruned or still running (weight 0, but part of q)


def _unit(proposals: Sequence[Proposal], parameters: Mapping[str, ParameterSpec]) -> np.ndarray:
    """Parameters mapped to [0, 1] on their search scale (log for ``log: true``)."""
    columns = []
    for name, spec in parameters.items():
        values = np.array([p.params[name] for p in proposals], dtype=np.float64)
        if spec.log:
            low, high, values = math.log(spec.low), math.log(spec.high), np.log(values)
        else:
            low, high = spec.low, spec.high
        columns.append((values - low) / (high - low))
    return np.column_stack(columns)


def proposal_log_density(unit: np.ndarray) -> np.ndarray:
    """log q at each proposal: a Gaussian KDE of all proposals, floored by the uniform prior.

    The bandwidth is half of Scott's rule: Scott's is derived for one Gaussian and
    oversmooths TPE's sharply concentrated proposals, which underestimates q where TPE
    crowds and narrows the intervals (docs/posterior.md: coverage measured both ways).
    The floor (a defensive mixture: 1 % of the uniform) keeps one isolated proposal from
    an infinite weight where the KDE is thin.
    """
    from scipy import stats  # not at import: every simcal command imports this module

    n, d = unit.shape
    if n <= d + 1:
        raise PosteriorError(f"{n} proposals are too few for {d} parameters")
    kde = stats.gaussian_kde(unit.T)
    kde.set_bandwidth(kde.factor * BANDWIDTH_FACTOR)
    return np.log(0.99 * kde(unit.T) + 0.01)


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, probs: Sequence[float]) -> list:
    """Quantiles of a weighted sample (linear interpolation of the midpoint CDF)."""
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cdf = (np.cumsum(w) - 0.5 * w) / w.sum()
    return [float(np.interp(p, cdf, v)) for p in probs]


def posterior(
    proposals: Sequence[Proposal],
    parameters: Mapping[str, ParameterSpec],
    *,
    method: str = "importance",
    quantile: float = 0.1,
) -> dict[str, Any]:
    """The approximate posterior of ``parameters`` from the sampler's ``proposals``."""
    if method not in ("importance", "abc"):
        raise ValueError(f"unknown method {method!r}")
    proposals = [p for p in proposals if all(name in p.params for name in parameters)]
    completed = np.array([p.loss is not None and math.isfinite(p.loss) for p in proposals])
    if not completed.any():
        raise PosteriorError("no completed trial with a finite loss")
    unit = _unit(proposals, parameters)
    log_q = proposal_log_density(unit)
    losses = np.array(
        [p.loss if ok else np.inf for p, ok in zip(proposals, completed, strict=True)]
    )
    if method == "importance":
        log_w = -losses - log_q  # log L + log prior (constant) - log q
    else:
        threshold = np.quantile(losses[completed], quantile)
        log_w = np.where(losses <= threshold, -log_q, -np.inf)
    log_w = np.where(completed, log_w, -np.inf)
    weights = np.exp(log_w - log_w.max())
    ess = float(weights.sum() ** 2 / np.sum(weights**2))
    summary: dict[str, Any] = {}
    for name in parameters:
        values = np.array([p.params[name] for p in proposals], dtype=np.float64)
        keep = weights > 0
        q05, q25, q50, q75, q95 = weighted_quantiles(
            values[keep], weights[keep], (0.05, 0.25, 0.5, 0.75, 0.95)
        )
        summary[name] = {"median": q50, "ci50": [q25, q75], "ci90": [q05, q95]}
    warnings = []
    result = {
        "method": method,
        "method_description": DESCRIPTIONS[method].format(quantile=quantile),
        "trials_proposed": len(proposals),
        "trials_completed": int(completed.sum()),
        "effective_sample_size": round(ess, 2),
        "parameters": summary,
        "warnings": warnings,
    }
    if ess < LOW_ESS:
        more = more_trials_needed(ess, int(completed.sum()))
        result["more_trials_needed"] = more
        warnings.append(
            f"effective sample size {ess:.1f} < {LOW_ESS:.0f}: intervals are unreliable; "
            f"about {more} more trials are needed (estimate: the ESS grows in proportion to "
            f"completed trials at this study's rate, {ess / completed.sum():.3g} per trial; "
            "an optimizer that narrows its proposals, like TPE, grows it more slowly, "
            "sampler: random does not)"
        )
    return result


def more_trials_needed(ess: float, completed: int, wanted: float = LOW_ESS) -> int:
    """Completed trials still needed for an ESS of ``wanted``, if the ESS keeps growing in
    proportion to completed trials (``ess / completed`` per trial, as for independent
    proposals from a fixed distribution)."""
    return max(math.ceil(completed * wanted / max(ess, 1e-9)) - completed, 1)


DESCRIPTIONS = {
    "importance": (
        "importance sampling: weight exp(-loss) x uniform prior / KDE of the sampler's "
        "proposals (loss read as a negative log-likelihood)"
    ),
    "abc": (
        "ABC rejection: trials in the lowest {quantile:.0%} of loss, each weighted "
        "uniform prior / KDE of the sampler's proposals"
    ),
}


def choose_method(config: CalibrationConfig, method: str) -> str:
    """``auto``: importance sampling when every target is a likelihood, else ABC rejection."""
    if method != "auto":
        return method
    return "importance" if all(t.loss in LIKELIHOODS for t in config.targets) else "abc"


def study_proposals(study: Any) -> list[Proposal]:
    """Every trial the sampler proposed, with its loss when it completed."""
    from optuna.trial import TrialState

    return [
        Proposal(dict(t.params), t.value if t.state == TrialState.COMPLETE else None)
        for t in study.get_trials(deepcopy=False)
        if t.params
    ]


def study_posterior(
    study: Any, config: CalibrationConfig, *, method: str = "auto", quantile: float = 0.1
) -> dict[str, Any]:
    """``simcal posterior``'s JSON for a study: the method ``auto`` picks, the intervals and
    the warnings that apply to the config's targets (raises :class:`PosteriorError`)."""
    method = choose_method(config, method)
    result = posterior(study_proposals(study), config.parameters, method=method, quantile=quantile)
    result = {"study": config.study, **result}
    if method == "importance" and any(t.loss not in LIKELIHOODS for t in config.targets):
        result["warnings"].append("a target's loss is not a likelihood: read exp(-loss) with care")
    if method == "importance" and any(t.weight != 1 for t in config.targets):
        result["warnings"].append("target weights != 1 temper the likelihood (docs/posterior.md)")
    return result


# -- the command ---------------------------------------------------------------------------------


def add_posterior_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``posterior`` on the ``simcal`` command's subparsers."""
    parser = commands.add_parser(
        "posterior", help="approximate posterior from the stored trials (docs/posterior.md)"
    )
    add_study_arguments(parser)
    parser.add_argument("--method", choices=METHODS, default="auto")
    parser.add_argument(
        "--quantile", type=_fraction, default=0.1, help="ABC: share of trials kept (0-1)"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    parser.set_defaults(handler=cmd_posterior)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def cmd_posterior(args: argparse.Namespace) -> int:
    """``simcal posterior``: print (and write) the approximate posterior as JSON."""
    from simcal.config import ConfigError
    from simcal.reporting.studies import load_existing_study

    config = resolve_study_config(args)
    if args.out and not args.out.parent.is_dir():
        raise ConfigError(f"--out {str(args.out)!r}: directory does not exist")
    # never creates a database file; a missing study exits 2 listing the studies there
    study = load_existing_study(config.storage, config.study)
    try:
        result = study_posterior(study, config, method=args.method, quantile=args.quantile)
    except PosteriorError as exc:
        print(f"simcal: error: study {config.study!r}: {exc}", file=sys.stderr)
        return 1
    if "more_trials_needed" in result:
        from simcal.trials import counted_trials

        total = counted_trials(study) + result["more_trials_needed"]
        again = ["simcal", "run"] + (["--config", str(args.config)] if args.config else [])
        again += (["--study", args.study] if args.study else []) + ["--max-trials", str(total)]
        result["continue_with"] = " ".join(again)
        result["warnings"].append(
            f"`{result['continue_with']}` continues this same study up to {total} trials "
            "(--max-trials counts the trials it already has), then run simcal posterior again"
        )
    for warning in result["warnings"]:
        log.warning("%s", warning)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0
