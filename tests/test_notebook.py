"""examples/notebook.ipynb, run top to bottom by a real Jupyter kernel (nbclient, ipykernel),
its outputs checked: the progress line, the result's HTML, the truth found, the fit figure."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "notebook.ipynb"


def _outputs(cell: dict, kind: str) -> list[str]:
    """Every output of ``cell`` in MIME type ``kind`` (text of streams under text/plain too)."""
    found = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream" and kind == "text/plain":
            found.append(output["text"])
        data = output.get("data", {})
        if kind in data:
            found.append(data[kind])
    return found


def _cell(notebook: dict, source_start: str) -> dict:
    return next(c for c in notebook.cells if c.source.startswith(source_start))


def test_the_example_notebook_runs_in_a_kernel_and_finds_the_truth(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel imports this checkout's simcal (PYTHONPATH, as the tests do)
    src = str(Path(__file__).resolve().parent.parent / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails

    run = _cell(notebook, "result = cal.run(")
    html = "".join(_outputs(run, "text/html"))
    assert "calibrated</b>" in html and "30/30" in html  # the progress line, drawn in place
    assert "simcal.Result" in html and "30 completed" in html

    best = _cell(notebook, "result.best_params")
    params, loss = ast.literal_eval(_outputs(best, "text/plain")[0])
    assert abs(params["beta"] - 0.3) / 0.3 < 0.25, params
    assert abs(params["gamma"] - 0.1) / 0.1 < 0.25, params
    assert loss > 0

    table = _cell(notebook, "result.trials")
    assert "param_beta" in "".join(_outputs(table, "text/html"))

    fit = _cell(notebook, "result.plot_fit(")
    assert _outputs(fit, "image/png"), fit.get("outputs")  # shown inline

    posterior = _cell(notebook, "result.posterior()")
    intervals = ast.literal_eval(_outputs(posterior, "text/plain")[0])
    low, high = intervals["beta"]["ci90"]
    assert low <= intervals["beta"]["median"] <= high
