"""Surgery hyperparameters, read from EasyEdit-style YAML (``hparams/Surgery/<model>.yaml``).

The shipped YAMLs live in the checkout's top-level ``hparams/`` (EasyEdit's layout:
``hparams/<METHOD>/<model>.yaml``) and are installed with the package as
``surgery_plugin/shipped_hparams/``; :func:`shipped_hparams_path` finds them either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import SurgeryError

_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
MAX_YAML_BYTES = 1 << 20  # an hparams file is a few hundred bytes; anything near this is not one
MAX_EXTRA_BYTES = 1 << 16  # `extra:` is recorded in every adapter's metadata


def knob(
    default: Any = None,
    *,
    kind: str,
    choices: Sequence | None = None,
    low=None,
    high=None,
    optional=False,
    low_open: bool = False,
    search: dict | None = None,
    factory=None,
):
    """A field of :class:`SurgeryHyperParams` and its rule, declared once: ``kind`` (int, float, bool, str, top_k,
    layer_range, device, dict), ``choices`` or a ``[low, high]`` range (``low_open``: above ``low``),
    ``optional`` (None allowed). ``search``: the range ``surgery tune`` searches by default when it is
    narrower than what is valid (read by :mod:`surgery_plugin.commands.tune.space`)."""
    meta = {
        "kind": kind,
        "choices": tuple(choices) if choices is not None else None,
        "low": low,
        "high": high,
        "optional": optional,
        "low_open": low_open,
        "search": search,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SurgeryHyperParams:
    """Every knob of one surgery, with the paper's defaults where it has one.

    Step size: with ``normalize: false`` (the paper) each selected row moves by ``alpha * v``
    with ``v`` the raw probe row, whose length depends on how long the probe was trained. With
    ``normalize: true`` the probe is made unit length and each row moves by
    ``alpha * mean_gate_row_norm * v / |v|``: alpha is then a fraction of a typical gate row, and
    one value transfers across probes and models.

    Strict: every value is checked against its field's rule (:func:`knob`) when the object is made,
    also by ``replace`` (CLI overrides); booleans are booleans, numbers are finite and in range.
    """

    alg_name: str = knob("Surgery", kind="str", choices=("Surgery",))
    model_name: str = knob("smollm2-135m", kind="str")  # EasyEdit's editors load it; the CLI takes --model
    # int = CUDA device N, or a torch device name ("cpu", "cuda:1", "mps"); the CLI honours it (--device overrides)
    device: int | str = knob("cpu", kind="device")
    # true: spread the model over every visible GPU (accelerate's device_map="auto"), in the CLI and EasyEdit
    model_parallel: bool = knob(False, kind="bool")
    max_length: int = knob(256, kind="int", low=1, high=1 << 20)  # tokens per probe text (and EasyEdit's context)
    batch_size: int = knob(1, kind="int", low=1, high=1 << 20)  # EasyEdit-only: requests per edit in batch_edit
    # EasyEdit-only (SafetyEditor): tokens generated per prompt; it keeps max_length - max_output_length
    # prompt tokens. None: min(128, max_length // 2), filled in when a SafetyEditor is built
    max_output_length: int | None = knob(None, kind="int", low=1, high=1 << 20, optional=True)

    # step 1: the behavior probe
    # a probe made by `surgery probe`; else trained from probe_data / requests
    probe_path: str | None = knob(None, kind="str", optional=True)
    probe_data: str | None = knob("davidson", kind="str", optional=True)
    # index into HF hidden_states: -1 = final normed state (the paper), 0 = embeddings
    probe_layer: int = knob(-1, kind="int", low=-(1 << 16), high=1 << 16)
    pooling: str = knob(
        "mean", kind="str", choices=("mean", "last", "mean_drop_first", "mean_final_norm")
    )  # core/features.py
    probe_max_per_class: int | None = knob(2000, kind="int", low=1, high=1 << 31, optional=True)
    probe_epochs: int = knob(9, kind="int", low=1, high=1 << 20)
    probe_lr: float = knob(1e-4, kind="float", low=0, high=10.0, low_open=True)
    probe_batch_size: int = knob(16, kind="int", low=1, high=1 << 20)
    probe_test_fraction: float = knob(0.2, kind="float", low=0.0, high=0.95)
    feature_batch_size: int = knob(16, kind="int", low=1, high=1 << 20)
    # "linear": the 2-class softmax head, Adam for probe_epochs (the paper); "mean_difference": undesired minus
    # acceptable class mean; "logistic": L2-regularised logistic regression on standardised features solved to
    # convergence, its penalty chosen on a validation split of the training examples (core/probe.py)
    probe_method: str = knob("linear", kind="str", choices=("linear", "mean_difference", "logistic"))
    # None (the paper); "benign_mean": remove the direction's component along the mean benign hidden state at
    # the probe layer; "gate_benign_mean": per edited layer, along the mean benign input of that layer's gate
    # (each layer then gets its own rank-1 direction). Benign text: RTP_BENIGN["reference"] (data/splits.py)
    probe_project_out: str | None = knob(None, kind="str", choices=(None, "benign_mean", "gate_benign_mean"))
    # probe_data "self": the judge that labels the model's own continuations
    probe_self_judge: str = knob("minilm", kind="str")

    # step 2: regions
    # count, or fraction of all gate rows (paper: 16384 / 352256)
    top_k: int | float = knob(0.0465, kind="top_k", search={"low": 0.005, "high": 0.15, "log": True})
    max_rows_per_layer: int | None = knob(None, kind="int", low=1, high=1 << 31, optional=True)
    # [start, end) over decoder layers; negatives count from the end
    layer_range: list | None = knob(None, kind="layer_range", optional=True)
    # "cosine": -cos(gate row, probe direction) (the paper); "gate_contrast": -cos(gate row, d_l) with d_l the
    # mean gate input of layer l on the probe's undesired texts minus that on benign text; "activation": how much a
    # push of the row lowers the MLP output along the probe on undesired tokens beyond benign ones, through the
    # gate's activation (a row below SiLU's minimum, where a push lowers its output, scores accordingly) and the
    # row's up and down projections (core/diagnostics.py activation_scores)
    region_scoring: str = knob("cosine", kind="str", choices=("cosine", "gate_contrast", "activation"))
    # the vector added to the selected rows (and the one rows are scored against): "probe" (the paper); or
    # "gate_mean_difference": per edited layer l, d_l = the mean gate input of layer l on the probe's undesired texts
    # minus that on benign text, at the probe direction's length (alpha keeps its meaning): a direction that gate reads
    edit_direction: str = knob("probe", kind="str", choices=("probe", "gate_mean_difference"))

    # step 3: the edit (normalised alpha: a fraction of a gate row; raw: a multiple of the probe vector)
    alpha: float = knob(1.08, kind="float", low=-1e4, high=1e4, search={"low": 0.05, "high": 1.5})
    normalize: bool = knob(False, kind="bool")

    seed: int = knob(0, kind="int", low=0, high=(1 << 32) - 1)
    behavior: str = knob("toxicity", kind="str")  # the behavior it edits (behaviors.py checks it)
    notes: str = knob("", kind="str")
    extra: dict = knob(kind="dict", factory=dict)  # free-form, recorded in adapter metadata

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name), f.metadata))
        if self.edit_direction != "probe" and self.probe_project_out is not None:
            raise SurgeryError(
                f"edit_direction: {self.edit_direction} replaces the probe direction in every edited layer; "
                f"probe_project_out: {self.probe_project_out} has nothing to act on (set it to null)"
            )

    @classmethod
    def from_hparams(cls, hparams_name_or_path: str | Path) -> SurgeryHyperParams:
        """EasyEdit's loader: ``.yaml`` optional, ``5e-4``-style strings become floats, unknown keys rejected;
        duplicate keys, anchors/aliases, other encodings than UTF-8 and files over 1 MB refused."""
        path = Path(hparams_name_or_path)
        if path.suffix not in (".yaml", ".yml"):
            path = path.with_name(path.name + ".yaml")
        return cls.from_dict(load_yaml_mapping(path, "hparams"), source=str(path))

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "hparams") -> SurgeryHyperParams:
        if not isinstance(config, dict):
            raise SurgeryError(f"{source} must hold a mapping of hyperparameters")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known, key=str)
        if unknown:
            raise SurgeryError(
                f"unknown key '{unknown[0]}' in {source}"
                + (f" (also {unknown[1:]})" if len(unknown) > 1 else "")
                + f"; known keys: {', '.join(sorted(known))}"
            )
        if config.get("alg_name", "Surgery") != "Surgery":
            raise SurgeryError(f"{source} is for alg_name '{config['alg_name']}', not 'Surgery'")
        try:
            return cls(**config)
        except SurgeryError as err:
            raise SurgeryError(f"{source}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> SurgeryHyperParams:
        return dataclasses.replace(self, **changes)

    def needs_reference_stats(self) -> bool:
        """Whether the edit needs hidden-state statistics of benign (and undesired) text beyond the probe."""
        return self.probe_project_out is not None or self.region_scoring != "cosine" or self.edit_direction != "probe"

    def variants(self) -> str:
        """The options beyond the paper's edit that are set, for messages ("" for the paper's)."""
        paper = {"probe_project_out": None, "region_scoring": "cosine", "edit_direction": "probe"}
        return ", ".join(f"{k}: {getattr(self, k)}" for k, v in paper.items() if getattr(self, k) != v)


def _checked(name: str, value: Any, rule) -> Any:
    """``value`` as ``rule`` allows it (an int for a float field becomes a float; EasyEdit's ``"5e-4"``
    strings become floats), else a one-line error naming the field, the value and what is allowed."""
    kind, choices = rule["kind"], rule["choices"]
    if value is None and (rule["optional"] or (choices is not None and None in choices)):
        return None

    def bad(what: str) -> SurgeryError:
        shown = repr(value)
        return SurgeryError(f"{name} must be {what}, got {shown[:80] + '...' if len(shown) > 80 else shown}")

    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string" + (" or null" if rule["optional"] else ""))
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number" + (" or null" if rule["optional"] else ""))
    elif kind == "float":
        value = _from_scientific(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a finite number")
        value = float(value)
    elif kind == "top_k":
        value = _from_scientific(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a count >= 1 or a fraction in (0, 1)")
        if not (0 < value < 1 or (value >= 1 and float(value).is_integer() and value <= 1 << 40)):
            raise bad("a whole count >= 1 or a fraction in (0, 1)")
    elif kind == "layer_range":
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or abs(v) > 1 << 16 for v in value)
        ):
            raise bad("[start, end] of two whole numbers (or null for every layer)")
        return list(value)
    elif kind == "device":
        if isinstance(value, bool) or not (
            (isinstance(value, int) and 0 <= value < 1 << 16) or (isinstance(value, str) and value.strip())
        ):
            raise bad("a CUDA index >= 0 or a torch device name (cpu, cuda:0, mps)")
        return value
    elif kind == "dict":
        if not isinstance(value, dict):
            raise bad("a mapping")
        try:
            size = len(json.dumps(value))
        except (TypeError, ValueError) as err:
            raise bad("a mapping of plain YAML values") from err
        if size > MAX_EXTRA_BYTES:
            raise SurgeryError(f"{name} holds {size} bytes as JSON; at most {MAX_EXTRA_BYTES} are recorded")
        return value
    if choices is not None and value not in choices:
        raise bad("one of " + ", ".join("null" if c is None else str(c) for c in choices))
    low, high = rule["low"], rule["high"]
    if low is not None and (value <= low if rule["low_open"] else value < low):
        raise bad(f"{'>' if rule['low_open'] else '>='} {low:g}")
    if high is not None and value > high:
        raise bad(f"<= {high:g}")
    return value


def _from_scientific(value: Any) -> Any:
    """YAML 1.1 reads ``5e-4`` as a string; EasyEdit turns such strings into floats."""
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)
    return value


class _StrictLoader(yaml.SafeLoader):
    """YAML without anchors/aliases (a billion-laughs file is refused, not expanded) and without duplicate keys."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.constructor.ConstructorError(
                None, None, "anchors and aliases are not allowed in an hparams file", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                duplicate = False
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key) if isinstance(key, (str, int, float, bool, type(None))) else None
        return super().construct_mapping(node, deep)


