"""Scenario 7: bad input is refused clearly, never with a traceback.

Property-based (hypothesis) over the config loader and the command line: any document
gives either a valid config or a ``ConfigError`` that names the field; any argv gives
exit status 2 naming the flag, or reaches the point where it would run. And models that
return the wrong type, wrong shape, NaN or a huge array fail their trial with a clear
reason, on a real LocalCluster and in a whole calibration.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import yaml
from distributed import Client
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState

import bad_models
from conftest import SIMCAL, run_simcal, write_config
from simcal.cli import main
from simcal.config import CalibrationConfig, ConfigError, load_config, validate_config
from simcal.driver import Calibration
from simcal.failures import ModelOutputError, NonFiniteLossError
from simcal.metrics import Metrics
from simcal.samplers import make_sampler
from simcal.service import SimulationService
from simcal.storage import open_study
from simcal.targets import mse
from simcal.tasks import MAX_OUTPUT_ELEMENTS, aggregate, run_replicate
from simcal.trials import FAIL_REASON

SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much],
    "derandomize": False,
}

BASE: dict[str, Any] = {
    "study": "fuzz",
    "model": "simcal.models.synthetic:simulate",
    "model_options": {"duration": 0.0},
    "parameters": {"x": {"low": 0.0, "high": 1.0}, "y": {"low": 0.0, "high": 1.0}},
    "replicates": 2,
    "seed": 1,
    "targets": [{"name": "y", "observed": "simcal.models.synthetic:observed", "loss": "mse"}],
    "max_trials": 10,
    "storage": "sqlite:////nonexistent-simcal-dir/fuzz.db",
}
FIELDS = sorted(CalibrationConfig.model_fields)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad-input")


# -- strategies -----------------------------------------------------------------------------

# Random strings become import paths: keep the two stdlib modules with side effects out.
texts = st.text(max_size=24).filter(lambda s: "antigravity" not in s and s.strip() != "this")
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**90), max_value=2**90),
    st.floats(),  # NaN and infinities included
    st.sampled_from([math.nan, math.inf, -math.inf, 0, -1, 2**63, 10**30, "", "auto"]),
    texts,
)
junk = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(texts | st.integers(), children, max_size=3)
    ),
    max_leaves=6,
)
unknown_keys = st.one_of(texts, st.integers(), st.sampled_from(["colour", "Study", "max-trials"]))

mutations = st.one_of(
    st.tuples(st.just("delete"), st.sampled_from(sorted(BASE))),
    st.tuples(st.just("set"), st.sampled_from(FIELDS), junk),
    st.tuples(st.just("set"), unknown_keys, junk),
    st.tuples(st.just("param"), st.sampled_from(["low", "high", "log", "step"]), junk),
    st.tuples(st.just("range"), st.floats(), st.floats()),  # low > high, NaN, inf ...
    st.tuples(st.just("target"), st.sampled_from(["name", "observed", "loss", "x"]), junk),
)


@st.composite
def documents(draw: st.DrawFn) -> tuple[dict[Any, Any], set[str]]:
    """A config document: the valid base with 1-3 mutations, and the top-level keys touched."""
    document: dict[Any, Any] = json.loads(json.dumps(BASE))
    touched: set[str] = set()
    drawn = draw(st.lists(mutations, min_size=1, max_size=3))
    for kind, key, value in [(m[0], m[1], m[2] if len(m) > 2 else None) for m in drawn]:
        if kind == "delete":
            document.pop(key, None)
            touched.add(key)
        elif kind == "set":
            document[key] = value
            touched.add(str(key))
        elif kind in ("param", "range"):
            parameters = document.get("parameters")
            if not isinstance(parameters, dict) or not isinstance(parameters.get("x"), dict):
                parameters = document["parameters"] = {"x": {"low": 0.0, "high": 1.0}}
            if kind == "param":
                parameters["x"][key] = value
            else:
                parameters["x"].update(low=key, high=value)
            touched.add("parameters")
        else:
            targets = document.get("targets")
            if not isinstance(targets, list) or not targets or not isinstance(targets[0], dict):
                targets = document["targets"] = [dict(BASE["targets"][0])]
            targets[0][key] = value
            touched.add("targets")
    return document, touched


def _write(directory: Path, document: object) -> Path:
    path = directory / "fuzz.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), "utf-8")
    return path


def _as_read(key: object) -> str:
    """A key as YAML reads it back: PyYAML writes a key holding a YAML line break (NEL,
    U+2028) unquoted, and reads it back folded into a space, so the error names that."""
    (read,) = yaml.safe_load(yaml.safe_dump({key: 0}, allow_unicode=True))
    return str(read)


def _check_error(error: ConfigError, touched: set[str]) -> None:
    message = str(error)
    assert message.startswith("invalid config:"), message
    assert any(key in message or repr(key) in message for key in touched), (touched, message)
    for line in message.splitlines()[1:]:
        assert line.startswith("  ") and ": " in line, message  # "  <field>: <reason>"


# -- the config loader --------------------------------------------------------------------------


@settings(max_examples=300, **SETTINGS)
@given(case=documents())
@example(case=({**BASE, "\x85": None}, {"\x85"}))  # found in CI: a key YAML reads back as " "
def test_any_document_is_a_config_or_an_error_naming_the_field(
    workdir: Path, case: tuple[dict[Any, Any], set[str]]
) -> None:
    document, touched = case
    path = _write(workdir, document)
    try:
        config = load_config(path)
    except ConfigError as error:
        _check_error(error, touched | {_as_read(key) for key in touched})
    else:
        assert isinstance(config, CalibrationConfig)
        for spec in config.parameters.values():
            assert math.isfinite(spec.low) and math.isfinite(spec.high) and spec.low < spec.high


@settings(max_examples=200, **SETTINGS)
@given(text=st.text(max_size=300))
def test_any_text_is_refused_as_a_config_error(workdir: Path, text: str) -> None:
    path = workdir / "text.yaml"
    path.write_text(text, "utf-8", errors="surrogatepass")
    with pytest.raises(ConfigError):
        load_config(path)


@settings(max_examples=150, **SETTINGS)
@given(data=st.binary(max_size=300))
def test_any_bytes_are_refused_as_a_config_error(workdir: Path, data: bytes) -> None:
    path = workdir / "bytes.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError):
        load_config(path)


VALID_YAML = yaml.safe_dump(BASE, sort_keys=False)
NASTY: dict[str, tuple[str | bytes, str]] = {
    "syntax error": ("study: [unclosed\n", "is not valid YAML"),
    "tab indentation": ("study: a\n\tmodel: b\n", "is not valid YAML"),
    "NUL character": ("study: a\x00\n", "is not valid YAML"),
    "not UTF-8": (b"study: \xff\xfe\n", "is not UTF-8 text"),
    "python object tag": ("!!python/object/apply:os.system ['true']\n", "is not valid YAML"),
    "unhashable key": ("? [1, 2]\n: x\n", "found unhashable key"),
    "a list": ("- study\n- model\n", "expected a mapping at the top level, got list"),
    "a number": ("42\n", "expected a mapping at the top level, got int"),
    "nested too deeply": ("study: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    "5000-digit integer": (VALID_YAML.replace("seed: 1", "seed: " + "9" * 5000), "line"),
    "NaN bound": (
        VALID_YAML.replace("low: 0.0", "low: .nan", 1),
        "parameters.x: low and high must be finite",
    ),
    "infinite bound": (
        VALID_YAML.replace("high: 1.0", "high: .inf", 1),
        "parameters.x: low and high must be finite",
    ),
    "low > high": (
        VALID_YAML.replace("low: 0.0", "low: 5.0", 1),
        "parameters.x: low (5.0) must be less than high (1.0)",
    ),
    "huge replicates": (
        VALID_YAML.replace("replicates: 2", f"replicates: {10**40}"),
        "replicates: Input should be less than or equal to 10000",
    ),
    "NaN target_loss": (VALID_YAML + "target_loss: .nan\n", "target_loss:"),
    "relative import": (
        VALID_YAML.replace("simcal.models.synthetic:simulate", ".relative:simulate"),
        "model: cannot import module '.relative'",
    ),
    "unknown key": (VALID_YAML + "replicate: 3\n", "replicate: Extra inputs are not permitted"),
    "integer key": (VALID_YAML + "7: seven\n", "7: Keys should be strings"),
}


@pytest.mark.parametrize("case", sorted(NASTY))
def test_nasty_documents_are_refused_clearly(workdir: Path, case: str) -> None:
    content, expected = NASTY[case]
    path = workdir / "nasty.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, "utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert expected in str(raised.value)
    if case == "5000-digit integer":
        assert "integer of 5000 characters is too long" in str(raised.value)
        assert "seed: 9999" in str(raised.value)  # the snippet shows the field


# -- the command line, in-process ---------------------------------------------------------------


def _main(argv: list[str]) -> tuple[int, str, str]:
    """``simcal`` in-process: its exit status, stdout and stderr. Tracebacks propagate."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exit_:  # argparse
            status = exit_.code if isinstance(exit_.code, int) else 1
    return status, out.getvalue(), err.getvalue()


