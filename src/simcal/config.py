"""The calibration config: one validated object from YAML; errors name the field."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from simcal.configfile import DEMO_MODEL, Loader
from simcal.imports import UnresolvableReferenceError, check_callable, resolve_callable

BUILTIN_LOSSES = (
    "mse",
    "poisson_nll",
    "binomial_nll",
    "beta_binomial_nll",
    "negative_binomial_nll",
    "normal_nll",
)
LIKELIHOODS = BUILTIN_LOSSES[1:]  # negative log-likelihoods: summable, marginalisable
COUNT_LIKELIHOODS = BUILTIN_LOSSES[1:5]  # need non-negative integer observed counts
NEEDS_DISPERSION = ("beta_binomial_nll", "negative_binomial_nll")
BINOMIAL_LOSSES = ("binomial_nll", "beta_binomial_nll")  # observed: x of n (an ``n`` column)


class ConfigError(ValueError):
    """The config is invalid; the message names each bad field and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_callable(reference: str) -> str:
    try:
        check_callable(reference)
    except UnresolvableReferenceError as exc:
        raise ValueError(str(exc)) from None
    return reference


def callable_reference(function: Callable[..., Any]) -> str | None:
    """``module:qualname`` of a function importable by that name, else None (a function of
    ``__main__``, a notebook's, a lambda, a nested function or a callable object)."""
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    reference = f"{module}:{qualname}"
    try:
        return reference if resolve_callable(reference) is function else None
    except UnresolvableReferenceError:
        return None


def callable_label(function: Callable[..., Any] | str) -> str:
    """How messages and reports name a model: its reference, or ``module:qualname``."""
    if isinstance(function, str):
        return function
    module = getattr(function, "__module__", None) or "?"
    return f"{module}:{getattr(function, '__qualname__', type(function).__name__)}"


# Observed data given inline (a mapping of columns, a pandas DataFrame, an array): kept as
# columns of numbers (``date``: ISO strings), the CSV format's columns (simcal.targets).
InlineColumns = dict[str, list[float] | list[str]]


def _column(name: str, values: Any) -> list[float] | list[str]:
    """One inline column as a list: numbers when every value is one, else text (ISO dates
    for dates); simcal.targets checks them as it checks a CSV file's cells."""
    if hasattr(values, "tolist"):  # numpy arrays, pandas Series
        if hasattr(values, "dt"):  # pandas datetimes
            values = values.dt.strftime("%Y-%m-%d")
        values = values.tolist()
    if isinstance(values, str | bytes | Mapping) or not hasattr(values, "__iter__"):
        raise ValueError(f"column {name!r} is not a sequence of values")
    out = list(values)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in out):
        return [float(v) for v in out]
    return [v.isoformat()[:10] if isinstance(v, date) else str(v) for v in out]


def inline_columns(value: Any, name: str) -> InlineColumns:
    """Observed data given as a DataFrame, a mapping of columns or a 1-D array: its columns."""
    if type(value).__module__.startswith("pandas") and hasattr(value, "columns"):
        columns = {str(c): value[c] for c in value.columns}
    elif isinstance(value, Mapping):
        columns = {str(k): v for k, v in value.items()}
    elif hasattr(value, "__iter__") and not isinstance(value, str | bytes):
        columns = {name: value}  # an array or list: the values alone
    else:
        raise ValueError(
            "must be a CSV path, 'module:callable', a pandas DataFrame, a mapping of "
            f"columns or an array, not {type(value).__name__}"
        )
    if not columns:
        raise ValueError("no columns")
    result = {key: _column(key, column) for key, column in columns.items()}
    lengths = {len(column) for column in result.values()}
    if len(lengths) != 1:
        raise ValueError(f"columns differ in length: { {k: len(v) for k, v in result.items()} }")
    return result


