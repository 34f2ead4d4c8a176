"""Resolve ``module:attribute`` references to Python objects."""

from __future__ import annotations

import importlib
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
