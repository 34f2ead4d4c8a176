"""A study's shape: the parameters and targets it was created with, stored on the study.

Trials of one study are comparable only if they searched the same parameters over the same
ranges and were scored by the same targets and losses. ``simcal run`` stores the config's
shape on a new study (a study user attribute, :data:`SHAPE_ATTR`, through Optuna's public
API) and compares it on every later run: a config that differs is refused (exit 2) with the
differences, one per line, and a new study name to use. ``--allow-config-change`` accepts
changed parameter ranges (widened on purpose) and stores the new shape; renamed, added or
removed parameters, a changed log scale, and changed targets are refused even then. A study
created by an older simcal has no stored shape: it gets the config's, no refusal.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna

from simcal.config import CalibrationConfig, ConfigError

log = logging.getLogger(__name__)

SHAPE_ATTR = "simcal:shape"
ALLOW_FLAG = "--allow-config-change"


def shape_of(config: CalibrationConfig) -> dict[str, Any]:
    """The parameters (range, log scale) and targets (loss, output) of ``config``, as JSON."""
    return {
        "parameters": {
            name: {"low": spec.low, "high": spec.high, "log": spec.log}
            for name, spec in config.parameters.items()
        },
        "targets": {
            target.name: {"loss": target.loss, "output": target.output or target.name}
            for target in config.targets
        },
    }


def _range(spec: dict[str, Any]) -> str:
    return f"[{spec['low']:g}, {spec['high']:g}]" + (" log" if spec.get("log") else "")


def differences(stored: dict[str, Any], wanted: dict[str, Any]) -> tuple[list[str], bool]:
    """The lines that tell ``stored`` (the study's) from ``wanted`` (the config's), and whether
    they are only changed parameter ranges (what ``--allow-config-change`` accepts)."""
    lines: list[str] = []
    only_ranges = True
    for kind, describe in (("parameter", _range), ("target", _target)):
        old, new = stored.get(kind + "s", {}), wanted.get(kind + "s", {})
        for name in sorted(old.keys() - new.keys()):
            lines.append(f"{kind} {name}: in the study ({describe(old[name])}), not in the config")
            only_ranges = False
        for name in sorted(new.keys() - old.keys()):
            lines.append(f"{kind} {name}: in the config ({describe(new[name])}), not in the study")
            only_ranges = False
        for name in sorted(old.keys() & new.keys()):
            if old[name] != new[name]:
                lines.append(
                    f"{kind} {name}: {describe(old[name])} in the study, "
                    f"{describe(new[name])} in the config"
                )
                if kind != "parameter" or old[name].get("log") != new[name].get("log"):
                    only_ranges = False
    return lines, only_ranges


def _target(spec: dict[str, Any]) -> str:
    return f"loss {spec['loss']}, output {spec['output']}"


def check_shape(study: optuna.Study, config: CalibrationConfig, *, allow_change: bool) -> None:
    """Store the config's shape on a study without one; raise :class:`ConfigError` if the
    study's differs (unless ``allow_change`` and only ranges changed: then store the new)."""
    wanted = shape_of(config)
    stored = study.user_attrs.get(SHAPE_ATTR)
    if stored == wanted:
        return
    if stored is None:
        study.set_user_attr(SHAPE_ATTR, wanted)
        return
    lines, only_ranges = differences(stored, wanted)
    if allow_change and only_ranges:
        log.warning(
            "study %s: %s: its parameter ranges are now the config's:\n  %s",
            config.study, ALLOW_FLAG, "\n  ".join(lines),
        )
        study.set_user_attr(SHAPE_ATTR, wanted)
        return
    if only_ranges:
        remedy = f"or pass {ALLOW_FLAG} if you changed the ranges on purpose"
    else:
        remedy = f"({ALLOW_FLAG} accepts changed ranges only)"
    raise ConfigError(
        f"study {config.study} was created with another config; its trials would not be "
        "comparable with this run's:\n  " + "\n  ".join(lines) + "\n"
        f"use a new study name (--study {config.study}-2, or `study:` in the config) {remedy}"
    )
