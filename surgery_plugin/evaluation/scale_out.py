"""Commands for evaluating a model that outgrows one machine (or one GPU), with a surgery adapter.

Three routes, each built here as an argv list so the README's commands are the tested ones:

- **accelerate** ``device_map="auto"``: ``surgery eval/probe --device-map auto`` (or lm-eval's
  ``hf`` model with ``parallelize=True``) spreads the layers over every visible GPU, then CPU
  memory; the adapter loads through PEFT as usual;
- **vLLM with the LoRA**: lm-eval's ``vllm`` model with ``enable_lora=True``,
  ``max_lora_rank`` >= 1 and ``lora_local_path=ADAPTER``, tensor parallel over ``gpus``; vLLM loads
  plain LoRA on separate gate projections (Llama, Mistral, Qwen, Gemma, ...), not GPT-2's Conv1D
  (``fan_in_fan_out``) nor Phi-3's fused ``gate_up_proj``;
- **merged weights** for any engine without LoRA: ``surgery merge``, then the merged folder as a
  plain model.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Literal

from ..errors import SurgeryError

Engine = Literal["hf", "vllm"]
# a rank-1 adapter fits any max_lora_rank >= 1; 8 is the smallest value every vLLM release with LoRA
# accepts (recent releases accept 1 too)
VLLM_MAX_LORA_RANK = 8


def _model_args(pairs: dict[str, object]) -> str:
    """lm-eval's ``--model_args`` text: ``key=value`` pairs joined by commas (values may not contain commas)."""
    for key, value in pairs.items():
        if "," in str(value):
            raise SurgeryError(f"lm-eval's --model_args cannot carry a comma in {key}={value!r}; rename the path")
    return ",".join(f"{key}={value}" for key, value in pairs.items())


def vllm_refusal(adapter: str | os.PathLike) -> str | None:
    """Why vLLM cannot load this surgery adapter as a LoRA (then merge it), or None when it can."""
    config_path = Path(adapter) / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SurgeryError(f"{config_path} is missing or corrupt: {err}") from err
    if config.get("fan_in_fan_out"):
        return "its LoRA sits on Conv1D modules (GPT-2 family, fan_in_fan_out)"
    fused = [m for m in config.get("target_modules") or [] if m.endswith("gate_up_proj")]
    if fused:
        return "its LoRA sits on Phi-3's fused gate_up_proj"
    return None


def lm_eval_command(
    model: str,
    tasks: str,
    *,
    adapter: str | os.PathLike | None = None,
    engine: Engine = "hf",
    device_map_auto: bool = False,
    gpus: int = 1,
    max_lora_rank: int = VLLM_MAX_LORA_RANK,
    include_path: str | os.PathLike | None = None,
    batch_size: str = "auto",
    limit: int | None = None,
    output_path: str | os.PathLike | None = None,
) -> list[str]:
    """``lm_eval ...`` for ``model`` (an HF folder or hub id) with the surgery ``adapter``, if any.

    ``engine="hf"``: transformers + PEFT (``peft=ADAPTER``); ``device_map_auto`` adds
    ``parallelize=True`` (accelerate's ``device_map="auto"``). ``engine="vllm"``: the adapter as a
    vLLM LoRA over ``gpus`` GPUs (tensor parallel); an adapter vLLM cannot load is an error that
    says to merge it.
    """
    if engine not in ("hf", "vllm"):
        raise SurgeryError(f"engine must be 'hf' or 'vllm', got '{engine}'")
    if gpus < 1 or max_lora_rank < 1:
        raise SurgeryError(f"gpus and max_lora_rank must be >= 1, got {gpus} and {max_lora_rank}")
    args: dict[str, object] = {"pretrained": model}
    if engine == "hf":
        if adapter is not None:
            args["peft"] = adapter
        if device_map_auto:
            args["parallelize"] = True
    else:
        if device_map_auto:
            raise SurgeryError("device_map_auto is accelerate's (engine 'hf'); vLLM spreads a model with gpus=N")
        if adapter is not None:
            reason = vllm_refusal(adapter)
            if reason:
                raise SurgeryError(
                    f"vLLM cannot load adapter {adapter} as a LoRA: {reason}; "
                    "merge it (surgery merge) and evaluate the merged folder"
                )
            args.update(enable_lora=True, max_lora_rank=max_lora_rank, lora_local_path=adapter)
        args.update(tensor_parallel_size=gpus, dtype="auto")
    command = ["lm_eval", "--model", engine, "--model_args", _model_args(args), "--tasks", tasks]
    command += ["--batch_size", batch_size]
    if include_path is not None:
        command += ["--include_path", str(include_path)]
    if limit is not None:
        command += ["--limit", str(limit)]
    if output_path is not None:
        command += ["--output_path", str(output_path)]
    return [str(part) for part in command]


def surgery_command(subcommand: str, model: str, *, device_map_auto: bool = True, **options) -> list[str]:
    """``surgery SUBCOMMAND --model MODEL [--device-map auto] --option value ...`` (options as keywords,
    ``_`` for ``-``)."""
    command = ["surgery", subcommand, "--model", model]
    if device_map_auto:
        command += ["--device-map", "auto"]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    return command


def shell(command: list[str]) -> str:
    """The command as one shell line."""
    return shlex.join(command)
