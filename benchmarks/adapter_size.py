"""Size of a surgery adapter vs. a full checkpoint (what the authors' code saves).

Measures the adapter written by `surgery demo` (or --adapter DIR) on SmolLM2-135M, and computes the
same for LLaMA2-7B from its shapes (a LoRA module on all 32 gate_proj layers, as K = 16384 rows
spread over every layer in the paper), with the per-tensor header overhead measured here.

    python benchmarks/adapter_size.py --adapter runs/demo/adapter --out benchmarks/results/adapter_size.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors import safe_open

from surgery_plugin.io.files import atomic_write

LLAMA2_7B = {"layers": 32, "hidden": 4096, "intermediate": 11008, "params": 6_738_415_616}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapter", default="runs/demo/adapter")
    parser.add_argument("--out", default="benchmarks/results/adapter_size.json")
    args = parser.parse_args()
    adapter = Path(args.adapter)
    weights = adapter / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
        tensor_bytes = sum(f.get_tensor(k).numel() * 4 for k in keys)
    file_bytes = weights.stat().st_size
    overhead_per_tensor = (file_bytes - tensor_bytes) / len(keys)
    folder_bytes = sum(p.stat().st_size for p in adapter.iterdir() if p.is_file())
    record = json.loads((adapter / "surgery.json").read_text())
    smol_params = 134_515_008  # SmolLM2-135M (tied embeddings)
    l7 = LLAMA2_7B
    l7_tensor_bytes = l7["layers"] * (l7["hidden"] + l7["intermediate"]) * 4
    l7_file = l7_tensor_bytes + 2 * l7["layers"] * overhead_per_tensor
    result = {
        "smollm2_135m": {
            "adapter_weights_bytes": file_bytes,
            "adapter_folder_bytes": folder_bytes,
            "lora_modules": len(keys) // 2,
            "rows_edited": record.get("num_rows"),
            "full_checkpoint_fp32_bytes": smol_params * 4,
            "full_checkpoint_bf16_bytes": smol_params * 2,
        },
        "llama2_7b_computed": {
            "adapter_weights_bytes": round(l7_file),
            "full_checkpoint_fp32_bytes": l7["params"] * 4,
            "full_checkpoint_fp16_bytes": l7["params"] * 2,
            "ratio_fp32_checkpoint_to_adapter": round(l7["params"] * 4 / l7_file),
            "assumes": "LoRA on all 32 gate_proj: lora_A 4096 + lora_B 11008 float32 values per layer",
        },
        "header_bytes_per_tensor_measured": round(overhead_per_tensor, 1),
    }
    atomic_write(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
