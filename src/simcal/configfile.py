"""A config file's YAML before validation: the loader ``load_config`` reads it with, and a peek.

Only the standard library and PyYAML, so that ``simcal run`` can read which model a config
names (:func:`peek_model`) before it loads pydantic and the rest (:mod:`simcal.launch`).
"""

from __future__ import annotations

from pathlib import Path

import yaml

# The built-in SEIR demo's model: what `simcal run` without --config calibrates.
DEMO_MODEL = "simcal.models.seir:simulate"


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reports an integer too long to convert as a YAML error."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more digits than sys.get_int_max_str_digits()
            raise yaml.constructor.ConstructorError(
                None, None, f"integer of {len(node.value)} characters is too long", node.start_mark
            ) from None


Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)


def peek_model(path: str | Path) -> str | None:
    """The ``model:`` reference a config file names, read without validating anything (None
    when it names none or cannot be read: ``load_config`` then says what is wrong)."""
    try:
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=Loader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError, ValueError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None