class ParameterSpec(_Strict):
    """The search range of one model parameter."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _range_is_valid(self) -> ParameterSpec:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite numbers")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be less than high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got low={self.low}")
        return self


class ParameterRef(_Strict):
    """A loss parameter calibrated as a search parameter (``{parameter: k}``)."""

    parameter: str = Field(min_length=1)


class TargetSpec(_Strict):
    """Observed data for one model output and the loss comparing them."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    # a CSV path, a ``module:callable``, or inline columns (from a DataFrame, mapping, array)
    observed: str | InlineColumns
    loss: str = "mse"
    output: str | None = None
    weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    align: Literal["exact", "nearest", "asof"] = "exact"
    combine: Literal["mean", "per_replicate", "marginal"] = "mean"
    dispersion: float | ParameterRef | None = None
    sd: float | ParameterRef | None = None
    start_date: str | None = None
    # binomial_nll, beta_binomial_nll: the model gives a probability (default) or a count of n
    simulated: Literal["probability", "count"] | None = None
    n_output: str | None = Field(default=None, min_length=1)  # the model output holding its n

    @model_validator(mode="after")
    def _loss_options_fit(self) -> TargetSpec:
        if self.simulated is not None and self.loss not in BINOMIAL_LOSSES:
            raise ValueError(
                f"simulated: {self.simulated} applies to {BINOMIAL_LOSSES} only, not to "
                f"{self.loss!r} (whose model output is compared as it is)"
            )
        if self.n_output is not None and self.simulated != "count":
            raise ValueError(
                "n_output names the model output holding n for simulated: count; "
                "set simulated: count, or drop n_output"
            )
        for name in ("dispersion", "sd"):
            value = getattr(self, name)
            if isinstance(value, float) and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.loss in NEEDS_DISPERSION and self.dispersion is None:
            raise ValueError(
                f"{self.loss} needs a dispersion: a number, or {{parameter: NAME}} to calibrate it"
            )
        if self.loss == "normal_nll" and self.sd is None:
            raise ValueError("normal_nll needs sd: a number, or {parameter: NAME} to calibrate it")
        if self.combine == "marginal" and self.loss not in LIKELIHOODS:
            raise ValueError(
                f"combine: marginal needs a likelihood loss {LIKELIHOODS}, not {self.loss!r}"
            )
        if self.start_date is not None:
            try:
                date.fromisoformat(self.start_date)
            except ValueError:
                raise ValueError(
                    f"start_date {self.start_date!r} is not an ISO date (YYYY-MM-DD)"
                ) from None
        return self

    @property
    def loss_parameters(self) -> list[str]:
        """Search parameters this target's loss uses (not passed to the model)."""
        refs = (self.dispersion, self.sd)
        return [ref.parameter for ref in refs if isinstance(ref, ParameterRef)]

    @field_validator("observed", mode="before")
    @classmethod
    def _observed_exists(cls, value: Any, info: ValidationInfo) -> str | InlineColumns:
        if not isinstance(value, str):
            return inline_columns(value, info.data.get("name", "value"))
        if not value:
            raise ValueError("must not be empty")
        if value.lower().endswith(".csv"):
            # relative to the config file's folder (``base_dir``), not the current directory
            base = (info.context or {}).get("base_dir")
            path = Path(value) if base is None else Path(base) / value
            if not path.is_file():
                raise ValueError(f"CSV file {str(path)!r} does not exist")
            return str(path)
        return _check_callable(value)

    @field_validator("loss")
    @classmethod
    def _loss_is_known(cls, value: str) -> str:
        if value in BUILTIN_LOSSES:
            return value
        if ":" not in value:
            raise ValueError(
                f"unknown loss {value!r}: use one of {BUILTIN_LOSSES} or 'module:callable'"
            )
        return _check_callable(value)

    @property
    def observed_file(self) -> Path | None:
        """The CSV file of the observed data (None: a callable or inline columns)."""
        csv = isinstance(self.observed, str) and self.observed.lower().endswith(".csv")
        return Path(self.observed) if csv else None

    @property
    def observed_reference(self) -> str | None:
        """The ``module:callable`` returning the observed data (None: a file or inline)."""
        if isinstance(self.observed, str) and self.observed_file is None:
            return self.observed
        return None

    @property
    def observed_label(self) -> str:
        """How messages name the observed data: the file, the reference, or ``inline data``."""
        if isinstance(self.observed, str):
            return self.observed
        return f"target {self.name!r} inline data"

    @property
    def output_key(self) -> str:
        """The key of the model's output dict this target compares against."""
        return self.output or self.name