@settings(max_examples=60, **SETTINGS)
@given(case=documents())
def test_check_config_exits_0_or_2_naming_the_field(
    workdir: Path, case: tuple[dict[Any, Any], set[str]]
) -> None:
    document, touched = case
    status, out, err = _main(["check-config", str(_write(workdir, document))])
    if status == 0:
        assert json.loads(out)["study"]
    else:
        assert status == 2, err
        assert err.startswith("simcal: error: invalid config:"), err
        named = any(key in err or repr(key) in err for key in touched)
        assert named or "targets." in err, (touched, err)


@settings(max_examples=25, **SETTINGS)
@given(case=documents())
def test_run_with_a_bad_config_exits_2_before_starting_anything(
    workdir: Path, case: tuple[dict[Any, Any], set[str]]
) -> None:
    document, touched = case
    path = _write(workdir, document)
    try:
        load_config(path)
    except ConfigError:
        pass
    else:
        assume(False)  # a valid document would start a cluster: not here
    status, _, err = _main(["run", "--config", str(path), "--metrics-port", "0"])
    assert status == 2, err
    assert err.startswith("simcal: error: invalid config:"), err
    assert any(key in err or repr(key) in err for key in touched), (touched, err)


#: flag: (valid values, invalid values). With only valid values, the run gets as far as
#: opening the storage, whose directory does not exist (exit 1): nothing is started.
FLAGS: dict[str, tuple[list[str], list[str]]] = {
    "--workers": (["1", "8", "64"], ["0", "-2", "two", "1.5", "", "9" * 5000]),
    "--min-workers": (["1", "3"], ["0", "-1", "x"]),
    "--metrics-port": (["0", "65535"], ["70000", "-1", "80.5", "port"]),
    "--connect-timeout": (["0", "2.5", "inf"], ["nan", "-1", "soon"]),
    "--max-trials": (["1", "500"], ["0", "-5", "many", "1e3"]),
    "--mode": (["streaming", "batch"], ["fast", ""]),
    "--grace-period": (["0", "30"], ["-1", "nan", "x"]),
    "--dashboard-address": (["127.0.0.1:0", ":8787"], ["localhost", "127.0.0.1:99999", "a b:1"]),
    "--worker-memory-limit": (["auto", "2GiB", "0.5", "0"], ["lots", "-1", "-2GiB"]),
    "--tls-ca-file": ([], ["/nonexistent/ca.pem"]),
    "--scheduler": ([], ["foo://127.0.0.1:8786", "tls://127.0.0.1:1"]),
}
UNKNOWN = ["--bogus", "--tls", "-x", "--workers-count"]


