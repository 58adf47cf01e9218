"""Loaders for the behavior data sets.

Each reads its file from the data folder (see :mod:`.paths`); when no data folder exists it falls
back to the public hub copy through ``datasets`` (users with internet). With neither, the error
says how to get one.
"""

from __future__ import annotations

import csv
import gzip
import html
import io
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from ..core.probe import BehaviorData
from ..core.provenance import file_sha256, labeled_texts_sha256
from ..core.statistics import stratified_shuffle
from ..errors import SurgeryError, first_line
from .paths import resolve_data_dir
from .splits import SST2

_MENTION = re.compile(r"@\w+")
_URL = re.compile(r"https?://\S+")
_SPACES = re.compile(r"\s+")


def _data_file(data_dir, relative: str, hub_hint: str) -> Path | None:
    """The local file, None when there is no data folder at all, an error when the folder lacks it."""
    root = resolve_data_dir(data_dir)
    if root is None:
        return None
    path = root / relative
    if not path.exists():
        raise SurgeryError(
            f"missing data file {path} (data folder {root}); add it, "
            f"or unset the folder to use the hub copy {hub_hint}"
        )
    return path


def _from_hub(dataset: str, loader: Callable, *args, **kwargs):
    try:
        import datasets  # noqa: F401
    except ImportError as err:
        raise SurgeryError(
            f"no data folder found (pass --data-dir or set SURGERY_DATA_DIR) and the hub fallback needs "
            f"`pip install datasets` to fetch {dataset}"
        ) from err
    try:
        return loader(*args, **kwargs)
    except Exception as err:  # network, auth, gated data: all one-line errors for the user
        raise SurgeryError(
            f"could not load {dataset} from the hub ({first_line(err)}); pass --data-dir with a local copy"
        ) from err


def read_text(path: Path) -> str:
    """A data file's text: UTF-8, or a one-line error naming the file and the byte."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SurgeryError(f"{path} is not UTF-8 text (byte {err.start})") from err
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise SurgeryError(f"cannot read {path}: {first_line(err)}") from err


def read_csv(path: Path, columns: Sequence[str], delimiter: str = ",") -> list[tuple[int, dict]]:
    """``(line number, row)`` of a CSV/TSV file with a header that has ``columns``; malformed rows named by line."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    if reader.fieldnames is None or not set(columns) <= set(reader.fieldnames):
        raise SurgeryError(f"{path} needs the columns {list(columns)}, found {reader.fieldnames}")
    rows = []
    try:
        for row in reader:
            if any(row.get(c) is None for c in columns):
                raise SurgeryError(f"{path}:{reader.line_num}: a row lacks one of the columns {list(columns)}")
            rows.append((reader.line_num, row))
    except csv.Error as err:
        raise SurgeryError(f"{path}:{reader.line_num}: malformed row ({err})") from err
    return rows