SUPPORTED_BACKENDS = ("sqlite", "postgresql")  # the storages simcal tests and supports


def check_storage_backend(url: str) -> str:
    """``url`` if it names a supported database backend. A URL that does not parse is left
    to :func:`simcal.storage.open_study`, which says why."""
    from sqlalchemy.engine import make_url

    try:
        backend = make_url(url).get_backend_name()
    except Exception:
        return url
    if backend == "postgres":  # libpq's spelling: simcal.storage connects it as postgresql
        return url
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"storage backend {backend!r} is not supported: use sqlite:///PATH or "
            "postgresql://USER:PASSWORD@HOST/DB"
        )
    return url


def resolve_sqlite_path(url: str, base: Path) -> str:
    """``url`` with a relative SQLite file path made absolute against ``base``: a config's
    ``storage`` against the config's folder, a command line's against the current directory.
    Other URLs (absolute paths, in-memory, PostgreSQL, unparseable ones) are left as they are."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return url  # simcal.storage.open_study says what is wrong with it
    database = parsed.database
    if not parsed.drivername.startswith("sqlite") or database in (None, "", ":memory:"):
        return url
    if database.startswith("file:") or Path(database).is_absolute():
        return url
    return parsed.set(database=str(Path(base, database).resolve())).render_as_string(
        hide_password=False
    )


class PruningSpec(_Strict):
    """Replicate-aware pruning: judge a trial on its first replicates before running the rest."""

    min_replicates: int = Field(ge=1)
    pruner: Literal["successive_halving", "median"] = "successive_halving"
    startup_trials: int = Field(default=10, ge=0, le=100_000)


class CalibrationConfig(_Strict):
    """Everything one calibration job needs, validated."""

    study: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    # "module:callable"; a function given in Python is kept as its reference when it is
    # importable by it, else as the function (sent to workers by value: cloudpickle)
    model: str | Callable[..., Any]
    model_options: dict[str, Any] = Field(default_factory=dict)
    parameters: dict[str, ParameterSpec] = Field(min_length=1)
    replicates: int = Field(default=8, ge=1, le=10_000)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    targets: list[TargetSpec] = Field(min_length=1)
    sampler: Literal["tpe", "random", "cmaes"] = "tpe"
    mode: Literal["streaming", "batch"] = "streaming"
    max_trials: int = Field(default=200, ge=1, le=10_000_000)
    max_in_flight: int | Literal["auto"] = "auto"
    trial_timeout: float = Field(default=600.0, gt=0, le=7 * 24 * 3600)
    max_time: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    target_loss: float | None = Field(default=None, allow_inf_nan=False)
    storage: str = Field(default="sqlite:///simcal.db", min_length=1)
    min_workers: int | None = Field(default=None, ge=1, le=100_000)
    grace_period: float = Field(default=30.0, ge=0, le=24 * 3600)
    # that many consecutive trials failing with the same error stop the run (simcal.failfast)
    stop_after_failures: int = Field(default=10, ge=0, le=10_000_000)
    pruning: PruningSpec | None = None
    # Several drivers on one study: each renews a lease every lease_interval seconds; another
    # driver re-enqueues the RUNNING trials of a lease older than lease_grace (simcal.trials).
    lease_interval: float = Field(default=5.0, gt=0, le=3600)
    lease_grace: float = Field(default=30.0, gt=0, le=24 * 3600)

    @field_validator("model", mode="before")
    @classmethod
    def _model_imports(cls, value: Any) -> str | Callable[..., Any]:
        if isinstance(value, str):
            return _check_callable(value)
        if callable(value):
            return callable_reference(value) or value
        raise ValueError(f"must be 'module:callable' or a callable, not {type(value).__name__}")

    @field_serializer("model")
    def _model_text(self, value: str | Callable[..., Any]) -> str:
        return callable_label(value)

    @property
    def model_label(self) -> str:
        """The model's name in messages and reports (``module:qualname`` of a function)."""
        return callable_label(self.model)

    @field_validator("storage")
    @classmethod
    def _supported_backend(cls, value: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("base_dir")  # a config file's: its folder
        return check_storage_backend(value if base is None else resolve_sqlite_path(value, base))

    @field_validator("max_in_flight")
    @classmethod
    def _positive_in_flight(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be 'auto' or an integer >= 1")
        return value

    @model_validator(mode="after")
    def _lease_grace_spans_renewals(self) -> CalibrationConfig:
        if self.lease_grace < 2 * self.lease_interval:
            raise ValueError("lease_grace: must be at least twice lease_interval")
        return self

    @model_validator(mode="after")
    def _unique_target_names(self) -> CalibrationConfig:
        names = [t.name for t in self.targets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"targets: duplicate names {duplicates}")
        return self

    @model_validator(mode="after")
    def _science_fits(self) -> CalibrationConfig:
        for index, target in enumerate(self.targets):
            for name in target.loss_parameters:
                if name not in self.parameters:
                    raise ValueError(
                        f"targets.{index}: parameter {name!r} is not among the search "
                        f"parameters {sorted(self.parameters)}"
                    )
        if self.pruning is not None:
            if self.pruning.min_replicates >= self.replicates:
                raise ValueError(
                    f"pruning.min_replicates ({self.pruning.min_replicates}) must be less than "
                    f"replicates ({self.replicates})"
                )
            if self.mode != "streaming":
                raise ValueError("pruning needs mode: streaming")
        return self


def _field(part: object) -> str:
    text = str(part)  # quoted when a key is empty, padded or has control characters
    return text if text and text.isprintable() and text.strip() == text else repr(text)


def describe_validation(error: ValidationError, what: str = "config") -> str:
    lines = []
    for item in error.errors():
        location = ".".join(_field(part) for part in item["loc"]) or "<config>"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {location}: {message}")
    return f"invalid {what}:\n" + "\n".join(lines)


def validate_config(
    data: Any, overrides: Mapping[str, Any] | None = None, *, base_dir: Path | None = None
) -> CalibrationConfig:
    """Validate a mapping (from YAML or code), with ``overrides`` taking precedence.

    Relative data paths resolve against ``base_dir`` (a config file's folder) when given.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"invalid config: expected a mapping at the top level, got {type(data).__name__}"
        )
    merged = {**data, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    try:
        context = {"base_dir": base_dir} if base_dir is not None else None
        return CalibrationConfig.model_validate(merged, context=context)
    except ValidationError as exc:
        raise ConfigError(describe_validation(exc)) from None


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> CalibrationConfig:
    """Read and validate a YAML config file.

    The file's folder is appended to ``sys.path`` (``model:``, ``observed:`` and ``loss:``
    may name modules beside the config) and relative CSV paths resolve against it.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {str(path)!r} is not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=Loader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        for mark in (getattr(exc, "context_mark", None), getattr(exc, "problem_mark", None)):
            if mark is not None:  # the file, not "<unicode string>"; the snippet stays
                mark.name = str(path)
        raise ConfigError(f"config {str(path)!r} is not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config {str(path)!r} is nested too deeply") from None
    folder = path.resolve().parent
    if str(folder) not in sys.path:  # model:, observed:, loss: may name modules beside it
        sys.path.append(str(folder))
    try:
        return validate_config(data if data is not None else {}, overrides, base_dir=folder)
    except RecursionError:
        raise ConfigError(f"config {str(path)!r} is nested too deeply") from None


DEMO_CONFIG: dict[str, Any] = {
    "study": "seir-demo",
    "model": DEMO_MODEL,
    "parameters": {"beta": {"low": 0.1, "high": 1.0}, "gamma": {"low": 0.05, "high": 0.5}},
    "replicates": 8,
    "seed": 42,
    "targets": [{"name": "incidence", "observed": "simcal.models.seir:observed", "loss": "mse"}],
    "max_trials": 200,
}


def demo_config(overrides: Mapping[str, Any] | None = None) -> CalibrationConfig:
    """The built-in SEIR demo calibration."""
    return validate_config(DEMO_CONFIG, overrides)
