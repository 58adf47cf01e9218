"""Surgery hyperparameters, read from EasyEdit-style YAML (``hparams/Surgery/<model>.yaml``).

The shipped YAMLs live in the checkout's top-level ``hparams/`` (EasyEdit's layout:
``hparams/<METHOD>/<model>.yaml``) and are installed with the package as
``surgery_plugin/shipped_hparams/``; :func:`shipped_hparams_path` finds them either way.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import SurgeryError

_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


CHOICES = {  # knobs with a fixed set of values (None = off)
    "probe_method": ("linear", "mean_difference"),
    "probe_project_out": (None, "benign_mean", "gate_benign_mean"),
    "region_scoring": ("cosine", "gate_contrast"),
}


@dataclass
class SurgeryHyperParams:
    """Every knob of one surgery, with the paper's defaults where it has one.

    Step size: with ``normalize: false`` (the paper) each selected row moves by ``alpha * v``
    with ``v`` the raw probe row, whose length depends on how long the probe was trained. With
    ``normalize: true`` the probe is made unit length and each row moves by
    ``alpha * mean_gate_row_norm * v / |v|``: alpha is then a fraction of a typical gate row, and
    one value transfers across probes and models.
    """

    alg_name: str = "Surgery"
    model_name: str = "smollm2-135m"  # EasyEdit's editors load it; the CLI takes --model
    # int = CUDA device N, or a torch device name ("cpu", "cuda:1", "mps"); the CLI honours it (--device overrides)
    device: int | str = "cpu"
    # true: spread the model over every visible GPU (accelerate's device_map="auto"), in the CLI and EasyEdit
    model_parallel: bool = False
    max_length: int = 256  # tokens per probe text (and EasyEdit's context length)
    batch_size: int = 1  # EasyEdit-only: requests per edit in batch_edit (edit() needs 1)
    # EasyEdit-only (SafetyEditor): tokens generated per prompt; it keeps max_length - max_output_length
    # prompt tokens. None: min(128, max_length // 2), filled in when a SafetyEditor is built
    max_output_length: int | None = None

    # step 1: the behavior probe
    probe_path: str | None = None  # a probe made by `surgery probe`; else trained from probe_data / requests
    probe_data: str | None = "davidson"
    probe_layer: int = -1  # index into HF hidden_states: -1 = final normed state (the paper), 0 = embeddings
    pooling: str = "mean"
    probe_max_per_class: int | None = 2000
    probe_epochs: int = 9
    probe_lr: float = 1e-4
    probe_batch_size: int = 16
    probe_test_fraction: float = 0.2
    feature_batch_size: int = 16
    # "linear": the 2-class softmax head (the paper); "mean_difference": undesired minus acceptable class mean
    probe_method: str = "linear"
    # None (the paper); "benign_mean": remove the direction's component along the mean benign hidden state at
    # the probe layer; "gate_benign_mean": per edited layer, along the mean benign input of that layer's gate
    # (each layer then gets its own rank-1 direction). Benign text: RTP_BENIGN["reference"] (data/splits.py)
    probe_project_out: str | None = None
    probe_self_judge: str = "minilm"  # probe_data "self": the judge that labels the model's own continuations

    # step 2: regions
    top_k: int | float = 0.0465  # count, or fraction of all gate rows (paper: 16384 / 352256)
    max_rows_per_layer: int | None = None
    layer_range: list | None = None  # [start, end) over decoder layers; negatives count from the end
    # "cosine": -cos(gate row, probe direction) (the paper); "gate_contrast": -cos(gate row, d_l) with d_l the
    # mean gate input of layer l on the probe's undesired texts minus that on benign text
    region_scoring: str = "cosine"

    # step 3: the edit
    alpha: float = 1.08
    normalize: bool = False

    seed: int = 0
    behavior: str = "toxicity"
    notes: str = ""
    extra: dict = field(default_factory=dict)  # free-form, recorded in adapter metadata

    def __post_init__(self) -> None:
        if self.alg_name != "Surgery":
            raise SurgeryError(f"alg_name must be 'Surgery', got '{self.alg_name}'")
        if self.pooling not in ("mean", "last"):
            raise SurgeryError(f"pooling must be 'mean' or 'last', got '{self.pooling}'")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise SurgeryError(
                    f"{name} must be one of {', '.join(map(str, allowed))}, got {getattr(self, name)!r}"
                )
        for name in ("alpha", "probe_lr", "probe_test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SurgeryError(f"{name} must be a finite number, got {value!r}")
        if not 0 <= self.probe_test_fraction < 1:
            raise SurgeryError(f"probe_test_fraction must be in [0, 1), got {self.probe_test_fraction}")
        for name in ("probe_epochs", "probe_batch_size", "feature_batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SurgeryError(f"{name} must be a whole number >= 1, got {value!r}")

    @classmethod
    def from_hparams(cls, hparams_name_or_path: str | Path) -> SurgeryHyperParams:
        """EasyEdit's loader: ``.yaml`` optional, ``5e-4``-style strings become floats, unknown keys rejected."""
        path = Path(hparams_name_or_path)
        if path.suffix not in (".yaml", ".yml"):
            path = path.with_name(path.name + ".yaml")
        if not path.is_file():
            raise SurgeryError(f"hparams file not found: {path}")
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise SurgeryError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
        if not isinstance(config, dict):
            raise SurgeryError(f"{path} must hold a mapping of hyperparameters")
        return cls.from_dict(config, source=str(path))

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "hparams") -> SurgeryHyperParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise SurgeryError(
                f"unknown key '{unknown[0]}' in {source}"
                + (f" (also {unknown[1:]})" if len(unknown) > 1 else "")
                + f"; known keys: {', '.join(sorted(known))}"
            )
        if config.get("alg_name", "Surgery") != "Surgery":
            raise SurgeryError(f"{source} is for alg_name '{config['alg_name']}', not 'Surgery'")
        return cls(**{k: _from_scientific(v) for k, v in config.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> SurgeryHyperParams:
        return dataclasses.replace(self, **changes)

    def needs_reference_stats(self) -> bool:
        """Whether the edit needs hidden-state statistics of benign (and undesired) text beyond the probe."""
        return self.probe_project_out is not None or self.region_scoring != "cosine"


def _from_scientific(value: Any) -> Any:
    """YAML 1.1 reads ``5e-4`` as a string; EasyEdit turns such strings into floats."""
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)
    return value


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
