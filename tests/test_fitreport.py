"""The fit report: replicate summaries stored by the driver, ``simcal report``, ``studies``,
``results`` ordering and marking, and read-only commands that never create storage."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from distributed import Client, LocalCluster
from optuna.trial import TrialState

import report_models
from conftest import run_simcal
from simcal.config import validate_config
from simcal.driver import STORED_FITS, Calibration
from simcal.metrics import Metrics
from simcal.models.seir import simulate
from simcal.reporting.page import write_report
from simcal.samplers import make_sampler
from simcal.service import SimulationService, replicate_seed
from simcal.storage import open_study
from simcal.tasks import FIT_ATTR_PREFIX, SUMMARY_POINTS, summarize_replicates

SEIR: dict[str, Any] = {
    "study": "seir-faults",
    "model": "report_models:seir_with_faults",
    "parameters": {"gamma": {"low": 0.05, "high": 0.5}, "beta": {"low": 0.1, "high": 1.0}},
    "replicates": 4,
    "seed": 42,
    "targets": [{"name": "incidence", "observed": "simcal.models.seir:observed"}],
    "max_trials": 40,
}


def calibrate(client: Client, directory: Path, **fields: object) -> tuple[Path, dict[str, Any]]:
    """Run a study on the shared cluster; returns its config file and config fields."""
    data = {**SEIR, "storage": f"sqlite:///{directory / 'study.db'}", **fields}
    config = validate_config(data)
    study = open_study(config.storage, config.study, make_sampler(config.sampler, config.seed))
    Calibration(config, SimulationService(client), study, Metrics(config.study)).run()
    path = directory / "calibration.yaml"
    path.write_text(json.dumps(data), encoding="utf-8")  # JSON is YAML
    return path, data


@pytest.fixture(scope="module")
def studies(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[Path, dict[str, Any]]]]:
    """Two real studies: one with failures of two kinds, one whose trials all failed."""
    with Client(cluster) as client:
        client.wait_for_workers(8, timeout=120)
        client.upload_file(str(Path(report_models.__file__)))
        survey = tmp_path_factory.mktemp("survey")
        (survey / "prevalence.csv").write_text("t,infected,n\n20,21,200\n40,60,200\n80,149,200\n")
        yield {
            "survey": calibrate(
                client, survey, study="sir-survey", model="report_models:sir_share",
                parameters={"beta": {"low": 0.1, "high": 0.6}, "gamma": {"low": 0.01,
                                                                           "high": 0.2}},
                targets=[{"name": "infected", "observed": str(survey / "prevalence.csv"),
                          "loss": "binomial_nll"}],
                max_trials=12,
            ),
            "mixed": calibrate(client, tmp_path_factory.mktemp("mixed")),
            "failed": calibrate(
                client,
                tmp_path_factory.mktemp("failed"),
                study="all-failed",
                model="report_models:always_fails",
                max_trials=6,
            ),
        }


def simcal(*args: str) -> Any:
    """The CLI, run where it can import the test models (a config names them)."""
    return run_simcal(*args, cwd=str(Path(report_models.__file__).parent))


def load(data: dict[str, Any]) -> optuna.Study:
    return optuna.load_study(study_name=data["study"], storage=data["storage"])


def test_replicate_summary_is_bounded_quantiles() -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=2000) + np.arange(2000) for _ in range(50)]
    summary = summarize_replicates(arrays)
    assert len(summary["x"]) == SUMMARY_POINTS and summary["x"][0] == 0
    assert summary["x"][-1] == 1999
    stacked = np.stack(arrays)[:, summary["x"]]
    assert np.allclose(summary["median"], np.median(stacked, axis=0), rtol=1e-5)
    assert np.allclose(summary["q05"], np.quantile(stacked, 0.05, axis=0), rtol=1e-5)
    bands = zip(summary["q05"], summary["median"], summary["q95"], strict=True)
    assert all(a <= b <= c for a, b, c in bands)
    assert len(json.dumps(summary)) < 30_000
    short = summarize_replicates([np.arange(3.0), np.arange(3.0) + 2])
    assert short == {"x": [0, 1, 2], "q05": [0.1, 1.1, 2.1], "median": [1, 2, 3],
                     "q95": [1.9, 2.9, 3.9]}


def test_stored_fit_is_what_the_driver_saw(studies: dict) -> None:
    """The best trials carry their replicate summary, and it is exactly the quantiles of
    the replicates the driver ran (same seeds): re-running them reproduces it."""
    _, data = studies["mixed"]
    trials = load(data).get_trials(deepcopy=False)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    best_so_far: list[float] = []
    for trial in sorted(completed, key=lambda t: t.datetime_complete):
        among = len(best_so_far) < STORED_FITS or trial.value < sorted(best_so_far)[STORED_FITS - 1]
        assert (f"{FIT_ATTR_PREFIX}incidence" in trial.user_attrs) == among, trial.number
        best_so_far.append(trial.value)
    best = min(completed, key=lambda t: t.value)
    rerun = [
        simulate(best.params, replicate_seed(data["seed"], str(best.number), i))["incidence"]
        for i in range(data["replicates"])
    ]
    assert best.user_attrs[f"{FIT_ATTR_PREFIX}incidence"] == summarize_replicates(rerun)


def test_fit_of_a_time_indexed_binomial_survey_shows_its_days(studies: dict) -> None:
    """The driver stores the model's times with the summary: the report draws the survey's
    days 20, 40, 80 beside the model's band, as proportions against its probability."""
    from simcal.reporting.figures import completed_by_loss, fit_axes
    from simcal.targets import load_target_data

    _, data = studies["survey"]
    config = validate_config(data)
    ranked = completed_by_loss(load(data).get_trials(deepcopy=False))
    target = config.targets[0]
    summary = ranked[0].user_attrs[f"{FIT_ATTR_PREFIX}infected"]
    assert summary["t"] == list(range(101))
    ax = fit_axes(target, load_target_data(target), ranked, top=3)
    lines = {str(line.get_label()): line for line in ax.get_lines()}
    assert list(lines["observed"].get_xdata()) == [20, 40, 80]
    assert np.allclose(lines["observed"].get_ydata(), [21 / 200, 60 / 200, 149 / 200])
    median = next(v for k, v in lines.items() if k.startswith("best trial #"))
    assert np.allclose(median.get_xdata(), range(101)) and max(median.get_ydata()) <= 1
    assert ax.get_xlabel() == "time t" and "proportion" in ax.get_ylabel()


