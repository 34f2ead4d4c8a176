"""A model's code on the workers: local code shipped to them, installed imports preloaded.

A model (or loss) module that the driver imports from a plain folder, not from an installed
distribution, is uploaded with Dask's ``UploadFile`` worker plugin: a single module as its
``.py`` file, a package as a ``.zip`` that the workers put on ``sys.path``. Registered
plugins also run on workers that join later.
Installed distributions are never shipped: they belong in the image. The installed modules a
model imports are named (:func:`source_imports` before it is imported, :func:`installed_imports`
after) so a local cluster's worker server imports them once (:mod:`simcal.workerstart`).
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import site
import sys
import sysconfig
import tempfile
import types
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simcal.imports import source_file

if TYPE_CHECKING:  # distributed is imported where shipping happens: `simcal run` names the
    from distributed import Client  # model's imports (source_imports) before importing it

log = logging.getLogger(__name__)

SKIPPED_PARTS = {"__pycache__", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def top_module(reference: str) -> str:
    """The top-level module of a ``module:callable`` reference (``pkg`` for ``pkg.sub:f``)."""
    return reference.partition(":")[0].split(".")[0]


@functools.cache
def _distribution_modules() -> frozenset[str]:
    """Top-level modules of installed distributions (editable ones too); read once, about
    0.15 s (it lists every distribution's files)."""
    return frozenset(importlib.metadata.packages_distributions())


def _installed_roots() -> list[Path]:
    roots = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    roots.add(site.getusersitepackages())
    return [Path(root).resolve() for root in roots if root]


def _under_installed_roots(paths: list[Path]) -> bool:
    """Every one of ``paths`` (resolved) lies under the standard library or a site-packages
    folder; False for none."""
    roots = _installed_roots()
    return bool(paths) and all(any(p.is_relative_to(root) for root in roots) for p in paths)


def local_code(module: str) -> Path | None:
    """The ``.py`` file or package folder of ``module`` when it is local code, else None.

    Local: found here, not part of an installed distribution, not under the standard library
    or a site-packages folder. Found, not imported: the driver need not run a model's module
    (the workers import it, and the probe names any that cannot).
    """
    try:
        spec = importlib.util.find_spec(module)
    except Exception:  # a parent package that does not import, a relative name
        return None
    file = spec.origin if spec is not None and spec.has_location else None
    if not file:
        return None  # not found, built in, or a namespace package
    path = Path(file).resolve()
    if _under_installed_roots([path]):
        return None
    # outside site-packages: an editable install, or local code. Cheapest question first:
    # listing every distribution's files took 2.5 s of the probe while 8 workers started
    if _named_distribution(module) or module in _distribution_modules():
        return None
    return path.parent if path.name == "__init__.py" else path


def installed_imports(model: Any) -> list[str]:
    """The installed modules a model needs, for a local cluster's worker server to import once
    (:mod:`simcal.workerstart`): for a ``module:callable`` reference or a function of a module,
    :func:`source_imports` of that module; for a function defined in a notebook or script
    (``__main__``), the installed packages of the global names its code uses (nested
    functions' too). Standard library and local code (which :func:`ship` uploads) are left out.
    """
    if isinstance(model, str):
        return source_imports(model)
    module = getattr(model, "__module__", None)
    if module and module != "__main__" and getattr(sys.modules.get(module), "__file__", None):
        return source_imports(f"{module}:{getattr(model, '__qualname__', 'model')}")
    function = model if hasattr(model, "__code__") else vars(type(model)).get("__call__")
    code = getattr(function, "__code__", None)  # a function, or a callable object's __call__
    namespace = getattr(function, "__globals__", {})
    names: set[str] = set()
    codes = [code] if isinstance(code, types.CodeType) else []
    while codes:
        current = codes.pop()
        names.update(current.co_names)
        codes.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    referred = []
    for name in sorted(names & namespace.keys()):
        value = namespace[name]
        if isinstance(value, types.ModuleType):
            referred.append(value.__name__)
        elif isinstance(getattr(value, "__module__", None), str):
            referred.append(value.__module__)
    tops = dict.fromkeys(name.split(".")[0] for name in referred if name)
    return [m for m in tops if _is_installed(m)]


def _is_installed(module: str, path: list[str] | None = None) -> bool:
    """``module``'s top-level package is found (not imported) under an installed root, and is
    not the standard library: a module a worker can import from its own environment."""
    top = module.split(".")[0]
    if not top or top in sys.stdlib_module_names or top == "__main__":
        return False
    spec = importlib.machinery.PathFinder.find_spec(top, path)
    origin = spec.origin if spec is not None else None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    files = [Path(f).resolve() for f in ([origin] if origin else []) + locations]
    return _under_installed_roots(files) or _named_distribution(top)  # or an editable one


def _named_distribution(top: str) -> bool:
    """An installed distribution is named as the top-level module (found without listing
    every distribution's files, as :func:`_distribution_modules` does)."""
    try:
        importlib.metadata.distribution(top)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return True


def _module_level(tree: ast.Module) -> Iterator[ast.AST]:
    """Every node that runs when the module is imported: not function or class bodies."""
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop(0)
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            pending.extend(ast.iter_child_nodes(node))


def source_imports(reference: str, folder: Path | None = None) -> list[str]:
    """Before the model is imported: its module when installed, and the installed modules its
    source imports when it is imported (module-level statements, read with :mod:`ast`; not
    imports inside functions); ``folder``: where a config's local modules live.
    What :func:`simcal.workerstart.prestart_workers` imports while the driver reads the config."""
    name = reference.partition(":")[0]
    path = ([str(folder)] if folder is not None else []) + sys.path
    try:
        file = source_file(name, path)
        tree = ast.parse(file.read_bytes()) if file is not None else None
    except (OSError, SyntaxError, ValueError, ImportError):
        tree = None
    found = [name]
    for node in _module_level(tree) if tree is not None else ():
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append(node.module)
    return [m for m in dict.fromkeys(found) if _is_installed(m)]


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
    from distributed.diagnostics.plugin import UploadFile

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
