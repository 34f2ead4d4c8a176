"""Resolve ``module:attribute`` references to Python objects."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import sys
from pathlib import Path
from typing import Any


class UnresolvableReferenceError(ValueError):
    """A ``module:attribute`` reference that is malformed or does not import."""


def resolve(reference: str) -> Any:
    """Import ``module:attribute`` (dots allowed in the attribute) and return the object."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise UnresolvableReferenceError(f"{reference!r} is not of the form 'module:callable'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnresolvableReferenceError(f"cannot import module {module_name!r}: {exc}") from exc
    except Exception as exc:  # relative names ('.x'), errors raised by the module's own code
        raise UnresolvableReferenceError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UnresolvableReferenceError(
                f"module {module_name!r} has no attribute {attribute!r}"
            ) from None
    return obj


def resolve_callable(reference: str) -> Any:
    """Like :func:`resolve`, but the object must be callable."""
    obj = resolve(reference)
    if not callable(obj):
        raise UnresolvableReferenceError(f"{reference!r} is not callable")
    return obj


def check_callable(reference: str) -> None:
    """Raise what :func:`resolve_callable` raises for ``reference``, importing its module only
    when its source cannot settle it: a module found on the path whose source defines the
    name at module level (``def`` or ``class``) is callable without running it. A driver need
    not import a model to check a config (Starsim: 1.2 s of its start, on a core the workers
    want); the workers import it, and the probe names any that cannot."""
    module_name, sep, attribute = reference.partition(":")
    unread = sep and module_name and module_name not in sys.modules
    if not (unread and attribute.isidentifier() and attribute in _defined_names(module_name)):
        resolve_callable(reference)


def _defined_names(module_name: str) -> set[str]:
    """Names a module's source defines with a module-level ``def`` or ``class``; empty when
    it is not found on ``sys.path`` as a ``.py`` file or does not parse."""
    try:
        file = source_file(module_name, sys.path)
        tree = ast.parse(file.read_bytes()) if file is not None else None
    except (OSError, SyntaxError, ValueError, ImportError):
        return set()
    if tree is None:
        return set()
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return {node.name for node in tree.body if isinstance(node, kinds)}


def source_file(module: str, path: list[str]) -> Path | None:
    """The source file of ``module`` (dotted) on ``path``, found without importing anything
    (not even its parent packages, whose ``__init__`` may import what a model needs)."""
    locations: list[str] | None = path
    spec = None
    for part in module.split("."):
        spec = importlib.machinery.PathFinder.find_spec(part, locations)
        if spec is None:
            return None
        locations = list(spec.submodule_search_locations or [])
    origin = spec.origin if spec is not None else None
    return Path(origin) if origin and origin.endswith(".py") else None