def test_report_of_a_study_with_failures(studies: dict, tmp_path: Path) -> None:
    config, _data = studies["mixed"]
    out = tmp_path / "report"
    result = simcal("report", "--config", str(config), "--out", str(out), "--top", "4")
    assert result.returncode == 0, result.stderr
    names = {p.name for p in out.iterdir()}
    assert names == {"report.html", "fit-incidence.png", "loss.png", "parameters.png",
                     "throughput.png"}
    page = (out / "report.html").read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert page.count("data:image/png;base64,") == 4
    assert "simulation_error" in page and "nan_loss" in page
    table = page.split("<table class=\"best\">")[1].split("</table>")[0]
    headers = [h.split("</th>")[0] for h in table.split("<th>")[1:]]
    assert headers == ["rank", "trial", "loss", "loss incidence", "gamma", "beta", "seconds"]
    assert table.count("<tr>") == 5  # header + 4 best


def test_report_redacts_the_storage_password(studies: dict, tmp_path: Path) -> None:
    _, data = studies["mixed"]
    config = validate_config(data)
    url = "postgresql://simcal:s3cr3t-pw@db.example:5432/simcal?password=s3cr3t-pw"
    page = write_report(load(data), config, tmp_path, top=3, storage_url=url).read_text()
    assert "s3cr3t" not in page and "postgresql://simcal:***@db.example:5432" in page


