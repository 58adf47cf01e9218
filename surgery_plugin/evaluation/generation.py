"""Batched generation (left padding, greedy or seeded sampling) and perplexity: the model calls of every harness."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..core.batching import length_sorted_batches, pad, pad_id
from ..core.importance import kl_divergence
from ..errors import SurgeryError
from .journal import active_journal, batch_key


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def format_prompts(
    tokenizer, prompts: Sequence[str], chat: bool | None = None, system: str | None = None
) -> tuple[list[str], bool]:
    """Wrap each prompt as one user turn when the model is a chat model (``chat=None``: when it has a template),
    after a ``system`` turn when one is given.

    Returns the texts and whether the template was applied, so results can say which protocol ran.
    """
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    if not use_chat:
        return list(prompts), False
    if not has_chat_template(tokenizer):
        raise SurgeryError(
            "--chat-template on needs a tokenizer with a chat template; this one has none (use --chat-template off)"
        )
    turns = [{"role": "system", "content": system}] if system else []
    texts = [
        tokenizer.apply_chat_template(
            turns + [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    return texts, True


def instruction_prefix(tokenizer, instruction: str) -> str:
    """Text that gives a completion-style prompt an instruction: a system turn of the chat template when the
    tokenizer has one (without the BOS the tokenizer adds itself), else the instruction and a blank line."""
    if has_chat_template(tokenizer):
        try:
            text = tokenizer.apply_chat_template([{"role": "system", "content": instruction}], tokenize=False)
        except Exception:  # templates that refuse a lone system turn
            text = ""
        if instruction in text:
            bos = getattr(tokenizer, "bos_token", None)
            adds_bos = bool(tokenizer("a")["input_ids"][:1] == [getattr(tokenizer, "bos_token_id", None)])
            return text[len(bos) :] if bos and adds_bos and text.startswith(bos) else text
    return instruction + "\n\n"


def _with_prefix(tokenizer, ids: list[int], prefix_ids: list[int]) -> tuple[list[int], int]:
    """``prefix_ids`` inserted after a leading BOS of ``ids``; returns the ids and the position of ``ids[1]``."""
    lead = 1 if ids and ids[0] == getattr(tokenizer, "bos_token_id", None) and len(prefix_ids) else 0
    return ids[:lead] + prefix_ids + ids[lead:], len(prefix_ids) + 1


def _prefix_ids(tokenizer, prefix: str | None) -> list[int]:
    return list(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else []


_NEWLINE_IDS: dict[tuple, torch.Tensor] = {}


def _newline_token_ids(tokenizer) -> torch.Tensor:
    """Ids whose text contains a newline: generation for a row may stop once it has produced one."""
    try:
        vocab = len(tokenizer)  # HF: base vocabulary + added tokens
    except TypeError:
        vocab = int(getattr(tokenizer, "vocab_size", 0) or 0)
    # id() alone could be reused by another tokenizer after garbage collection; the name and size make a clash unlikely
    key = (id(tokenizer), getattr(tokenizer, "name_or_path", ""), vocab)
    if key not in _NEWLINE_IDS:
        ids = [i for i in range(vocab) if "\n" in tokenizer.decode([i], skip_special_tokens=True)]
        _NEWLINE_IDS[key] = torch.tensor(ids, dtype=torch.long)
    return _NEWLINE_IDS[key]


class _StopAtNewline:
    """Stopping criterion: a row is done once any of its new tokens contains a newline (saves the wasted steps)."""

    def __init__(self, newline_ids: torch.Tensor, prompt_width: int):
        self.newline_ids = newline_ids
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **_) -> torch.Tensor:
        new = input_ids[:, self.prompt_width :]
        if new.shape[1] == 0 or self.newline_ids.numel() == 0:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return torch.isin(new, self.newline_ids.to(new.device)).any(dim=1)


def _encode(tokenizer, prompts: Sequence[str], max_prompt_tokens: int, add_special_tokens: bool) -> list[list[int]]:
    """Token ids per prompt, keeping the *last* ``max_prompt_tokens``: the end of a prompt is what gets continued."""
    encoded = []
    for p in prompts:
        ids = (
            tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
            if add_special_tokens is not None
            else tokenizer(p)["input_ids"]
        )
        ids = list(ids)[-max_prompt_tokens:] or [tokenizer.eos_token_id]
        encoded.append(ids)
    return encoded


def sample_seed(seed: int, text: str, sample: int) -> int:
    """The random stream of one sampled continuation: fixed by the run's seed, the prompt's text and the
    sample's index, so it does not depend on the batch size, the prompt order or the model being sampled."""
    digest = hashlib.sha256(f"{seed}\0{sample}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def nucleus_mask(probs: torch.Tensor, top_p: float, heads: Sequence[int] = (64, 1024)) -> torch.Tensor:
    """Each row's nucleus: the tokens, most probable first, before whose position the mass has not reached ``top_p``.

    A full sort of a 50k vocabulary costs as much per step as a small model's forward pass; the nucleus of a
    language model usually lies in its first few dozen tokens. So each row's most probable ``heads[0]`` tokens
    are sorted first; a row whose head already reaches ``top_p`` is decided (every token beyond it has at least
    that mass before it), the others try the next head size, and the full sort is the last resort.
    """
    keep = torch.zeros_like(probs, dtype=torch.bool)
    todo = torch.arange(probs.shape[0], device=probs.device)
    vocab = probs.shape[-1]
    for size in [*(h for h in heads if h < vocab), vocab]:
        head, index = probs[todo].topk(size, dim=-1)  # sorted, largest first
        mass = head.cumsum(dim=-1)
        decided = (mass[:, -1] >= top_p) | (size == vocab)
        inside = (mass - head) < top_p
        rows = todo[decided]
        keep[rows] = keep[rows].scatter(-1, index[decided], inside[decided])
        todo = todo[~decided]
        if todo.numel() == 0:
            break
    return keep


class CoupledNucleusSampler:
    """Nucleus sampling (``top_p``, ``temperature``) by the Gumbel-max trick, one noise stream per row.

    A logits processor for greedy decoding: it keeps the smallest set of tokens whose probability reaches
    ``top_p``, adds Gumbel noise drawn from the row's own generator and leaves only the argmax, so greedy
    decoding picks an exact nucleus sample. Two models sampled with the same row seeds read the same noise
    at every step (common random numbers): where the edit leaves a step's distribution as it was, both arms
    draw the same token, and the paired comparison measures the edit, not the sampling noise.
    """

    def __init__(self, row_seeds: Sequence[int], top_p: float = 0.9, temperature: float = 1.0):
        if not 0.0 < top_p <= 1.0 or temperature <= 0:
            raise SurgeryError(f"sampling needs 0 < top_p <= 1 and temperature > 0 (got {top_p}, {temperature})")
        self.generators = [torch.Generator().manual_seed(int(s)) for s in row_seeds]
        self.top_p, self.temperature = top_p, temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature
        logits = logits.masked_fill(~nucleus_mask(logits.softmax(dim=-1), self.top_p), float("-inf"))
        uniform = torch.stack([torch.rand(logits.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        choice = (logits + gumbel.to(logits.device)).argmax(dim=-1)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(out.shape[0], device=out.device), choice] = 0.0
        return out


@torch.no_grad()
def generate_continuations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 20,
    batch_size: int = 16,
    stop_at_newline: bool = False,
    max_prompt_tokens: int = 2048,
    progress: bool = True,
    desc: str = "generate",
    num_samples: int = 1,
    seed: int | None = None,
    top_p: float = 0.9,
    temperature: float = 1.0,
    add_special_tokens: bool | None = None,
    return_ids: bool = False,
) -> list[str] | list[list[str]] | tuple[list, list]:
    """Continuations (new text only), in the order of ``prompts``; with ``return_ids`` also the token ids of
    each (up to and including an end-of-sequence token, or the newline token where the run stops at one).

    ``num_samples=1`` (default): greedy, one string per prompt. ``num_samples=k > 1``: nucleus
    sampling (``top_p``, ``temperature``; Gehman et al.'s protocol for expected maximum toxicity uses
    k = 25, top_p = 0.9), a list of k strings per prompt. Sample j of a prompt reads the noise stream
    :func:`sample_seed` (``seed``, prompt, j) through :class:`CoupledNucleusSampler`: the same samples
    whatever the batch size or order, and two models sampled with one seed are coupled sample by sample.

    Prompts are sorted by length and left-padded by hand so every batch carries little padding
    and the tokenizer's own padding side is left alone. A batch of sampled prompts holds
    ``batch_size // k`` prompts (at least one) times their k samples.
    """
    encoded = _encode(tokenizer, prompts, max_prompt_tokens, add_special_tokens)
    sampling = num_samples > 1
    per_batch = max(1, batch_size // num_samples) if sampling else batch_size
    outputs: list = [None] * len(prompts)
    id_outputs: list = [None] * len(prompts)
    newline_ids = _newline_token_ids(tokenizer) if stop_at_newline else None
    decoding = dict(
        max_new_tokens=max_new_tokens,
        top_p=top_p if sampling else None,
        temperature=temperature if sampling else None,
        stop_at_newline=stop_at_newline,
        return_ids=return_ids,
    )
    journal = active_journal()  # an arm being measured keeps its finished batches for a resume
    was_training = model.training
    model.eval()
    try:
        for batch in length_sorted_batches([len(ids) for ids in encoded], per_batch, desc=desc, progress=progress):
            rows = [encoded[i] for i in batch for _ in range(num_samples)]
            seeds = None
            if sampling:
                seeds = [sample_seed(seed or 0, prompts[i], j) for i in batch for j in range(num_samples)]
            key = batch_key(rows, seeds=seeds, **decoding) if journal is not None else ""
            kept = journal.replay(key) if journal is not None else None
            if kept is not None:
                texts, new_ids = kept["texts"], kept["ids"]
            else:
                texts, new_ids = _generate_batch(model, tokenizer, rows, seeds, newline_ids, **decoding)
                if journal is not None:
                    journal.record(key, texts, new_ids)
            for row, i in enumerate(batch):
                outputs[i] = texts[row * num_samples : (row + 1) * num_samples] if sampling else texts[row]
                if return_ids:
                    id_outputs[i] = new_ids[row * num_samples : (row + 1) * num_samples] if sampling else new_ids[row]
    finally:
        model.train(was_training)
    return (outputs, id_outputs) if return_ids else outputs


def _generate_batch(
    model: nn.Module,
    tokenizer,
    rows: list[list[int]],
    seeds: list[int] | None,
    newline_ids: torch.Tensor | None,
    max_new_tokens: int,
    top_p: float | None,
    temperature: float | None,
    stop_at_newline: bool,
    return_ids: bool,
) -> tuple[list[str], list[list[int]] | None]:
    """One batch of :func:`generate_continuations`: the rows left-padded, decoded greedily (or, with ``seeds``,
    nucleus-sampled one noise stream per row), as texts and, with ``return_ids``, each row's own new token ids."""
    pad_token = pad_id(tokenizer)
    input_ids, mask = pad(rows, pad_token, "left")
    width = input_ids.shape[1]
    kwargs: dict = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if seeds is not None:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList(
            [CoupledNucleusSampler(seeds, top_p=top_p, temperature=temperature)]
        )
    if newline_ids is not None:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopAtNewline(newline_ids, width)])
    device = _device(model)
    generated = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token,
        **kwargs,
    )
    texts = [tokenizer.decode(generated[r, width:], skip_special_tokens=True) for r in range(generated.shape[0])]
    if stop_at_newline:
        texts = [t.split("\n")[0] for t in texts]
    if not return_ids:
        return texts, None
    # where a row's own tokens end: its first end-of-sequence or newline token
    ends = {getattr(tokenizer, "eos_token_id", None), *(newline_ids.tolist() if newline_ids is not None else [])}
    return texts, [_row_ids(generated[r, width:].tolist(), ends) for r in range(len(texts))]


