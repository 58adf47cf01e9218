"""The edit straight from a checkpoint's safetensors shards, without building the model.

Selection and the normalised step need only the gate weights: :class:`CheckpointGates` finds each
layer's gate tensor through ``model.safetensors.index.json`` (or the single ``model.safetensors``),
memory-maps its shard with ``safetensors.safe_open`` and hands out blocks of rows, one tensor open
at a time. :func:`surgery_plugin.surgery.execute_surgery` scores them in one pass with a running
global top-K, exactly as it does for a loaded model (the same blocks, so the same bits), and
:func:`surgery_plugin.adapter.export_adapter` writes the same adapter. Peak memory is about one
gate tensor (its mapped pages) plus a block of rows in float32, whatever the model's size.

Every check of the folder (shards present, headers complete, gate tensors where the index says,
shapes consistent) runs before the pass, so bad input fails in seconds with one line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch

from ..errors import SurgeryError, first_line
from .architectures import GateRows, spec_for_type
from .dtypes import parse_dtype
from .provenance import fingerprint_positions

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# stream instead of loading when the loaded model would take more than this share of the free memory
_MEMORY_SHARE = 0.8


def _safetensors_error():
    from safetensors import SafetensorError

    return SafetensorError


def tensor_files(folder: str | os.PathLike) -> dict[str, Path]:
    """``{tensor name: shard file}`` of a safetensors checkpoint folder (sharded with an index, or one file)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SurgeryError(f"model folder not found: {folder} (streaming reads a local checkpoint folder)")
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise SurgeryError(f"{index} is not a safetensors index (no weight_map): {first_line(err)}") from err
        files = {name: folder / shard for name, shard in weight_map.items()}
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise SurgeryError(f"{index} names shard(s) missing from {folder}: {shown}")
        return files
    shards = [folder / SINGLE_FILE] if (folder / SINGLE_FILE).is_file() else sorted(folder.glob("*.safetensors"))
    if not shards:
        other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f" (it has {', '.join(other[:3])}: convert it to safetensors first)" if other else ""
        raise SurgeryError(f"no safetensors weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE}{hint}")
    files = {}
    for shard in shards:
        for name in _open_shard(shard, lambda f: list(f.keys())):
            files[name] = shard
    return files