def test_report_of_a_study_whose_trials_all_failed(studies: dict, tmp_path: Path) -> None:
    config, _ = studies["failed"]
    result = simcal("report", "--config", str(config), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "report.html").read_text()
    assert "All 6 finished trials failed (simulation_error: 6)" in page
    assert "this model always fails" in page
    assert "Not shown: no trial completed" in page


def test_report_of_an_older_study_without_summaries(studies: dict, tmp_path: Path) -> None:
    _, data = studies["mixed"]
    storage = f"sqlite:///{tmp_path / 'old.db'}"
    old = optuna.create_study(study_name=data["study"], storage=storage)
    for trial in load(data).get_trials(deepcopy=False):  # as an older simcal stored them
        attrs = {k: v for k, v in trial.user_attrs.items() if not k.startswith(FIT_ATTR_PREFIX)}
        old.add_trial(optuna.trial.create_trial(
            state=trial.state, value=trial.value, params=trial.params,
            distributions=trial.distributions, user_attrs=attrs,
        ))
    config = tmp_path / "calibration.yaml"
    config.write_text(json.dumps({**data, "storage": storage}))
    result = simcal("report", "--config", str(config), "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "r" / "report.html").read_text()
    assert "has no stored replicate summary" in page and "did not store them" in page
    assert not (tmp_path / "r" / "fit-incidence.png").exists()
    assert (tmp_path / "r" / "loss.png").exists()


def test_bad_report_input_exits_2_and_creates_nothing(studies: dict, tmp_path: Path) -> None:
    config, _data = studies["mixed"]
    missing = simcal("report", "--config", str(config), "--study", "nope",
                         "--out", str(tmp_path / "r"))
    assert missing.returncode == 2
    assert "no study 'nope'" in missing.stderr and "seir-faults" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "r").exists()
    blocked = tmp_path / "file"
    blocked.write_text("")
    unwritable = simcal("report", "--config", str(config), "--out", str(blocked / "r"))
    assert unwritable.returncode == 2 and "--out" in unwritable.stderr
    assert "Traceback" not in unwritable.stderr
    nowhere = tmp_path / "nonexist.db"
    for command in (["results"], ["report", "--out", str(tmp_path / "r")], ["studies"]):
        result = simcal(*command, "--storage", f"sqlite:///{nowhere}")
        assert result.returncode == 2, (command, result.stderr)
        assert "does not exist" in result.stderr and "Traceback" not in result.stderr
        assert not nowhere.exists(), command


def test_studies_lists_counts_and_best_loss(studies: dict) -> None:
    _, data = studies["mixed"]
    study = load(data)
    result = simcal("studies", "--storage", data["storage"])
    assert result.returncode == 0, result.stderr
    header, line = result.stdout.strip().splitlines()
    assert header.split() == ["study", "completed", "failed", "interrupted", "running",
                              "best_loss"]
    completed = sum(t.state == TrialState.COMPLETE for t in study.trials)
    failed = sum(t.state == TrialState.FAIL for t in study.trials)
    assert line.split() == ["seir-faults", str(completed), str(failed), "0", "0",
                            f"{study.best_value:.6g}"]


def test_results_mark_the_best_and_sort_by_loss(studies: dict) -> None:
    config, data = studies["mixed"]
    study = load(data)
    result = simcal("results", "--config", str(config), "--sort", "loss")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    columns = list(rows[0])
    assert columns.index("param_gamma") < columns.index("param_beta")  # config order
    assert int(rows[0]["number"]) == study.best_trial.number and rows[0]["best"] == "True"
    assert sum(row["best"] == "True" for row in rows) == 1
    losses = [float(row["loss"]) for row in rows if row["state"] == "COMPLETE"]
    assert losses == sorted(losses)
    states = [row["state"] for row in rows]
    assert states == sorted(states, key=lambda s: s != "COMPLETE")  # failures last


# -- as a person would look: the page in headless Chromium ------------------------------------