def load_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file that must hold a mapping, read strictly (size, UTF-8, no aliases, no duplicate keys)."""
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"{what} file not found: {path}")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise SurgeryError(f"{path} is {size} bytes; a {what} file is at most {MAX_YAML_BYTES}")
    try:
        text = path.read_bytes().decode("utf-8")
        config = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except UnicodeDecodeError as err:
        raise SurgeryError(f"{path} is not UTF-8 text (byte {err.start})") from err
    except yaml.YAMLError as err:
        raise SurgeryError(f"{path} is not valid YAML: {' '.join(str(err).split())[:200]}") from err
    except RecursionError as err:
        raise SurgeryError(f"{path} nests too deeply to be a {what} file") from err
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise SurgeryError(f"{path} must hold a mapping of hyperparameters")
    return config


def hparams_root() -> Path:
    """The shipped ``hparams/`` folder: the installed package's copy, else the source checkout's."""
    package = Path(__file__).resolve().parent
    for root in (package / "shipped_hparams", package.parent / "hparams"):
        if (root / "Surgery").is_dir():
            return root
    raise SurgeryError(
        f"the shipped hparams are missing (looked in {package / 'shipped_hparams'} and {package.parent / 'hparams'}); "
        "reinstall surgery_plugin or pass --hparams"
    )


def shipped_hparams_path(model: str, method: str = "Surgery") -> Path:
    """``hparams/<method>/<model>.yaml`` as shipped with the package (see :func:`find_hparams`)."""
    return find_hparams(model, method)


def find_hparams(model: str, method: str = "Surgery", root: str | Path | None = None) -> Path:
    """``<root>/<method>/<model>.yaml``, else the YAML there whose ``model_name`` is ``model``.

    ``root`` is a folder in EasyEdit's layout (``<root>/<METHOD>/<name>.yaml``); default: the shipped hparams.
    """
    folder = (Path(root) if root is not None else hparams_root()) / method
    candidate = folder / f"{model}.yaml"
    if candidate.is_file():
        return candidate
    for path in sorted(folder.glob("*.yaml")):
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            continue
        if isinstance(config, dict) and config.get("model_name") == model:
            return path
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    raise SurgeryError(
        f"no {'shipped hparams' if root is None else root}/{method}/{model}.yaml nor a YAML there with model_name "
        f"'{model}' "
        f"(there: {', '.join(known) or 'none'}); pass your own (--hparams / --hparams-dir)"
    )


def parse_list(
    text: str | Sequence[str],
    kind: str,
    known: Sequence[str] | None = None,
    convert: Callable[[str], Any] | None = None,
    hint: str = "",
) -> tuple:
    """The one comma-list parser (CLI options, hparams, search spaces): items stripped, none empty, none
    given twice, each one of ``known`` when given, each turned by ``convert`` (its ValueError is the
    one-line error). ``kind`` names an item in the errors ("suite", "method"...)."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else map(str, text))]
    items = [s for s in items if s]
    if not items:
        raise SurgeryError(f"no {kind} given" + (f"; {kind}s: {', '.join(known)}" if known else "") + hint)
    if known is not None:
        unknown = next((s for s in items if s not in known), None)
        if unknown is not None:
            raise SurgeryError(f"unknown {kind} '{unknown}'; {kind}s: {', '.join(known)}{hint}")
    duplicate = next((s for s in items if items.count(s) > 1), None)
    if duplicate is not None:
        raise SurgeryError(f"{kind} '{duplicate}' given twice")
    if convert is None:
        return tuple(items)
    out = []
    for item in items:
        try:
            out.append(convert(item))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            raise SurgeryError(f"{kind} '{item}' is not valid ({err})") from err
    return tuple(out)