def _open_shard(path: Path, read):
    """``read(f)`` on the opened shard; a truncated or corrupt shard is a one-line error."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return read(f)
    except (_safetensors_error(), OSError) as err:
        raise SurgeryError(f"shard {path} is truncated or corrupt: {first_line(err)}") from err


def _model_config(folder: Path) -> tuple[str, object]:
    """``(model_type, transformers config)``: the type is checked before transformers parses the rest."""
    config_file = folder / "config.json"
    try:
        mtype = json.loads(config_file.read_text()).get("model_type", "")
    except (OSError, json.JSONDecodeError) as err:
        raise SurgeryError(f"{folder} has no readable config.json: {first_line(err)}") from err
    spec_for_type(mtype)  # a model type without a known gate layout stops here, naming the supported ones
    from transformers import AutoConfig

    try:
        return mtype, AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as err:
        raise SurgeryError(f"cannot read {config_file}: {first_line(err)}") from err


class CheckpointGates(GateRows):
    """The gate rows of a safetensors checkpoint, read from its shards block by block.

    ``dtype`` is the dtype the in-memory path would load the model in (``--dtype``): blocks are
    read as that path would hold them (:meth:`_as_loaded`), so both paths score the same values.
    """

    def __init__(self, folder: str | os.PathLike, dtype: str | torch.dtype | None = None, name: str | None = None):
        self.folder = Path(folder)
        self.name = name or str(folder)
        self.dtype = parse_dtype(dtype)
        files = tensor_files(self.folder)
        self.model_type, config = _model_config(self.folder)
        self.spec = spec_for_type(self.model_type)
        self.num_layers = int(config.num_hidden_layers)
        self._tensors = self._gate_tensor_names(files)
        self._files = {layer: files[name] for layer, name in self._tensors.items()}
        shapes = self._check_shards(files)
        out, hidden = shapes[0][::-1] if self.spec.kind == "conv1d" else shapes[0]
        self.rows_per_layer = out // 2 if self.spec.fused_gate_rows else out
        self.hidden_size = hidden
        self._fingerprint = fingerprint_positions(self.num_layers, self.rows_per_layer, self.hidden_size)
        self._fingerprint_seen: dict[int, torch.Tensor] = {}  # layer -> its fingerprint entries, met in row_blocks

    def _gate_tensor_names(self, files: dict[str, Path]) -> dict[int, str]:
        # HF saves names relative to the CausalLM; some hub checkpoints (GPT-2) drop the base model's prefix
        layers_path = self.spec.layers_path
        prefixes = [layers_path, layers_path.split(".", 1)[1]] if "." in layers_path else [layers_path]
        suffix = f"{self.spec.gate_path}.weight"
        prefix = next((p for p in prefixes if f"{p}.0.{suffix}" in files), None)
        if prefix is None:
            raise SurgeryError(
                f"{self.folder} has no gate tensor '{prefixes[0]}.0.{suffix}' "
                f"(where a '{self.model_type}' checkpoint keeps layer 0's gate)"
            )
        names = {layer: f"{prefix}.{layer}.{suffix}" for layer in range(self.num_layers)}
        absent = [layer for layer, name in names.items() if name not in files]
        if absent:
            raise SurgeryError(
                f"{self.folder}: config.json has {self.num_layers} layers but the checkpoint has no gate tensor "
                f"for layer {absent[0]} ('{names[absent[0]]}')"
            )
        return names

    def _check_shards(self, files: dict[str, Path]) -> list[tuple[int, ...]]:
        """Open every shard's header (complete and readable) and check the gate tensors' shapes and dtypes."""
        gates_by_shard: dict[Path, list[int]] = {}
        for layer, path in self._files.items():
            gates_by_shard.setdefault(path, []).append(layer)
        shapes: dict[int, tuple[int, ...]] = {}
        for shard in sorted(set(files.values())):
            layers = gates_by_shard.get(shard, [])
            _open_shard(shard, partial(self._gate_shapes, shard=shard, layers=layers, out=shapes))
        first = shapes[0]
        odd = next((layer for layer, shape in sorted(shapes.items()) if shape != first), None)
        if len(first) != 2 or odd is not None:
            where = f"layer {odd} has {list(shapes[odd])}" if odd is not None else f"layer 0 has {list(first)}"
            raise SurgeryError(f"{self.folder}: gate tensors must all be the same matrix shape, but {where}")
        return [shapes[layer] for layer in range(self.num_layers)]

    def _gate_shapes(self, f, shard: Path, layers: list[int], out: dict[int, tuple[int, ...]]) -> None:
        keys = set(f.keys())
        for layer in layers:
            name = self._tensors[layer]
            if name not in keys:
                raise SurgeryError(f"{INDEX_FILE} puts '{name}' in {shard.name}, which does not have it")
            tensor = f.get_slice(name)
            if tensor.get_dtype() not in _FLOAT_DTYPES:
                raise SurgeryError(f"gate tensor '{name}' is {tensor.get_dtype()}, not a float tensor")
            out[layer] = tuple(tensor.get_shape())

    def tensor_name(self, layer: int) -> str:
        return self._tensors[layer]

    def _read(self, layer: int, read):
        """``read(slice)`` on the gate tensor of ``layer``; its shard is mapped only meanwhile."""
        return _open_shard(self._files[layer], lambda f: read(f.get_slice(self._tensors[layer])))

    def byte_range(self, layer: int) -> tuple[Path, int, int]:
        """``(shard, offset, length)`` of the gate tensor of ``layer`` in its shard file."""
        path, name = self._files[layer], self._tensors[layer]
        with open(path, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            begin, end = json.loads(f.read(header_length))[name]["data_offsets"]
        return path, 8 + header_length + begin, end - begin

    def _read_ahead(self, layer: int) -> None:
        """Ask the kernel to start reading a gate tensor now, so the disk works while the CPU scores."""
        if layer >= self.num_layers or not hasattr(os, "posix_fadvise"):
            return
        path, offset, length = self.byte_range(layer)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def row_blocks(self, layer: int, block_rows: int) -> Iterator[torch.Tensor]:
        from safetensors import safe_open

        path, name = self._files[layer], self._tensors[layer]
        self._read_ahead(layer + 1)  # the pass goes on with the next layer
        rows, cols = self._fingerprint[layer]
        seen = torch.empty(len(rows))
        try:
            # one mapping per tensor: the pages it touched are released when it closes
            with safe_open(str(path), framework="pt") as f:
                stored = f.get_slice(name)
                for start in range(0, self.rows_per_layer, block_rows):
                    stop = min(start + block_rows, self.rows_per_layer)
                    # Conv1D stores (in, out): a block of gate rows is a block of columns
                    block = stored[:, start:stop].T if self.spec.kind == "conv1d" else stored[start:stop]
                    block = self._as_loaded(block)
                    here = (rows >= start) & (rows < stop)  # keep the fingerprint's entries as they pass
                    seen[here] = block[rows[here] - start, cols[here]].float()
                    yield block
        except (_safetensors_error(), OSError) as err:
            raise SurgeryError(f"cannot read '{name}' from {path}: {first_line(err)}") from err
        self._fingerprint_seen[layer] = seen

    def rows_at(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        conv1d = self.spec.kind == "conv1d"

        def read(stored):
            out = [stored[:, r : r + 1].T if conv1d else stored[r : r + 1] for r in rows.tolist()]
            return self._as_loaded(torch.cat(out)).float() if out else torch.empty(0, self.hidden_size)

        return self._read(layer, read)

    def entries(self, layer: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        want_rows, want_cols = self._fingerprint[layer]
        if layer in self._fingerprint_seen and torch.equal(rows, want_rows) and torch.equal(cols, want_cols):
            return self._fingerprint_seen[layer].clone()  # the fingerprint of a scored layer: no second read
        conv1d = self.spec.kind == "conv1d"

        def read(stored):
            values = []
            for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
                i, j = (c, r) if conv1d else (r, c)
                values.append(stored[i : i + 1, j : j + 1].reshape(1))
            return torch.cat(values)

        return self._as_loaded(self._read(layer, read)).float()

    def _as_loaded(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` as the in-memory path would hold them (``dtype``). Scoring copies every block into
        float32, which holds any bf16 / fp16 / fp32 value exactly: casting to float32 or float64 first
        would change no value, only cost a copy of the block."""
        if self.dtype is None or self.dtype in (torch.float32, torch.float64):
            return values
        return values.to(self.dtype)