@st.composite
def argvs(draw: st.DrawFn) -> tuple[list[str], set[str]]:
    """``run`` options with valid or invalid values; returns argv and the bad flags."""
    argv: list[str] = []
    bad: set[str] = set()
    for flag in draw(st.lists(st.sampled_from(sorted(FLAGS)), max_size=5, unique=True)):
        valid, invalid = FLAGS[flag]
        if valid and draw(st.booleans()):
            argv += [flag, draw(st.sampled_from(valid))]
        else:
            argv += [flag, draw(st.sampled_from(invalid))]
            bad.add(flag)
    if draw(st.booleans()):
        unknown = draw(st.sampled_from(UNKNOWN))
        argv.insert(draw(st.integers(0, len(argv))) // 2 * 2, unknown)
        bad.add(unknown)
    return argv, bad


@settings(max_examples=120, **SETTINGS)
@given(case=argvs())
def test_run_arguments_exit_2_naming_the_flag(
    workdir: Path, case: tuple[list[str], set[str]]
) -> None:
    argv, bad = case
    config = _write(workdir, BASE)
    status, _, err = _main(["run", "--config", str(config), *argv])
    assert "Traceback" not in err
    if bad:
        assert status == 2, (argv, err)
        assert any(flag in err for flag in bad), (argv, bad, err)
    else:
        assert status == 1, (argv, err)  # got as far as the storage
        assert "cannot open storage" in err and "does not exist" in err, err


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["run", "--config"], ["--log-level", "LOUD", "run"], ["results", "-x"]],
)
def test_bad_commands_exit_2(argv: list[str]) -> None:
    status, _, err = _main(argv)
    assert status == 2 and "error:" in err, err


