"""The driver reaches stored trials through one door, :class:`simcal.trials.TrialStore`: an AST
check of simcal/driver.py's imports, so that a storage call below the door cannot creep back."""

from __future__ import annotations

import ast
from pathlib import Path

import simcal.driver

# what the driver may take from simcal.trials: the door, and the names of what it stores
ALLOWED_FROM_TRIALS = {
    "TrialStore",
    "Told",
    "Tally",
    "DURATION",
    "ERROR",
    "FAIL_REASON",
    "INTERRUPTED",
    "RETRY_OF",
    "SURPLUS",
}


def driver_imports(source: str) -> list[tuple[str, str | None]]:
    """Every (module, name) the source imports; name None for ``import module``."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, alias.name) for alias in node.names]
    return found


def below_the_door(imports: list[tuple[str, str | None]]) -> list[str]:
    """The imports that reach below :class:`TrialStore`: optuna_internals, simcal.storage,
    simcal.trials as a module, or any of its names but the door's."""
    wrong = []
    for module, name in imports:
        if module == "simcal" and name in {"optuna_internals", "trials", "storage"}:
            wrong.append(f"from simcal import {name}")
            continue
        below = module.startswith(("simcal.optuna_internals", "simcal.storage"))
        if below or (module == "simcal.trials" and name not in ALLOWED_FROM_TRIALS):
            wrong.append(f"{module}.{name}" if name else module)
    return wrong


def test_the_driver_imports_nothing_below_the_trial_store() -> None:
    source = Path(simcal.driver.__file__).read_text()
    imports = driver_imports(source)
    assert ("simcal.trials", "TrialStore") in imports
    assert below_the_door(imports) == []


def test_the_check_catches_a_storage_call_below_the_door() -> None:
    """The check itself can fail: each way back below the door is caught."""
    for line in (
        "from simcal.trials import tally, TrialStore",
        "from simcal.optuna_internals import fast_path",
        "from simcal.optuna_internals.storage import ask",
        "import simcal.trials",
        "from simcal import optuna_internals",
        "from simcal.storage import open_study",
    ):
        assert below_the_door(driver_imports(line)), line