IMAGES = """Array.from(document.images).map(img => ({
    alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight}))"""

# The fit figure as the browser decoded it: the variance of its grey levels (0 if blank).
FIT_VARIANCE = """(() => {
    const img = Array.from(document.images).find(i => i.alt.startsWith('Fit:'));
    if (!img) return null;
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const context = canvas.getContext('2d');
    context.drawImage(img, 0, 0);
    const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let sum = 0, squares = 0, n = 0;
    for (let i = 0; i < data.length; i += 4) {
        const grey = (data[i] + data[i + 1] + data[i + 2]) / 3;
        sum += grey; squares += grey * grey; n += 1;
    }
    const mean = sum / n;
    return squares / n - mean * mean;
})()"""


@pytest.mark.parametrize("which", ["mixed", "failed"])
def test_report_in_headless_chromium(studies: dict, tmp_path: Path, which: str) -> None:
    """Open report.html in Chromium: every image loaded, no console error, the fit figure
    not blank; the study whose trials all failed says so. Screenshots stay in tmp_path."""
    from browser import chromium

    config, _ = studies[which]
    out = tmp_path / "report"
    assert simcal("report", "--config", str(config), "--out", str(out)).returncode == 0
    with chromium() as page:
        page.open((out / "report.html").as_uri())
        images = page.evaluate(IMAGES)
        text = page.evaluate("document.body.innerText")
        variance = page.evaluate(FIT_VARIANCE)
        page.screenshot(tmp_path / f"report-{which}.png")
        errors = list(page.errors)
    assert errors == []
    assert images and all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in images)
    if which == "mixed":
        assert [i["alt"] for i in images] == [
            "Fit: incidence", "Loss by trial", "Parameters", "Throughput"]
        assert variance is not None and variance > 100, variance
        assert "Best loss" in text and "failed (nan_loss:" in text
    else:
        assert variance is None and [i["alt"] for i in images] == ["Loss by trial",
                                                                  "Throughput"]
        assert "All 6 finished trials failed" in text
    assert (tmp_path / f"report-{which}.png").stat().st_size > 10_000


def test_best_parameters_at_a_search_bound_are_flagged() -> None:
    from simcal.config import demo_config
    from simcal.reporting.page import at_bounds

    config = demo_config()  # beta in [0.1, 1.0], gamma in [0.05, 0.5]
    assert at_bounds(config, {"beta": 0.995, "gamma": 0.2}) == ["beta is at its upper bound"]
    assert at_bounds(config, {"beta": 0.5, "gamma": 0.055}) == ["gamma is at its lower bound"]
    assert at_bounds(config, {"beta": 0.5, "gamma": 0.2}) == []


def test_result_rows_follow_the_config_order() -> None:
    from optuna.distributions import FloatDistribution

    from simcal.summary import trial_rows

    config = validate_config({
        **SEIR, "model": "simcal.models.seir:simulate", "storage": "sqlite:///unused.db",
        "targets": [{"name": "zeta", "observed": "simcal.models.seir:observed"},
                    {"name": "alpha", "observed": "simcal.models.seir:observed"}],
    })
    distributions = {"beta": FloatDistribution(0.1, 1.0), "gamma": FloatDistribution(0.05, 0.5)}
    trials = [
        optuna.trial.create_trial(
            params={"beta": 0.5, "gamma": 0.2}, distributions=distributions, value=loss,
            user_attrs={"loss_alpha": loss / 2, "loss_zeta": loss / 2},
        )
        for loss in (3.0, 1.0, 2.0)
    ]
    for number, trial in enumerate(trials):
        trial.number = number
    rows = trial_rows(trials, config, sort="loss")
    assert [row["number"] for row in rows] == [1, 2, 0]
    assert [row["best"] for row in rows] == [True, False, False]
    columns = [c for c in rows[0] if c.startswith(("param_", "loss_"))]
    assert columns == ["param_gamma", "param_beta", "loss_zeta", "loss_alpha"]