def read_label(value, path: Path, line: int, allowed=(0, 1)) -> int:
    """A class label written as a whole number among ``allowed`` (``1``, ``"1"``), else a one-line error with the
    line; ``"yes"``, ``"0.0"`` and ``2`` are refused, never dropped or guessed."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.lstrip("-").isdigit() or int(text) not in allowed:
        raise SurgeryError(f"{path}:{line}: label {value!r} is not one of {', '.join(map(str, allowed))}")
    return int(text)


def file_digest(path: Path) -> str:
    """The short file digest written into data descriptions (and so into probe metadata)."""
    return file_sha256(path, 16)


def clean_tweet(text: str) -> str:
    """Davidson tweets: unescape HTML, anonymise handles and links, drop the retweet marker."""
    text = html.unescape(text)
    text = _URL.sub("URL", text)
    text = _MENTION.sub("@user", text)
    text = re.sub(r"^(!+\s*)?RT @user:?\s*", "", text.strip())
    return _SPACES.sub(" ", text).strip()


def balanced(texts: list[str], labels: list[int], max_per_class: int | None, seed: int) -> tuple[list[str], list[int]]:
    if max_per_class is None:
        return texts, labels
    keep = sorted(i for idx in stratified_shuffle(labels, seed).values() for i in idx[:max_per_class].tolist())
    return [texts[i] for i in keep], [labels[i] for i in keep]


def load_davidson(data_dir=None, max_per_class: int | None = None, seed: int = 0) -> BehaviorData:
    """Davidson et al. 2017: hate (0) or offensive (1) -> label 1; neither (2) -> label 0."""
    path = _data_file(data_dir, "davidson/labeled_data.csv", "tdavidson/hate_speech_offensive")
    if path is not None:
        rows = [
            (r["tweet"], read_label(r["class"], path, n, (0, 1, 2))) for n, r in read_csv(path, ("tweet", "class"))
        ]
        source = f"davidson:{path.name} sha256:{file_digest(path)}"
    else:

        def hub():
            from datasets import load_dataset

            return [
                (r["tweet"], int(r["class"])) for r in load_dataset("tdavidson/hate_speech_offensive", split="train")
            ]

        rows = _from_hub("tdavidson/hate_speech_offensive", hub)
        source = "davidson:hub:tdavidson/hate_speech_offensive"
    texts = [clean_tweet(t) for t, _ in rows]
    labels = [0 if c == 2 else 1 for _, c in rows]
    keep = [i for i, t in enumerate(texts) if t]
    texts, labels = balanced([texts[i] for i in keep], [labels[i] for i in keep], max_per_class, seed)
    return BehaviorData(texts, labels, f"{source} n={len(texts)} max_per_class={max_per_class} seed={seed}")


def load_toxigen_prompts(data_dir=None, kind: str = "hate", groups: list[str] | None = None) -> dict[str, list[str]]:
    """ToxiGen generation prompts by target group. Each prompt is a '- sentence' list to continue."""
    if kind not in ("hate", "neutral"):
        raise SurgeryError(f"ToxiGen prompt kind must be 'hate' or 'neutral', got '{kind}'")
    root = resolve_data_dir(data_dir)
    if root is None:

        def hub():
            from datasets import load_dataset

            by_group: dict[str, list[str]] = {}
            for r in load_dataset("skg/toxigen-data", name="train", split="train"):
                if (r["prompt_label"] == 1) == (kind == "hate"):
                    by_group.setdefault(r["target_group"], []).append(r["prompt"])
            return {g: sorted(set(p)) for g, p in by_group.items()}

        prompts = _from_hub("skg/toxigen-data", hub)
    else:
        folder = root / "toxigen" / "prompts"
        files = sorted(folder.glob(f"{kind}_*_1k.txt"))
        if not files:
            raise SurgeryError(f"missing ToxiGen prompt files {folder}/{kind}_<group>_1k.txt")
        prompts = {}
        for path in files:
            group = path.name[len(kind) + 1 : -len("_1k.txt")]
            lines = [line.rstrip("\n") for line in read_text(path).splitlines() if line.strip()]
            prompts[group] = [line.replace("\\n", "\n") for line in lines]
    if groups:
        unknown = sorted(set(groups) - set(prompts))
        if unknown:
            raise SurgeryError(f"unknown ToxiGen group(s) {unknown}; available: {', '.join(sorted(prompts))}")
        prompts = {g: prompts[g] for g in groups}
    return prompts


def _read_jsonl(path: Path) -> list[dict]:
    """One JSON object per line (``.gz`` too); a malformed or truncated line is named by its number."""
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise SurgeryError(f"{path}:{number}: not a JSON object ({err.msg})") from err
        if not isinstance(row, dict):
            raise SurgeryError(f"{path}:{number}: not a JSON object")
        rows.append(row)
    return rows


def load_rtp(data_dir=None, subset: str = "toxic") -> list[dict]:
    """RealToxicityPrompts records (``prompt.text``, ``continuation.text`` and Perspective scores).

    ``toxic`` is the challenging subset sample, ``nontoxic`` the non-toxic prompts.
    """
    if subset not in ("toxic", "nontoxic"):
        raise SurgeryError(f"RTP subset must be 'toxic' or 'nontoxic', got '{subset}'")
    path = _data_file(data_dir, f"rtp/{subset}.jsonl", "allenai/real-toxicity-prompts")
    if path is not None:
        return _read_jsonl(path)

    def hub():
        from datasets import load_dataset

        rows = load_dataset("allenai/real-toxicity-prompts", split="train")
        want = subset == "toxic"
        return [dict(r) for r in rows if bool(r["challenging"]) == want]

    return _from_hub("allenai/real-toxicity-prompts", hub)


def load_benign_texts(data_dir=None, limit: int | None = None, start: int = 0) -> list[str]:
    """Held-out benign web text for perplexity: full non-toxic RTP documents (prompt + continuation)."""
    return [d["text"] for d in load_benign_documents(data_dir, limit, start)]


def load_benign_documents(data_dir=None, limit: int | None = None, start: int = 0) -> list[dict]:
    """Non-challenging RTP records as ``{"prompt", "text"}`` (text = prompt + continuation), from ``start``."""
    records = [r for r in load_rtp(data_dir, "nontoxic") if not r.get("challenging")]
    docs = [
        {"prompt": r["prompt"]["text"], "text": (r["prompt"]["text"] + r["continuation"]["text"]).strip()}
        for r in records
    ]
    end = None if limit is None else start + limit
    return docs[start:end]


def load_advbench(data_dir=None) -> list[dict]:
    """AdvBench harmful behaviors: ``goal`` and ``target``."""
    path = _data_file(data_dir, "advbench/harmful_behaviors.csv", "walledai/AdvBench")
    if path is not None:
        return [dict(r) for _, r in read_csv(path, ("goal", "target"))]

    def hub():
        from datasets import load_dataset

        return [{"goal": r["prompt"], "target": r["target"]} for r in load_dataset("walledai/AdvBench", split="train")]

    return _from_hub("walledai/AdvBench", hub)


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _last_exchange(dialogue: str) -> tuple[str, str] | None:
    """``(last human turn, final assistant turn)`` of an HH-RLHF dialogue; None when it does not end with the
    assistant."""
    parts = _HH_TURN.split(dialogue)
    turns = list(zip(parts[1::2], parts[2::2], strict=False))
    if not turns or turns[-1][0] != "Assistant":
        return None
    humans = [text for speaker, text in turns if speaker == "Human"]
    return (humans[-1].strip() if humans else "", turns[-1][1].strip())


def load_hh_rlhf_pairs(data_dir=None) -> list[dict]:
    """Anthropic HH-RLHF harmless-base test pairs as ``{"request", "chosen", "rejected"}``: the last human turn
    and both final assistant replies (the human raters' less harmful reply is ``chosen``). Pairs whose final
    replies are the same text, or whose dialogues do not end with the assistant, are left out."""
    path = _data_file(data_dir, "hh_rlhf/harmless-base-test.jsonl.gz", "Anthropic/hh-rlhf (data_dir harmless-base)")
    if path is not None:
        rows = _read_jsonl(path)
    else:

        def hub():
            from datasets import load_dataset

            return [dict(r) for r in load_dataset("Anthropic/hh-rlhf", data_dir="harmless-base", split="test")]

        rows = _from_hub("Anthropic/hh-rlhf", hub)
    pairs = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
            raise SurgeryError(f"HH-RLHF row {number} lacks the 'chosen' / 'rejected' dialogues")
        chosen, rejected = _last_exchange(row["chosen"]), _last_exchange(row["rejected"])
        if chosen is None or rejected is None or chosen[1] == rejected[1]:
            continue
        pairs.append({"request": chosen[0], "chosen": chosen[1], "rejected": rejected[1]})
    return pairs


INSTRUCTION_SETS = ("harmful_train", "harmful_val", "harmless_train", "harmless_val")


def load_instructions(data_dir=None, name: str = "harmful_train") -> list[str]:
    """Harmful or harmless instructions of andyrdt/refusal_direction's splits (``instructions/<name>.json``)."""
    if name not in INSTRUCTION_SETS:
        raise SurgeryError(f"unknown instruction set '{name}'; sets: {', '.join(INSTRUCTION_SETS)}")
    path = _data_file(data_dir, f"instructions/{name}.json", "andyrdt/refusal_direction dataset/splits")
    if path is None:
        raise SurgeryError(
            "the instruction sets have no hub copy: download andyrdt/refusal_direction's dataset/splits/*.json "
            "into DATA_DIR/instructions/"
        )
    try:
        records = json.loads(read_text(path))
    except ValueError as err:
        raise SurgeryError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(records, list) or not all(isinstance(r, dict) and "instruction" in r for r in records):
        raise SurgeryError(f"{path} is not a list of {{instruction, category}} records")
    return [str(r["instruction"]) for r in records]


def load_safeedit(data_dir=None) -> list[dict]:
    """SafeEdit test records (research use only, CC BY-NC-SA 4.0)."""
    root = resolve_data_dir(data_dir)
    if root is not None:
        files = sorted((root / "safeedit").glob("*.json"))
        if not files:
            raise SurgeryError(f"missing SafeEdit file {root / 'safeedit'}/*.json")
        try:
            records = json.loads(read_text(files[0]))
        except ValueError as err:
            raise SurgeryError(f"{files[0]} is not valid JSON ({err})") from err
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise SurgeryError(f"{files[0]} is not a list of SafeEdit records")
        return records

    def hub():
        from datasets import load_dataset

        return [dict(r) for r in load_dataset("zjunlp/SafeEdit", split="test")]

    return _from_hub("zjunlp/SafeEdit", hub)


SAFEEDIT_GENERAL_KEYS = (
    "test input of only harmful question",
    "test input of other attack prompt input",
    "test input of other question input",
    "test input of other questions and attack prompts",
)


def safeedit_edit_inputs(records: Sequence[dict], prompt_field: str = "adversarial prompt", suffix: str = "") -> dict:
    """SafeEdit records as the inputs of an EasyEdit edit, the one conversion every caller uses: the prompt
    (``prompt_field`` + ``suffix``), ``target_new`` = the safe generation, ``ground_truth`` = the unsafe one,
    ``general_prompt`` = the four generalisation inputs, ``locality_inputs`` = the knowledge constraint."""
    try:
        return {
            "prompts": [r[prompt_field] + suffix for r in records],
            "target_new": [r["safe generation"] for r in records],
            "ground_truth": [r["unsafe generation"] for r in records],
            "general_prompt": [[r["generalization test"][k] + suffix for k in SAFEEDIT_GENERAL_KEYS] for r in records],
            "locality_inputs": {
                "general knowledge constraint": {
                    "prompt": [r["knowledge constrain"]["prompt"] + suffix for r in records],
                    "ground_truth": [r["knowledge constrain"]["answer"] for r in records],
                }
            },
        }
    except (KeyError, TypeError) as err:
        raise SurgeryError(f"a SafeEdit record lacks {err} (not the SafeEdit test format)") from err


def safeedit_requests(records: Sequence[dict]) -> list[dict]:
    """SafeEdit records as EasyEdit requests (``prompt``, ``target_new``, ``ground_truth``): Surgery's request path."""
    inputs = safeedit_edit_inputs(records)
    return [
        {"prompt": p, "target_new": t, "ground_truth": g}
        for p, t, g in zip(inputs["prompts"], inputs["target_new"], inputs["ground_truth"], strict=True)
    ]


def load_toxigen_demonstrations(data_dir=None, groups: Sequence[str] | None = None) -> BehaviorData:
    """ToxiGen's seed statements (``toxigen/demonstrations/``): ``hate_<group>`` -> 1, ``neutral_<group>`` -> 0.

    Implicit hate written politely, which word lists miss. ``groups`` keeps only those target groups;
    a sentence listed under both labels keeps its first (sorted file order), duplicates are dropped.
    """
    root = resolve_data_dir(data_dir)
    if root is None:
        raise SurgeryError(
            "the ToxiGen demonstrations have no hub copy here; pass --data-dir with toxigen/demonstrations/"
        )
    folder = root / "toxigen" / "demonstrations"
    files = sorted(folder.rglob("*.txt")) if folder.is_dir() else []
    if not files:
        raise SurgeryError(f"missing ToxiGen demonstrations {folder}/<category>/(hate|neutral)_<group>*.txt")
    seen: dict[str, tuple[int, str]] = {}
    for path in files:
        kind, _, group = path.stem.partition("_")
        group = group.removesuffix("_sentences")
        if kind not in ("hate", "neutral") or (groups is not None and group not in groups):
            continue
        for line in read_text(path).splitlines():
            text = line.strip().lstrip("- ").strip()
            if text and text not in seen:
                seen[text] = (int(kind == "hate"), group)
    texts = list(seen)
    labels = [label for label, _ in seen.values()]
    found = sorted({g for _, g in seen.values()})  # not every prompt group has demonstrations (women has none)
    which = "all groups" if groups is None else "groups " + ",".join(found)
    if not texts:
        raise SurgeryError(f"no ToxiGen demonstrations for group(s) {sorted(groups or [])}")
    return BehaviorData(
        texts, labels, f"toxigen_demonstrations {which} n={len(texts)} sha256:{labeled_texts_sha256(texts, labels)}"
    )


def load_sst2(data_dir=None, split: str = "dev") -> list[dict]:
    """SST-2 sentences ``{"text", "label"}`` (0 negative, 1 positive) of ``dev`` (872) or ``test`` (1,821)."""
    if split not in ("dev", "test"):
        raise SurgeryError(f"SST-2 split must be 'dev' or 'test', got '{split}'")
    path = _data_file(data_dir, f"sst2/{split}.tsv", "stanfordnlp/sst2")
    if path is not None:
        return [
            {"text": r["content"].strip(), "label": read_label(r["label"], path, n)}
            for n, r in read_csv(path, ("content", "label"), delimiter="\t")
        ]

    def hub():
        from datasets import load_dataset

        rows = load_dataset("stanfordnlp/sst2", split="validation" if split == "dev" else "test")
        return [{"text": r["sentence"].strip(), "label": int(r["label"])} for r in rows]

    return _from_hub("stanfordnlp/sst2", hub)


def sst2_range(data_dir, which: str) -> list[dict]:
    """The SST-2 sentences of one ``SST2`` split entry (``probe``, ``judge``)."""
    split, start, end = SST2[which]
    return load_sst2(data_dir, split)[start:end]
