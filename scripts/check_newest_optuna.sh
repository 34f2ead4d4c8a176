#!/usr/bin/env bash
# Does a plain `pip install .` take simcal's fast storage and sampler paths?
#
# Builds (or refreshes) a virtualenv outside the checkout with a PLAIN `pip install .` (no
# constraints file, every dependency at the newest release pyproject.toml admits, as a new
# user gets it), then runs a tiny calibration from it and fails unless its summary says
# fast_path storage and sampler are both true. It fails the day pyproject.toml admits an
# Optuna release that simcal.optuna_internals.VERIFIED_OPTUNA does not list.
#
# Usage: scripts/check_newest_optuna.sh [VENV]   (default /var/tmp/simcal-newest-optuna)
set -euo pipefail
unset PYTHONPATH  # the installed package, never a checkout on the path

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-${SIMCAL_NEWEST_OPTUNA_VENV:-/var/tmp/simcal-newest-optuna}}"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
# --upgrade-strategy eager: a warm venv moves to the newest admitted releases too
"$venv/bin/pip" install -q --disable-pip-version-check --upgrade --upgrade-strategy eager "$root"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"  # never import simcal from the checkout
"$venv/bin/python" - <<'PY'
import simcal, optuna
from simcal.optuna_internals import VERIFIED_OPTUNA, cached_tpe_verified, storage_verified
print(f"simcal from {simcal.__file__}; Optuna {optuna.__version__}; verified {VERIFIED_OPTUNA}")
assert "site-packages" in simcal.__file__, "simcal is not the installed package"
if not (storage_verified() and cached_tpe_verified()):
    raise SystemExit(
        f"check-newest-optuna: Optuna {optuna.__version__}, which pyproject.toml admits, takes "
        f"the slow public path (verified: {', '.join(VERIFIED_OPTUNA)}): verify it and widen "
        "VERIFIED_OPTUNA, or bound optuna in pyproject.toml"
    )
PY
# the synthetic model without injected faults (the path taken is the point, not failures)
cat > "$work/check.yaml" <<'YAML'
study: check-newest-optuna
model: simcal.models.synthetic:simulate
model_options: {duration: 0.05}
parameters:
  x: {low: 0.0, high: 1.0}
  y: {low: 0.0, high: 1.0}
replicates: 2
seed: 1
targets:
  - {name: signal, observed: "simcal.models.synthetic:observed", loss: mse}
sampler: tpe
max_trials: 12
YAML
"$venv/bin/simcal" run --config "$work/check.yaml" --storage "sqlite:///$work/check.db" \
    --workers 2 --metrics-port 0 --summary "$work/summary.json" >/dev/null
"$venv/bin/python" - "$work/summary.json" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
paths = summary["fast_path"]
print(f"check-newest-optuna: {summary['n_trials']} trials; fast_path {json.dumps(paths)}")
if not (paths["storage"] and paths["sampler"]):
    raise SystemExit("check-newest-optuna: the run took a slower path")
PY