def _row_ids(ids: list[int], ends: set) -> list[int]:
    """A generated row's own tokens: up to and including the first token of ``ends``."""
    for n, token in enumerate(ids):
        if token in ends:
            return ids[: n + 1]
    return ids


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 8,
    max_length: int = 256,
    progress: bool = True,
    prefix: str | None = None,
) -> dict:
    """Token-level perplexity over ``texts`` (each scored on its own, truncated to ``max_length`` tokens), and
    ``per_text``: each scored text's ``(index in texts, summed NLL, scored tokens)``, for comparisons by document.

    ``prefix``: text read before each one (an instruction); the same tokens are scored as without it.
    """
    encoded = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    kept = [i for i, ids in enumerate(encoded) if len(ids) >= 2]
    encoded = [encoded[i] for i in kept]
    prefix_ids = _prefix_ids(tokenizer, prefix)
    first_scored = [1] * len(encoded)  # position of each sequence's first scored token
    if prefix_ids:
        pairs = [_with_prefix(tokenizer, ids, prefix_ids) for ids in encoded]
        encoded, first_scored = [p[0] for p in pairs], [p[1] for p in pairs]
    device = _device(model)
    text_nll, text_tokens = [0.0] * len(encoded), [0] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for batch in length_sorted_batches(
            [len(ids) for ids in encoded], batch_size, desc="perplexity", progress=progress
        ):
            input_ids, mask = pad([encoded[i] for i in batch], pad_id(tokenizer), "right")
            logits = model(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False
            ).logits.float()
            targets = input_ids[:, 1:].to(device)
            nll = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
            target_mask = mask[:, 1:].clone()
            for row, i in enumerate(batch):
                target_mask[row, : first_scored[i] - 1] = 0
            target_mask = target_mask.to(device).float()
            for row, i in enumerate(batch):
                text_nll[i] = float((nll[row] * target_mask[row]).sum())
                text_tokens[i] = int(target_mask[row].sum())
    finally:
        model.train(was_training)
    total_tokens = sum(text_tokens)
    return {
        "token_perplexity": math.exp(sum(text_nll) / max(total_tokens, 1)),
        "n_tokens": total_tokens,
        "n_texts": len(encoded),
        "per_text": list(zip(kept, text_nll, text_tokens, strict=True)),
    }


