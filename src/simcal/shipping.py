"""Shipping a user's local model code to Dask workers that cannot import it.

A model (or loss) module that the driver imports from a plain folder, not from an installed
distribution, is uploaded with Dask's ``UploadFile`` worker plugin: a single module as its
``.py`` file, a package as a ``.zip`` that the workers put on ``sys.path``. Registered
plugins also run on workers that join later.
Installed distributions are never shipped: they belong in the image.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import site
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from distributed import Client
from distributed.diagnostics.plugin import UploadFile

log = logging.getLogger(__name__)

SKIPPED_PARTS = {"__pycache__", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def top_module(reference: str) -> str:
    """The top-level module of a ``module:callable`` reference (``pkg`` for ``pkg.sub:f``)."""
    return reference.partition(":")[0].split(".")[0]


def _installed_roots() -> list[Path]:
    roots = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    roots.add(site.getusersitepackages())
    return [Path(root).resolve() for root in roots if root]


def local_code(module: str) -> Path | None:
    """The ``.py`` file or package folder of ``module`` when it is local code, else None.

    Local: importable here, not part of an installed distribution, not under the standard
    library or a site-packages folder.
    """
    if module in importlib.metadata.packages_distributions():
        return None
    try:
        imported = importlib.import_module(module)
    except Exception:  # not importable here: nothing to ship
        return None
    file = getattr(imported, "__file__", None)
    if not file:
        return None  # built in, or a namespace package
    path = Path(file).resolve()
    if any(path.is_relative_to(root) for root in _installed_roots()):
        return None
    return path.parent if path.name == "__init__.py" else path


def _zip_package(folder: Path, into: Path) -> Path:
    archive = into / f"{folder.name}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for file in sorted(folder.rglob("*")):
            relative = file.relative_to(folder.parent)
            if file.is_file() and not SKIPPED_PARTS & set(relative.parts):
                bundle.write(file, relative.as_posix())
    return archive


def ship(client: Client, modules: Iterable[str]) -> list[Path]:
    """Upload every module in ``modules`` that is local code; returns what was shipped.

    A package is imported as it is uploaded: this raises what the scheduler or a worker raised
    importing it (e.g. its own ``ImportError`` for a dependency they lack). A module is only
    placed; the probe's import then names each worker that cannot import it.
    """
    shipped = []
    for module in dict.fromkeys(modules):
        source = local_code(module)
        if source is None:
            continue
        # A worker plugin named by module: shipping again replaces it (late joiners get the
        # latest copy). Workers only: tasks carry references, the scheduler never imports it.
        name = f"simcal-ship-{module}"
        if source.is_dir():
            with tempfile.TemporaryDirectory(prefix="simcal-ship-") as folder:
                archive = _zip_package(source, Path(folder))
                # loading puts the .zip on sys.path (and imports the package)
                client.register_plugin(UploadFile(str(archive), load=True), name=name)
        else:  # into each worker's local directory, on its sys.path; imported on first use
            client.register_plugin(UploadFile(str(source), load=False), name=name)
        log.info(
            "shipped %s %s (%s) to every worker, and to workers that join later "
            "(Dask UploadFile worker plugin)",
            "package" if source.is_dir() else "module",
            module,
            source,
        )
        shipped.append(source)
    return shipped
