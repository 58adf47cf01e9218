"""A synthetic checkpoint with LLaMA2-7B's shapes, for the streaming benchmarks (random weights).

LLaMA2-7B's config (32 layers, hidden 4096, intermediate 11008, 32 heads, bf16) written as an HF
folder: ``config.json``, ``model-0000N-of-0000M.safetensors`` shards of at most ``--shard-gb`` GB
(5 by default, as ``save_pretrained`` does) and ``model.safetensors.index.json``. The vocabulary
is reduced (1,024 instead of 32,000: 0.25 GB of embeddings and head instead of 0.5 GB; the gate
tensors, which are what the edit reads, are the real size). Shards are written tensor by tensor,
so the generator needs about one tensor of memory; the folder appears only when complete.

    python benchmarks/make_7b_checkpoint.py --out /work/bench-7b                  # 13 GB
    python benchmarks/make_7b_checkpoint.py --out /work/bench-70b-2l --layers 2 \\
        --hidden 8192 --intermediate 28672 --kv-heads 8 --heads 64                # two LLaMA2-70B layers
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
import zlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from surgery_plugin.io.files import atomic_path


def tensor_shapes(args) -> list[tuple[str, tuple[int, ...]]]:
    """HF LlamaForCausalLM's tensor names and shapes, in save order."""
    h, i, kv = args.hidden, args.intermediate, args.hidden // args.heads * args.kv_heads
    shapes = [("model.embed_tokens.weight", (args.vocab, h))]
    for layer in range(args.layers):
        p = f"model.layers.{layer}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (args.vocab, h))]


def shard_plan(shapes, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, current, size = [], [], 0
    for name, shape in shapes:
        nbytes = 2 * torch.Size(shape).numel()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    return shards + [current]


def write_shard(path: Path, tensors, seed: int, progress) -> int:
    """A safetensors file written tensor by tensor: header first (offsets are known from the shapes)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        nbytes = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape in tensors:
            generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
            std = 1.0 if name.endswith("norm.weight") else 0.02
            tensor = torch.randn(shape, generator=generator, dtype=torch.float32).mul_(std).to(torch.bfloat16)
            f.write(memoryview(tensor.view(torch.uint8).numpy()))
            progress.update(tensor.numel() * 2)
    return offset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="a folder outside the repository (13 GB for the 7B shape)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=1024, help="reduced from LLaMA2's 32000")
    parser.add_argument("--shard-gb", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    shapes = tensor_shapes(args)
    shards = shard_plan(shapes, int(args.shard_gb * 1e9))
    total = sum(2 * torch.Size(s).numel() for _, s in shapes)
    names = [f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" for n in range(len(shards))]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "surgery_benchmark": "synthetic random weights, LLaMA2 shapes, reduced vocabulary",
    }
    start = time.perf_counter()
    with atomic_path(args.out) as tmp, tqdm(total=total, unit="B", unit_scale=True, desc="writing") as progress:
        tmp.mkdir()
        weight_map = {}
        for name, tensors in zip(names, shards, strict=True):
            write_shard(tmp / name, tensors, args.seed, progress)
            weight_map.update({t: name for t, _ in tensors})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    print(f"{args.out}: {len(shards)} shards, {total / 1e9:.2f} GB, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
