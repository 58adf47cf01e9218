#!/usr/bin/env bash
# Install EasyEdit (zjunlp/EasyEdit at a pinned commit) and what `import easyeditor` needs into the
# project venv, CPU-safe. `make easyedit` runs it (and `make test` / `make compare` depend on that);
# `make demo` does not need it.
#
#   scripts/install_easyedit.sh [VENV]          VENV: default .venv (made by `make setup`)
#
# Where EasyEdit comes from, first that exists:
#   1. $EASYEDIT_ARCHIVE, default ../shared/vendor/EasyEdit-<short commit>.tar.gz beside the checkout
#      (EasyEdit's git checkout at that commit, as an archive; MIT);
#   2. git: $EASYEDIT_GIT_URL (default https://github.com/zjunlp/EasyEdit.git) at $EASYEDIT_COMMIT.
# With neither it says so, installs nothing and exits 0: the tests that need EasyEdit are then skipped
# with that reason, and `surgery compare` runs the methods that do not need it (surgery, prompt).
#
# EasyEdit has no packaging metadata (no setup.py / pyproject.toml), so its source goes to
# VENV/src/EasyEdit-<commit> and a .pth file puts it on the venv's path. Its requirements.txt is not
# used: it pins torch==2.9.1 (a multi-GB CUDA build from PyPI on Linux) and older transformers/peft.
# Instead the packages `import easyeditor` imports are installed with constraints-easyedit.txt and
# the project's constraints.txt, which keep torch at the CPU build `make setup` installed.
#
# torchvision: from the PyTorch CPU index where it is reachable (a CPU build); elsewhere PyPI's,
# a CUDA build whose compiled ops cannot load next to a CPU torch, and then `import torchvision`
# (which transformers does whenever torchvision is installed) fails. In that case a .pth hook
# (surgery_plugin/integrations/easyedit/torchvision_guard.py) declares the two missing op schemas just before the
# first `import torchvision` in this venv; text models never call them.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv}"
EASYEDIT_COMMIT="${EASYEDIT_COMMIT:-14cea8245f06715684592ab55184939b99d70784}"
SHORT="${EASYEDIT_COMMIT:0:12}"
EASYEDIT_ARCHIVE="${EASYEDIT_ARCHIVE:-$REPO/../shared/vendor/EasyEdit-$SHORT.tar.gz}"
EASYEDIT_GIT_URL="${EASYEDIT_GIT_URL:-https://github.com/zjunlp/EasyEdit.git}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}"
STAMP="$VENV/.easyedit-installed"

PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    echo "error: no venv at $VENV; run \`make setup\` first" >&2
    exit 2
fi
VENV="$(cd "$VENV" && pwd)"
PY="$VENV/bin/python"
SRC="$VENV/src/EasyEdit-$SHORT"

# 1. the source
if [ ! -f "$SRC/easyeditor/__init__.py" ]; then
    mkdir -p "$VENV/src"
    TMP="$(mktemp -d "$VENV/src/.easyedit-XXXXXX")"
    trap 'rm -rf "$TMP"' EXIT
    if [ -f "$EASYEDIT_ARCHIVE" ]; then
        echo "EasyEdit $SHORT: from $EASYEDIT_ARCHIVE"
        tar -xzf "$EASYEDIT_ARCHIVE" -C "$TMP"
        ROOT="$(find "$TMP" -mindepth 2 -maxdepth 2 -name easyeditor -type d | head -n 1)"
        ROOT="${ROOT%/easyeditor}"
    elif command -v git > /dev/null; then
        echo "EasyEdit $SHORT: no $EASYEDIT_ARCHIVE; fetching $EASYEDIT_GIT_URL at $EASYEDIT_COMMIT"
        ROOT="$TMP/EasyEdit"
        git init -q "$ROOT"
        git -C "$ROOT" fetch -q --depth 1 "$EASYEDIT_GIT_URL" "$EASYEDIT_COMMIT"
        git -C "$ROOT" checkout -q FETCH_HEAD
    else
        echo "EasyEdit not installed: neither $EASYEDIT_ARCHIVE nor git is available." \
            "Tests that need EasyEdit are skipped; surgery compare runs surgery and prompt only." >&2
        exit 0
    fi
    if [ -z "$ROOT" ] || [ ! -f "$ROOT/easyeditor/__init__.py" ]; then
        echo "error: no easyeditor/__init__.py in the EasyEdit source ($EASYEDIT_ARCHIVE / $EASYEDIT_GIT_URL)" >&2
        exit 1
    fi
    rm -rf "$SRC"
    mv "$ROOT" "$SRC"
fi

# 2. what `import easyeditor` imports, pinned; torchvision preferably from the PyTorch CPU index
PIP=("$PY" -m pip install -q -c "$REPO/constraints.txt" -c "$REPO/constraints-easyedit.txt")
PACKAGES=(av einops fairscale higher hydra-core iopath omegaconf openai opencv-python-headless qwen-vl-utils rouge
    timm zhipuai)
if [ -n "$TORCH_CPU_INDEX" ] && ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torchvision") is None)'; then
    "${PIP[@]}" --timeout 20 --retries 0 --extra-index-url "$TORCH_CPU_INDEX" torchvision || true
fi
"${PIP[@]}" torchvision "${PACKAGES[@]}"

# 3. EasyEdit's source on the venv's path
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$SRC" > "$SITE/easyedit.pth"

# 4. the torchvision guard, only where a plain `import torchvision` fails: the package's
#    integrations/easyedit/torchvision_guard.py linked in as a top-level module, and a .pth line that installs it
GUARD_PTH="$SITE/surgery_torchvision_guard.pth"
GUARD_MODULE="$SITE/_surgery_torchvision_guard.py"
rm -f "$GUARD_PTH" "$GUARD_MODULE"
if ! "$PY" -c 'import torchvision' > /dev/null 2>&1; then
    GUARD="$("$PY" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("surgery_plugin").origin).parent / "integrations" / "easyedit" / "torchvision_guard.py")')"
    echo "torchvision's compiled ops do not load with this torch (a CUDA build next to a CPU torch): installing $GUARD_PTH"
    ln -s "$GUARD" "$GUARD_MODULE"
    echo "import _surgery_torchvision_guard; _surgery_torchvision_guard.install()" > "$GUARD_PTH"
fi

# 5. check, outside the checkout (EasyEdit's editors write ./logs): transformers, EasyEdit, Surgery registered
CHECK_DIR="$(mktemp -d)"
(cd "$CHECK_DIR" && "$PY" -W ignore -c '
import logging
logging.disable(logging.INFO)
from transformers import LlamaConfig  # fails when torchvision is installed but cannot import
import surgery_plugin.integrations.easyedit as se
se.register()
from easyeditor.util import alg_dict
for name in ("DINM", "ROME", "FT", "Surgery"):
    assert name in alg_dict.ALG_DICT, name
print("EasyEdit OK:", se.easyeditor_modules().location)
')
rm -rf "$CHECK_DIR"
touch "$STAMP"