CLI_CASES = {
    "unknown field": (["run", "--config", "{config}", "--metrics-port", "0"], "colour: Extra"),
    "metrics port out of range": (["run", "--metrics-port", "70000"], "--metrics-port"),
    "workers not a number": (["run", "--workers", "eight"], "--workers"),
    "unknown flag": (["run", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    "check-config of a missing file": (["check-config", "/nonexistent.yaml"], "cannot read"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_the_real_command_exits_2_without_a_traceback(workdir: Path, case: str) -> None:
    argv, expected = CLI_CASES[case]
    config = _write(workdir, {**BASE, "colour": "blue"})
    result = run_simcal(*[a.replace("{config}", str(config)) for a in argv], timeout=120)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_a_config_path_that_is_not_utf8_is_a_clear_error() -> None:
    argv = [os.fsencode(a) for a in SIMCAL] + [b"check-config", b"/tmp/\xff\xfe-config.yaml"]
    result = subprocess.run(argv, capture_output=True, timeout=120, check=False)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, stderr
    assert "cannot read config" in stderr and "Traceback" not in stderr


def test_observed_data_that_cannot_be_loaded_exits_2_naming_the_target(workdir: Path) -> None:
    csv = workdir / "observed.csv"
    csv.write_text("day,cases\nmonday,many\n", "utf-8")
    document = {**BASE, "targets": [{"name": "cases", "observed": str(csv)}]}
    for argv in (["check-config"], ["run", "--metrics-port", "0", "--config"]):
        status, _, err = _main([*argv, str(_write(workdir, document))])
        assert status == 2, err
        assert "targets.0.observed: ObservedDataError:" in err and "line 2" in err, err


def test_checking_a_config_does_not_run_the_models_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``model:`` is checked against the module's source when it defines the name with a
    ``def``: the driver does not run the module (a Starsim model's imports cost it 1.2 s, on a
    core the workers want). A name the source does not define is still refused; one made at
    import time is still found, by importing."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "heavy_model.py").write_text(
        "import sys\nsys.modules['heavy_model_ran'] = sys\n\n"
        "def simulate(params, seed):\n    return {'y': [1.0]}\n\n"
        "globals()['made_at_import'] = simulate\n",
        "utf-8",
    )
    try:
        load_config(write_config(tmp_path, model="heavy_model:simulate"))
        assert "heavy_model" not in sys.modules and "heavy_model_ran" not in sys.modules
        with pytest.raises(ConfigError, match="module 'heavy_model' has no attribute 'simulat'"):
            load_config(write_config(tmp_path, model="heavy_model:simulat"))
        load_config(write_config(tmp_path, model="heavy_model:made_at_import"))
    finally:
        sys.modules.pop("heavy_model", None)
        sys.modules.pop("heavy_model_ran", None)


# -- models that return what simcal cannot use ---------------------------------------------------


@pytest.fixture
def bad_client(client: Client) -> Iterator[Client]:
    """The shared cluster, with tests/support/bad_models.py importable on every worker."""
    client.upload_file(str(Path(bad_models.__file__)))
    yield client


REPLICATE_FAILURES = {
    "wrong_type": "output '<return value>' is a str, expected a numpy array",
    "none": "output '<return value>' is a NoneType, expected a numpy array",
    "scalar": "output '<return value>' is a float, expected a numpy array",
    "ragged": "output '<return value>' is not numeric",
    "not_numeric": "output '<return value>' is not numeric",
    "huge_array": f"has 1000000000 elements, more than the limit {MAX_OUTPUT_ELEMENTS}",
    "empty_dict": "model returned an empty dict",
}


@pytest.mark.parametrize("name", sorted(REPLICATE_FAILURES))
def test_a_model_returning_garbage_fails_its_replicate_clearly(
    bad_client: Client, name: str
) -> None:
    future = bad_client.submit(
        run_replicate, getattr(bad_models, name), {"x": 0.5}, 1, {}, pure=False
    )
    error = future.exception(timeout=120)
    assert isinstance(error, ModelOutputError), repr(error)
    assert REPLICATE_FAILURES[name] in str(error)


AGGREGATION_FAILURES = {
    "wrong_shape": (
        ModelOutputError,
        "model output has shape (13,), observed data has shape (16,)",
    ),
    "two_dimensional": (ModelOutputError, "model output has shape (16, 2)"),
    "wrong_key": (ModelOutputError, "model output has no 'y'; it has ['not_y']"),
    "nan_array": (NonFiniteLossError, "target 'y': loss is nan"),
    "inf_array": (NonFiniteLossError, "target 'y': loss is inf"),
}


@pytest.mark.parametrize("name", sorted(AGGREGATION_FAILURES))
def test_a_model_output_that_does_not_fit_fails_its_aggregation_clearly(
    bad_client: Client, name: str
) -> None:
    replicates = [
        bad_client.submit(run_replicate, getattr(bad_models, name), {"x": 0.5}, s, {}, pure=False)
        for s in range(2)
    ]
    future = bad_client.submit(
        aggregate, "y", "y", bad_models.observed(), mse, *replicates, pure=False
    )
    error = future.exception(timeout=120)
    kind, message = AGGREGATION_FAILURES[name]
    assert isinstance(error, kind), repr(error)
    assert message in str(error)


def test_a_calibration_with_a_misbehaving_model_tells_every_trial_with_its_reason(
    bad_client: Client, tmp_path: Path
) -> None:
    config = validate_config(
        {
            "study": "bad-model",
            "model": "bad_models:mixed",
            "parameters": {"x": {"low": 0.0, "high": 1.0}},
            "replicates": 2,
            "seed": 5,
            "sampler": "random",
            "targets": [{"name": "y", "observed": "bad_models:observed"}],
            "max_trials": 60,
            "storage": f"sqlite:///{tmp_path / 'bad.db'}",
        }
    )
    study = open_study(config.storage, config.study, make_sampler(config.sampler, config.seed))
    stats = Calibration(config, SimulationService(bad_client), study, Metrics(config.study)).run()

    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 60 and stats.completed + stats.failed == 60
    seen = Counter()
    for trial in trials:
        expected = bad_models.expected_failure(trial.params["x"])
        if expected is None:
            assert trial.state == TrialState.COMPLETE, trial.user_attrs
            assert np.isfinite(trial.value)
            seen["ok"] += 1
            continue
        reason, error = expected
        assert trial.state == TrialState.FAIL
        assert trial.user_attrs[FAIL_REASON] == reason
        assert trial.user_attrs["error"].startswith(error), trial.user_attrs["error"]
        seen[error] += 1
    assert seen["ok"] > 0 and len(seen) == 5, seen  # every kind of garbage was met
    assert stats.errors == dict(
        Counter(t.user_attrs[FAIL_REASON] for t in trials if t.state == TrialState.FAIL)
    )
    best = optuna.load_study(study_name="bad-model", storage=config.storage).best_trial
    assert bad_models.expected_failure(best.params["x"]) is None
