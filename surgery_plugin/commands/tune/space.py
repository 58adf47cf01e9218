"""The search space of ``surgery tune``: each knob declared once, from :class:`SurgeryHyperParams`' own rules.

A knob is a field of the hparams, searched either as it is (its choices or its declared search range
come from the field's :func:`~surgery_plugin.config.knob`) or through a transform: ``layer_start`` is
the first edited layer as a fraction of the depth (``layer_range: [start, L)``), ``max_rows_per_layer``
a fraction of one layer's rows, ``probe_layer`` chosen among fractions of the depth. :data:`KNOBS` is the
only list: the default space, the point a trial turns into hparams, and the start point (the YAML's own
values) all read it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ...config import SurgeryHyperParams
from ...errors import SurgeryError

RAW_ALPHA = {"low": 0.25, "high": 16.0, "log": True}  # normalize: false (the paper's raw probe length)


@dataclass(frozen=True)
class Shape:
    """What a knob's value depends on besides the hparams: the model's depth and width."""

    n_layers: int
    rows_per_layer: int
    probe_data_choices: tuple[str, ...] = ()


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(SurgeryHyperParams) if f.name == name)


def _declared(name: str) -> dict:
    """The field's choices, else its declared search range."""
    rule = _field(name).metadata
    if rule["choices"] is not None:
        return {"choices": list(rule["choices"])}
    if rule["kind"] == "bool":
        return {"choices": [True, False]}
    if rule["search"] is not None:
        return dict(rule["search"])
    raise AssertionError(f"{name} declares neither choices nor a search range")


@dataclass(frozen=True)
class Knob:
    name: str  # in the space and in Optuna
    field: str  # the SurgeryHyperParams field it sets
    domain: Callable[[Shape], dict]  # the default {"choices": [...]} or {"low", "high"[, "log"]}
    to_field: Callable[[Any, Shape], Any] = lambda value, shape: value  # a searched value -> the field's value
    from_field: Callable[[Any, Shape], Any] = lambda value, shape: value  # the YAML's value -> a searched value


def _probe_layers(shape: Shape) -> dict:
    return {"choices": sorted({max(1, round(shape.n_layers * f)) for f in (0.25, 0.33, 0.5, 0.67)}) + [-1]}


def _layer_start_to_range(fraction: float, shape: Shape) -> list | None:
    start = min(shape.n_layers - 1, round(fraction * shape.n_layers))
    return [start, shape.n_layers] if start > 0 else None


def _rows_cap(fraction: float | None, shape: Shape) -> int | None:
    return None if fraction is None else max(1, round(fraction * shape.rows_per_layer))


KNOBS: tuple[Knob, ...] = (
    Knob("probe_layer", "probe_layer", _probe_layers),
    Knob("pooling", "pooling", lambda shape: _declared("pooling")),
    Knob("probe_data", "probe_data", lambda shape: {"choices": list(shape.probe_data_choices)}),
    Knob("probe_method", "probe_method", lambda shape: _declared("probe_method")),
    Knob("probe_project_out", "probe_project_out", lambda shape: _declared("probe_project_out")),
    Knob("region_scoring", "region_scoring", lambda shape: _declared("region_scoring")),
    Knob("edit_direction", "edit_direction", lambda shape: _declared("edit_direction")),
    Knob(
        "layer_start",
        "layer_range",
        lambda shape: {"low": 0.0, "high": 0.6},
        to_field=_layer_start_to_range,
        from_field=lambda value, shape: (value or [0])[0] / shape.n_layers,
    ),
    Knob("top_k", "top_k", lambda shape: _declared("top_k"), to_field=lambda value, shape: float(value)),
    Knob(
        "max_rows_per_layer",
        "max_rows_per_layer",
        lambda shape: {"choices": [None, 0.1]},  # a fraction of one layer's rows
        to_field=_rows_cap,
        from_field=lambda value, shape: None if value is None else value / shape.rows_per_layer,
    ),
    Knob("normalize", "normalize", lambda shape: _declared("normalize"), to_field=lambda value, shape: bool(value)),
    Knob("alpha", "alpha", lambda shape: _declared("alpha"), to_field=lambda value, shape: float(value)),
)
BY_NAME = {k.name: k for k in KNOBS}


