"""A study knows its own shape: a run whose parameters or targets differ from the study's is
refused (exit 2) with the differences, even when the study has nothing left to do."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution

from conftest import run_simcal, write_config
from simcal.config import ConfigError, load_config
from simcal.studyshape import SHAPE_ATTR, check_shape, shape_of

UNREACHABLE = ("--scheduler", "tcp://127.0.0.1:9", "--metrics-port", "0")  # never reached


def _study(tmp_path: Path, trials: int = 0) -> optuna.Study:
    study = optuna.create_study(
        study_name="synthetic-test",
        storage=f"sqlite:///{tmp_path / 'simcal.db'}",
        direction="minimize",
        load_if_exists=True,
    )
    for number in range(trials):
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": 0.5, "y": 0.5},
                distributions={"x": FloatDistribution(0, 1), "y": FloatDistribution(0, 1)},
                value=float(number),
            )
        )
    return study


def _edit(config: Path, **fields: object) -> None:
    data = yaml.safe_load(config.read_text())
    data.update(fields)
    config.write_text(yaml.safe_dump(data))


def test_a_new_study_stores_its_shape_and_the_same_config_passes(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    study = _study(tmp_path)
    check_shape(study, config, allow_change=False)
    assert study.user_attrs[SHAPE_ATTR] == shape_of(config)
    assert shape_of(config)["parameters"]["x"] == {"low": 0.0, "high": 1.0, "log": False}
    check_shape(_study(tmp_path), config, allow_change=False)  # as stored: no complaint


def test_a_renamed_parameter_is_refused_naming_both(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    check_shape(_study(tmp_path), load_config(path), allow_change=False)
    _edit(path, parameters={"x": {"low": 0, "high": 1}, "gamma": {"low": 0, "high": 1}})
    for allow in (False, True):  # a renamed parameter is never a widened range
        with pytest.raises(ConfigError) as raised:
            check_shape(_study(tmp_path), load_config(path), allow_change=allow)
        text = str(raised.value)
        assert "study synthetic-test was created with another config" in text
        assert "parameter gamma: in the config ([0, 1]), not in the study" in text
        assert "parameter y: in the study ([0, 1]), not in the config" in text
        assert "--study synthetic-test-2" in text


def test_a_changed_loss_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    check_shape(_study(tmp_path), load_config(path), allow_change=False)
    targets = [{"name": "y", "observed": "simcal.models.synthetic:observed", "loss": "poisson_nll"}]
    _edit(path, targets=targets)
    with pytest.raises(ConfigError, match="target y: loss mse, output y in the study, "
                       "loss poisson_nll, output y in the config"):
        check_shape(_study(tmp_path), load_config(path), allow_change=True)


def test_an_older_study_without_a_shape_gets_one(tmp_path: Path) -> None:
    study = _study(tmp_path, trials=2)
    assert SHAPE_ATTR not in study.user_attrs
    config = load_config(write_config(tmp_path))
    check_shape(study, config, allow_change=False)
    assert _study(tmp_path).user_attrs[SHAPE_ATTR] == shape_of(config)


def test_run_refuses_a_changed_config_even_with_nothing_to_do(tmp_path: Path) -> None:
    """The study has its 4 of 4 trials: a changed config still says so, and exits 2."""
    path = write_config(tmp_path, max_trials=4)
    check_shape(_study(tmp_path, trials=4), load_config(path), allow_change=False)
    _edit(path, parameters={"x": {"low": 0, "high": 1}, "gamma": {"low": 0, "high": 1}})
    result = run_simcal("run", "--config", str(path), *UNREACHABLE)
    assert result.returncode == 2, result.stderr
    assert "nothing to do" not in result.stderr and "Traceback" not in result.stderr
    assert "parameter gamma: in the config ([0, 1]), not in the study" in result.stderr
    assert result.stdout == ""


def test_a_widened_range_needs_allow_config_change(tmp_path: Path) -> None:
    path = write_config(tmp_path, max_trials=4)
    check_shape(_study(tmp_path, trials=4), load_config(path), allow_change=False)
    _edit(path, parameters={"x": {"low": 0, "high": 2}, "y": {"low": 0, "high": 1}})
    refused = run_simcal("run", "--config", str(path), *UNREACHABLE)
    assert refused.returncode == 2, refused.stderr
    assert "parameter x: [0, 1] in the study, [0, 2] in the config" in refused.stderr
    assert "or pass --allow-config-change if you changed the ranges on purpose" in refused.stderr
    allowed = run_simcal("run", "--config", str(path), "--allow-config-change", *UNREACHABLE)
    assert allowed.returncode == 0, allowed.stderr  # then: nothing to do, 4 of 4
    assert "nothing to do: study synthetic-test has 4 of 4 trials" in allowed.stderr
    stored = _study(tmp_path).user_attrs[SHAPE_ATTR]["parameters"]["x"]
    assert stored == {"low": 0.0, "high": 2.0, "log": False}
    again = run_simcal("run", "--config", str(path), *UNREACHABLE)  # the new shape is the study's
    assert again.returncode == 0, again.stderr
