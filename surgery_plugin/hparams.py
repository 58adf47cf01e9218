"""Surgery hyperparameters, read from EasyEdit-style YAML (``hparams/Surgery/<model>.yaml``)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import SurgeryError

_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


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
    # EasyEdit's editors read these four
    model_name: str = "smollm2-135m"
    device: Union[int, str] = "cpu"
    model_parallel: bool = False
    max_length: int = 256
    batch_size: int = 1
    # EasyEdit's SafetyEditor generates this many tokens and keeps max_length - max_output_length
    # prompt tokens; None: min(128, max_length // 2), filled in when a SafetyEditor is built
    max_output_length: Optional[int] = None

    # step 1: the behavior probe
    probe_path: Optional[str] = None  # a probe made by `surgery probe`; else trained from probe_data / requests
    probe_data: Optional[str] = "davidson"
    probe_layer: int = -1  # index into HF hidden_states: -1 = final normed state (the paper), 0 = embeddings
    pooling: str = "mean"
    probe_max_per_class: Optional[int] = 2000
    probe_epochs: int = 9
    probe_lr: float = 1e-4
    probe_batch_size: int = 16
    probe_test_fraction: float = 0.2
    feature_batch_size: int = 16

    # step 2: regions
    top_k: Union[int, float] = 0.0465  # count, or fraction of all gate rows (paper: 16384 / 352256)
    max_rows_per_layer: Optional[int] = None
    layer_range: Optional[list] = None  # [start, end) over decoder layers; negatives count from the end

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
    def from_hparams(cls, hparams_name_or_path: str | Path) -> "SurgeryHyperParams":
        """EasyEdit's loader: ``.yaml`` optional, ``5e-4``-style strings become floats, unknown keys rejected."""
        path = Path(hparams_name_or_path)
        if path.suffix not in (".yaml", ".yml"):
            path = path.with_name(path.name + ".yaml")
        if not path.is_file():
            raise SurgeryError(f"hparams file not found: {path}")
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise SurgeryError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(config, dict):
            raise SurgeryError(f"{path} must hold a mapping of hyperparameters")
        return cls.from_dict(config, source=str(path))

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "hparams") -> "SurgeryHyperParams":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise SurgeryError(f"unknown key '{unknown[0]}' in {source}" + (f" (also {unknown[1:]})" if len(unknown) > 1 else "") + f"; known keys: {', '.join(sorted(known))}")
        if config.get("alg_name", "Surgery") != "Surgery":
            raise SurgeryError(f"{source} is for alg_name '{config['alg_name']}', not 'Surgery'")
        return cls(**{k: _from_scientific(v) for k, v in config.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "SurgeryHyperParams":
        return dataclasses.replace(self, **changes)


def _from_scientific(value: Any) -> Any:
    """YAML 1.1 reads ``5e-4`` as a string; EasyEdit turns such strings into floats."""
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)
    return value


def shipped_hparams_path(model: str) -> Path:
    """``hparams/Surgery/<model>.yaml`` of the working directory or of this source checkout."""
    for root in (Path.cwd() / "hparams", Path(__file__).resolve().parents[1] / "hparams"):
        candidate = root / "Surgery" / f"{model}.yaml"
        if candidate.is_file():
            return candidate
    raise SurgeryError(f"no hparams/Surgery/{model}.yaml found; pass --hparams")