def default_space(n_layers: int, probe_data: Sequence[str]) -> dict[str, dict]:
    """Every knob's default domain; ``probe_data``: the behavior's data sets (``Behavior.probe_data_choices``)."""
    shape = Shape(n_layers, 1, tuple(probe_data))
    return {k.name: k.domain(shape) for k in KNOBS}


def check_space(space: Any) -> dict[str, dict]:
    """A search space from YAML/JSON: known knobs, each a non-empty choice list or a low <= high range."""
    if not isinstance(space, dict) or not space:
        raise SurgeryError("the search space must be a mapping of knob -> {choices: [...]} or {low, high[, log]}")
    for name, spec in space.items():
        if name not in BY_NAME:
            raise SurgeryError(f"unknown knob '{name}' in the search space; knobs: {', '.join(BY_NAME)}")
        if not isinstance(spec, dict) or not (("choices" in spec) ^ ({"low", "high"} <= set(spec))):
            raise SurgeryError(
                f"search space entry '{name}' must be {{choices: [...]}} or {{low: x, high: y}}, got {spec!r}"
            )
        unknown = set(spec) - {"choices", "low", "high", "log"}
        if unknown:
            raise SurgeryError(f"search space entry '{name}' has unknown key(s) {sorted(unknown)}")
        if "choices" in spec and (not isinstance(spec["choices"], list) or not spec["choices"]):
            raise SurgeryError(f"search space entry '{name}': choices must be a non-empty list")
        if "low" in spec and not (
            all(isinstance(spec[b], (int, float)) and not isinstance(spec[b], bool) for b in ("low", "high"))
            and spec["low"] <= spec["high"]
        ):
            raise SurgeryError(f"search space entry '{name}': needs numbers low <= high, got {spec!r}")
    return space


def sample(trial, space: dict[str, dict], base: SurgeryHyperParams, shape: Shape) -> dict:
    """One point: the space's knobs drawn by the trial, the others at the base YAML's values."""
    params = {}
    for name, spec in space.items():
        if name == "alpha":
            continue
        if "choices" in spec:  # Optuna stores plain values; None and bools as JSON
            params[name] = json.loads(trial.suggest_categorical(name, [json.dumps(c) for c in spec["choices"]]))
        else:
            params[name] = trial.suggest_float(name, spec["low"], spec["high"], log=bool(spec.get("log")))
    normalize = params.get("normalize", base.normalize)
    alpha_spec = space.get("alpha", {"low": base.alpha, "high": base.alpha})
    if not normalize:  # the raw probe's length sets the scale: its own range
        params["alpha"] = trial.suggest_float("alpha_raw", RAW_ALPHA["low"], RAW_ALPHA["high"], log=True)
    else:
        params["alpha"] = trial.suggest_float(
            "alpha", alpha_spec["low"], alpha_spec["high"], log=bool(alpha_spec.get("log"))
        )
    return {**base_point(base, shape), **params}


def base_point(base: SurgeryHyperParams, shape: Shape) -> dict:
    """Every knob at the base YAML's value, as the search expresses it."""
    return {k.name: k.from_field(getattr(base, k.field), shape) for k in KNOBS}


def point_hparams(params: dict, base: SurgeryHyperParams, shape: Shape) -> SurgeryHyperParams:
    """The hparams of a searched point: the base YAML with each knob's field set (a trained probe, not a file).

    A knob at the base YAML's own value keeps the YAML's field as it is: a transform need not be
    invertible (``layer_range: [3, 20]`` is ``layer_start`` 0.1, which alone would give ``[3, L)``)."""
    at_base = base_point(base, shape)
    changes = {
        BY_NAME[name].field: BY_NAME[name].to_field(value, shape)
        for name, value in params.items()
        if value != at_base[name]
    }
    if changes.get("edit_direction", base.edit_direction) != "probe":
        changes["probe_project_out"] = None  # a per-layer gate direction replaces the probe's: nothing to project
    return base.replace(probe_path=None, **changes)


def start_point(space: dict[str, dict], base: SurgeryHyperParams, shape: Shape) -> dict:
    """The base YAML's value of each searched knob that lies in the space, as Optuna stores it (the first trial)."""
    values = base_point(base, shape)
    point = {}
    for name, spec in space.items():
        if name == "alpha" and not base.normalize:
            continue  # raw alpha has its own range
        value = values[name]
        if "choices" in spec:
            if value in spec["choices"]:
                point[name] = json.dumps(value)
        elif spec["low"] <= value <= spec["high"]:
            point[name] = value
    return point