@torch.no_grad()
def next_token_logprobs(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int = 16,
    max_length: int = 256,
    progress: bool = True,
    desc: str = "next-token",
    prefix: str | None = None,
) -> torch.Tensor:
    """``log P(next token | prompt)`` for each prompt, (len(prompts), vocab) float32, in the order of ``prompts``.

    Right-padded (so positions are not shifted) and read at each prompt's last real token.
    ``prefix``: text read before each prompt (an instruction).
    """
    encoded = [
        tokenizer(p, truncation=True, max_length=max_length)["input_ids"] or [tokenizer.eos_token_id] for p in prompts
    ]
    prefix_ids = _prefix_ids(tokenizer, prefix)
    if prefix_ids:
        encoded = [_with_prefix(tokenizer, ids, prefix_ids)[0] for ids in encoded]
    device = _device(model)
    out: torch.Tensor | None = None
    was_training = model.training
    model.eval()
    try:
        for batch in length_sorted_batches([len(ids) for ids in encoded], batch_size, desc=desc, progress=progress):
            input_ids, mask = pad([encoded[i] for i in batch], pad_id(tokenizer), "right")
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            last = logits[torch.arange(len(batch), device=logits.device), (mask.sum(1) - 1).to(logits.device)].float()
            logprobs = torch.log_softmax(last, dim=-1).cpu()
            if out is None:
                out = torch.empty(len(prompts), logprobs.shape[-1], dtype=torch.float32)
            out[batch] = logprobs
    finally:
        model.train(was_training)
    return out if out is not None else torch.empty(0, 0)


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str | Sequence[int]],
    batch_size: int = 16,
    max_prompt_tokens: int = 2048,
    add_special_tokens: bool | None = None,
    progress: bool = True,
    desc: str = "teacher-forced",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing: ``log p(continuation | prompt)`` (summed over its tokens) and its number of tokens, per
    pair, in order. Prompts are encoded as :func:`generate_continuations` encodes them (same truncation, same
    special tokens); a continuation is its token ids (``return_ids``: exactly what was sampled) or a text,
    encoded without special tokens.

    Each distinct prompt is read once per batch (its key/value cache is shared by all its continuations), so K
    continuations of a long prompt cost one prompt pass, not K."""
    if len(prompts) != len(continuations):
        raise SurgeryError(f"{len(prompts)} prompts for {len(continuations)} continuations")
    distinct = list(dict.fromkeys(prompts))
    encoded = dict(zip(distinct, _encode(tokenizer, distinct, max_prompt_tokens, add_special_tokens), strict=True))
    tails = [
        (list(tokenizer(c, add_special_tokens=False)["input_ids"]) if c else []) if isinstance(c, str) else list(c)
        for c in continuations
    ]
    pairs_of: dict[str, list[int]] = {p: [] for p in distinct}
    for i, p in enumerate(prompts):
        if tails[i]:
            pairs_of[p].append(i)
    logp = torch.zeros(len(prompts), dtype=torch.float64)
    counts = torch.tensor([len(c) for c in tails], dtype=torch.long)
    device, pad_token = _device(model), pad_id(tokenizer)
    per_prompt = max(1, max(len(v) for v in pairs_of.values()))
    prompt_batch = max(1, batch_size // per_prompt)  # rows of the continuation pass: about batch_size
    was_training = model.training
    model.eval()
    try:
        for batch in length_sorted_batches(
            [len(encoded[p]) for p in distinct], prompt_batch, desc=desc, progress=progress
        ):
            chosen = [distinct[b] for b in batch if pairs_of[distinct[b]]]
            if not chosen:
                continue
            prompt_ids, prompt_mask = pad([encoded[p] for p in chosen], pad_token, "left")
            out = model(
                input_ids=prompt_ids.to(device),
                attention_mask=prompt_mask.to(device),
                position_ids=(prompt_mask.cumsum(-1) - 1).clamp_min(0).to(device),
                use_cache=True,
            )
            rows = [(r, i) for r, p in enumerate(chosen) for i in pairs_of[p]]
            index = torch.tensor([r for r, _ in rows], device=device)
            cache = out.past_key_values
            cache.reorder_cache(index)  # each prompt's cache, once per continuation of it
            first_logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1).index_select(0, index)
            tail_ids, tail_mask = pad([tails[i] for _, i in rows], pad_token, "right")
            mask = torch.cat([prompt_mask.index_select(0, index.cpu()), tail_mask], dim=1)
            positions = prompt_mask.sum(-1).index_select(0, index.cpu()).unsqueeze(1) + torch.arange(tail_ids.shape[1])
            logits = model(
                input_ids=tail_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                past_key_values=cache,
                use_cache=True,
            ).logits
            predicted = torch.cat([first_logp.unsqueeze(1), torch.log_softmax(logits[:, :-1].float(), dim=-1)], 1)
            token_logp = predicted.gather(-1, tail_ids.to(device).unsqueeze(-1)).squeeze(-1).cpu().double()
            for row, (_, i) in enumerate(rows):
                logp[i] = token_logp[row, : len(tails[i])].sum()
    finally:
        model.train(was_training)
    return logp, counts


def has_active_adapter(model: nn.Module) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and bool(getattr(model, "peft_config", None))


def first_token_kl(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int = 16,
    reference: torch.Tensor | None = None,
    progress: bool = True,
    prefix: str | None = None,
) -> torch.Tensor:
    """Per prompt ``KL(P_unedited || P_edited)`` of the next-token distribution after the prompt.

    The unedited distribution is ``reference`` (:func:`next_token_logprobs` of the model before
    an in-place edit) or, for a PEFT model, the same model with its adapters switched off.
    With ``prefix`` (an instruction read before each prompt) the edited distribution is the
    prefixed one, and without a reference the unedited one is the same model without the prefix.
    """
    if reference is None and prefix and not has_active_adapter(model):
        reference = next_token_logprobs(model, tokenizer, prompts, batch_size, progress=progress, desc="kl: unedited")
    if reference is None:
        if not has_active_adapter(model):
            raise SurgeryError(
                "the kl suite needs the edit as a PEFT adapter (switched off for the reference) "
                "or log-probs of the unedited model (EvalSettings.kl_reference)"
            )
        with model.disable_adapter():
            reference = next_token_logprobs(
                model, tokenizer, prompts, batch_size, progress=progress, desc="kl: unedited"
            )
    elif reference.shape[0] != len(prompts):
        raise SurgeryError(
            f"kl reference has {reference.shape[0]} rows for {len(prompts)} prompts; compute it on the same prompts"
        )
    edited = next_token_logprobs(
        model, tokenizer, prompts, batch_size, progress=progress, desc="kl: edited", prefix=prefix
    )
    return kl_divergence(reference, edited)
