"""The Prometheus rules file: promtool check/test, coverage of every alert, runbook links."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from monitoring import DESIGN_ALERTS, promtool

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "helm" / "simcal" / "files" / "prometheus-rules.yaml"
RULE_TESTS_DIR = ROOT / "tests" / "rules"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/simcal/simcal/blob/main/docs/runbook.md#"

REQUIRED_RECORDS = {"simcal:trials_per_minute:rate5m", "simcal:trial_error_ratio:rate10m"}
EXPECTED_FOR = {
    "SimcalThroughputRegression": "10m",
    "SimcalLowWorkerUtilization": "15m",
    "SimcalWorkersBelowMinimum": "5m",
    "SimcalDriverSaturated": "10m",
}




def run_promtool(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def load_rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict]:
    return {rule["alert"]: rule for rule in load_rules() if "alert" in rule}


def rule_test_files() -> list[Path]:
    return sorted(RULE_TESTS_DIR.glob("*.yaml"))


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, - for spaces."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", RUNBOOK.read_text(), flags=re.MULTILINE)
    return {github_anchor(h) for h in headings}


def test_github_anchor():
    assert github_anchor("SimcalDriverDown") == "simcaldriverdown"
    assert github_anchor("Pointing Prometheus at a run") == "pointing-prometheus-at-a-run"


def test_promtool_check_rules():
    result = run_promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_unit_tests_pass():
    files = rule_test_files()
    assert files, f"no promtool test files in {RULE_TESTS_DIR}"
    result = run_promtool("test", "rules", *files)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("SUCCESS") == len(files), output


def test_unit_tests_load_the_real_rules_file():
    for path in rule_test_files():
        doc = yaml.safe_load(path.read_text())
        targets = {(path.parent / f).resolve() for f in doc.get("rule_files", [])}
        assert targets == {RULES.resolve()}, f"{path.name} must test {RULES}, not {targets}"


def test_alert_names_match_the_design():
    assert set(alerts()) == DESIGN_ALERTS


def test_required_recording_rules():
    records = {rule["record"]: rule["expr"] for rule in load_rules() if "record" in rule}
    assert set(records) >= REQUIRED_RECORDS
    rate = " ".join(records["simcal:trials_per_minute:rate5m"].split())
    assert 'rate(simcal_trials_total{status=~"completed|pruned"}[5m])' in rate
    assert rate.startswith("sum by (study)") and rate.endswith("* 60")
    ratio = records["simcal:trial_error_ratio:rate10m"]
    assert 'status="failed"' in ratio and "[10m]" in ratio


@pytest.mark.parametrize("name", sorted(DESIGN_ALERTS))
def test_alert_labels_and_annotations(name):
    rule = alerts()[name]
    assert rule.get("labels", {}).get("severity") in {"warning", "critical"}
    annotations = rule.get("annotations", {})
    for key in ("summary", "description", "runbook_url"):
        assert annotations.get(key, "").strip(), f"{name}: missing annotation {key}"
    assert "{{ $labels.study }}" in annotations["summary"] + annotations["description"]
    assert "{{ $value" in annotations["description"]
    assert annotations["runbook_url"] == RUNBOOK_URL + name.lower()
    if name in EXPECTED_FOR:
        assert rule.get("for") == EXPECTED_FOR[name]


def test_runbook_has_a_section_per_alert():
    anchors = runbook_anchors()
    urls = [alerts()[name]["annotations"]["runbook_url"] for name in sorted(DESIGN_ALERTS)]
    assert len(set(urls)) == len(urls), "one runbook anchor per alert"
    missing = [url for url in urls if url.removeprefix(RUNBOOK_URL) not in anchors]
    assert not missing, f"runbook anchors missing from {RUNBOOK}: {missing}"


def test_every_alert_has_firing_and_quiet_cases():
    firing: dict[str, int] = dict.fromkeys(DESIGN_ALERTS, 0)
    quiet: dict[str, int] = dict.fromkeys(DESIGN_ALERTS, 0)
    for path in rule_test_files():
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                name = case["alertname"]
                assert name in DESIGN_ALERTS, f"{path.name}: unknown alert {name}"
                if case.get("exp_alerts"):
                    firing[name] += 1
                else:
                    quiet[name] += 1
    assert all(firing.values()), f"alerts without a firing test case: {firing}"
    assert all(quiet.values()), f"alerts without a non-firing test case: {quiet}"


# Mutation tests: break one condition of the rules and check that the promtool scenario
# guarding it fails. They prove the unit tests constrain the edge cases, not just run.
MUTATIONS = [
    pytest.param(
        "(avg by (study) (simcal_driver_busy_ratio) > 0.9)",
        "(avg by (study) (simcal_driver_busy_ratio) > 0.99)",
        "driver_saturated.yaml",
        "two saturated drivers with idle workers fire after 10 minutes",
        id="saturated-threshold",
    ),
    pytest.param(
        "(avg by (study) (simcal_worker_utilization_ratio) < 0.7)",
        "(avg by (study) (simcal_worker_utilization_ratio) < 1.0)",
        "driver_saturated.yaml",
        "a busy driver that keeps the workers fed does not fire",
        id="saturated-utilization-guard",
    ),
    pytest.param(
        "0.7 * simcal:trials_per_minute:baseline3h",
        "0.4 * simcal:trials_per_minute:baseline3h",
        "throughput_regression.yaml",
        "50% drop after 2h fires within 30 minutes, only for the affected study",
        id="regression-threshold",
    ),
    pytest.param(
        "            and on (study)\n          (simcal:trials_per_minute:rate5m offset 75m)\n",
        "",
        "throughput_regression.yaml",
        "no alert in a study's first hour",
        id="regression-first-hour-guard",
    ),
    pytest.param(
        "0.7 * simcal:trials_per_minute:baseline3h\n          )\n"
        "            and on (study)\n          (sum by (study) (simcal_inflight_trials) > 0)",
        "0.7 * simcal:trials_per_minute:baseline3h\n          )",
        "throughput_regression.yaml",
        "a study finishing (in-flight drops to 0) does not fire",
        id="regression-inflight-guard",
    ),
    pytest.param(
        'simcal_trials_total{status=~"completed|pruned"}[5m]',
        'simcal_trials_total{status="completed"}[5m]',
        "throughput_regression.yaml",
        "pruned trials are not lost throughput",
        id="regression-counts-pruned",
    ),
    pytest.param(
        'rate(simcal_trials_total{status="failed"}[10m])',
        'rate(simcal_trials_total{status!="completed"}[10m])',
        "errors_progress.yaml",
        "pruned trials are not errors",
        id="error-ratio-ignores-pruned",
    ),
    pytest.param(
        "(simcal:trials_told:increase10m >= 20)",
        "(simcal:trials_told:increase10m >= 0)",
        "errors_progress.yaml",
        "2 failures out of 3 trials do not fire",
        id="error-rate-minimum-count",
    ),
    pytest.param(
        "(sum by (study) (simcal_inflight_trials offset 10m))",
        "(sum by (study) (simcal_inflight_trials))",
        "errors_progress.yaml",
        "a study stuck from the start fires after 15 minutes",
        id="no-progress-startup-guard",
    ),
    pytest.param(
        "(last_over_time(simcal:inflight_trials:sum[6h]) > 0)",
        "(last_over_time(simcal:inflight_trials:sum[6h]) >= 0)",
        "driver_down.yaml",
        "driver finishing and exiting does not fire",
        id="driver-down-clean-exit",
    ),
]


@pytest.mark.parametrize(("old", "new", "test_file", "scenario"), MUTATIONS)
def test_unit_tests_catch_a_broken_rule(tmp_path, old, new, test_file, scenario):
    rules = RULES.read_text()
    assert rules.count(old) == 1, f"mutation target not found once in {RULES.name}: {old!r}"
    doc = yaml.safe_load((RULE_TESTS_DIR / test_file).read_text())
    doc["tests"] = [group for group in doc["tests"] if group["name"] == scenario]
    assert len(doc["tests"]) == 1, f"scenario {scenario!r} not in {test_file}"
    for variant, text in (("intact", rules), ("broken", rules.replace(old, new))):
        (tmp_path / f"{variant}-rules.yaml").write_text(text)
        doc["rule_files"] = [f"{variant}-rules.yaml"]
        (tmp_path / f"{variant}-test.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        assert run_promtool("check", "rules", f"{variant}-rules.yaml", cwd=tmp_path).returncode == 0

    intact = run_promtool("test", "rules", "intact-test.yaml", cwd=tmp_path)
    assert intact.returncode == 0, intact.stdout + intact.stderr
    broken = run_promtool("test", "rules", "broken-test.yaml", cwd=tmp_path)
    assert broken.returncode != 0, f"{scenario!r} still passes with the rule broken"
    assert "FAILED" in broken.stdout + broken.stderr
