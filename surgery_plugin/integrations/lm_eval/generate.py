"""Write the lm-eval task YAMLs of this folder from :data:`surgery_plugin.evaluation.protocols.PROTOCOLS`.

    python -m surgery_plugin.integrations.lm_eval.generate          # rewrite the YAMLs
    python -m surgery_plugin.integrations.lm_eval.generate --check  # exit 1 when a shipped file differs

The YAMLs are generated so that a protocol's documents, generation length and metrics are written
down once; ``tests/test_lm_eval_tasks.py`` fails when a shipped file differs from what this writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...evaluation.protocols import PROTOCOLS, LmEvalTask, Protocol
from ...io.files import atomic_write

FOLDER = Path(__file__).resolve().parent
_HEADER = (
    "# Generated from surgery_plugin/evaluation/protocols.py by "
    "`python -m surgery_plugin.integrations.lm_eval.generate`; do not edit."
)
_DOC_TO_TEXT = {"advbench": "{{goal}}"}


def _comment(text: str) -> list[str]:
    return [f"# {line}" if line else "#" for line in text.splitlines()]


def _metric_list(task: LmEvalTask) -> list[str]:
    lines = ["metric_list:"]
    for name, higher in task.metrics:
        lines.append(f"  - metric: {name}")
        if task.output_type == "generate_until":
            lines += ["    aggregation: mean", f"    higher_is_better: {str(higher).lower()}"]
    return lines


def _body(protocol: Protocol, task: LmEvalTask) -> list[str]:
    """Everything of a task but its name and metadata."""
    lines = [
        f"custom_dataset: !function hooks.{task.dataset_hook}",
        f"output_type: {task.output_type}",
        "test_split: test",
    ]
    if task.output_type == "loglikelihood_rolling":
        lines += ['doc_to_text: ""', 'doc_to_target: "{{text}}"']
    else:
        until = '["\\n"]' if protocol.stop_at_newline else "[]"
        lines += [
            f'doc_to_text: "{_DOC_TO_TEXT.get(protocol.name, "{{prompt}}")}"',
            'doc_to_target: ""',
            'target_delimiter: ""',
            "generation_kwargs:",
            f"  until: {until}",
            f"  max_gen_toks: {protocol.max_new_tokens}",
            "  do_sample: false",
        ]
    return lines + [f"process_results: !function hooks.{task.results_hook}"] + _metric_list(task)


def _metadata(task: LmEvalTask) -> list[str]:
    return ["metadata:", "  version: 1.0"] + [f"  {k}: {v}" for k, v in task.dataset_kwargs.items()]


def render() -> dict[str, str]:
    """File name -> text of every YAML (and template) this folder ships."""
    files: dict[str, str] = {}
    for protocol in PROTOCOLS.values():
        if not protocol.lm_eval:
            continue
        if protocol.lm_eval_group is None:
            for task in protocol.lm_eval:
                lines = (
                    _comment(task.comment) + [_HEADER, f"task: {task.name}"] + _body(protocol, task) + _metadata(task)
                )
                files[f"{task.name}.yaml"] = "\n".join(lines) + "\n"
            continue
        template = f"_{protocol.name}_template_yaml"  # no .yaml suffix: lm-eval does not index it as a task
        first = protocol.lm_eval[0]
        files[template] = (
            "\n".join(
                [f"# The shared settings of the {protocol.lm_eval_group} tasks.", _HEADER] + _body(protocol, first)
            )
            + "\n"
        )
        for task in protocol.lm_eval:
            lines = _comment(task.comment) + [_HEADER, f"include: {template}", f"task: {task.name}"] + _metadata(task)
            files[f"{task.name}.yaml"] = "\n".join(lines) + "\n"
        group = [
            f"# {protocol.title}: all {len(protocol.lm_eval)} tasks.",
            _HEADER,
            f"group: {protocol.lm_eval_group}",
            "task:",
        ]
        group += [f"  - {task.name}" for task in protocol.lm_eval] + ["metadata:", "  version: 1.0"]
        files[f"_{protocol.lm_eval_group}.yaml"] = "\n".join(group) + "\n"
    return files


def shipped_files() -> set[str]:
    return {p.name for p in FOLDER.iterdir() if p.suffix == ".yaml" or p.name.endswith("_yaml")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args(argv)
    files = render()
    stale = sorted(shipped_files() - set(files))
    differ = sorted(n for n, text in files.items() if not (FOLDER / n).is_file() or (FOLDER / n).read_text() != text)
    if args.check:
        for name in differ + stale:
            print(f"{FOLDER / name}: differs from the protocols", file=sys.stderr)
        return 1 if differ or stale else 0
    for name in stale:
        (FOLDER / name).unlink()
    for name in differ:
        atomic_write(FOLDER / name, files[name])
    print(f"{len(differ)} written, {len(stale)} removed, {len(files) - len(differ)} unchanged in {FOLDER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