def loaded_bytes(folder: str | os.PathLike, dtype: str | torch.dtype | None = None) -> int:
    """Memory the checkpoint's tensors take once loaded (floating tensors in ``dtype``, when given)."""
    files = tensor_files(folder)
    target = parse_dtype(dtype)
    item = torch.empty(0, dtype=target).element_size() if target is not None else None

    def count(f):
        total = 0
        for name in f.keys():
            tensor = f.get_slice(name)
            numel = 1
            for n in tensor.get_shape():
                numel *= n
            stored = tensor.get_dtype()
            total += numel * (item if item and stored in _FLOAT_DTYPES else _BYTES.get(stored, 4))
        return total

    return sum(_open_shard(shard, count) for shard in sorted(set(files.values())))


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux MemAvailable; else all physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def too_big_to_load(model: str, dtype: str | torch.dtype | None) -> bool:
    """Whether ``model`` is a local safetensors folder that would not fit in free memory (-> stream it)."""
    folder = Path(model)
    if not folder.is_dir() or not ((folder / INDEX_FILE).is_file() or any(folder.glob("*.safetensors"))):
        return False
    needed, free = loaded_bytes(folder, dtype), available_memory()
    if needed <= _MEMORY_SHARE * free:
        return False
    logger.info(
        "%s needs %.1f GB loaded, %.1f GB of memory is available: reading its gate tensors from the shards instead",
        folder,
        needed / 1e9,
        free / 1e9,
    )
    return True
