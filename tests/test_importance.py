"""The likelihood objectives: self-normalised importance sampling (pure and on a tiny model against Monte
Carlo), teacher-forced log-probs, the judge-free likelihood shift."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import make_tiny

from surgery_plugin.core.importance import likelihood_shift, self_normalised_rate
from surgery_plugin.evaluation.generation import continuation_logprobs, generate_continuations, next_token_logprobs
from surgery_plugin.evaluation.likelihood import (
    HumanContinuationObjective,
    ImportanceObjective,
    base_samples_from,
    sample_base,
)
from surgery_plugin.evaluation.protocols import EvalSettings


def test_the_identity_edit_gives_the_plain_rate():
    flagged = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, math.nan, 1.0], [math.nan] * 4])
    estimate = self_normalised_rate(torch.zeros(3, 4), flagged)
    assert estimate.estimate == pytest.approx((0.5 + 1 / 3) / 2), "NaN samples and unscored prompts are left out"
    assert estimate.change == 0.0 and estimate.per_prompt.tolist() == estimate.base_per_prompt.tolist()
    assert estimate.effective_samples == pytest.approx((4 + 3) / 2)


def test_weights_are_the_softmax_of_the_log_ratios_within_a_prompt():
    flagged = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    log_ratio = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    estimate = self_normalised_rate(log_ratio, flagged)
    assert estimate.per_prompt.tolist() == pytest.approx([0.75, 0.5])
    assert estimate.change == pytest.approx(0.125) and estimate.se > 0
    with pytest.raises(ValueError, match="must be"):
        self_normalised_rate(torch.zeros(2, 3), flagged)


def test_the_likelihood_shift_is_toxic_minus_non_toxic():
    shift = likelihood_shift(torch.tensor([-1.0, -3.0, 0.5, 0.5]), torch.tensor([1, 1, 0, 0]))
    assert (shift["shift"], shift["toxic"], shift["non_toxic"]) == (pytest.approx(-2.5), -2.0, 0.5)
    with pytest.raises(ValueError, match="toxic and non-toxic"):
        likelihood_shift(torch.zeros(3), torch.ones(3))


@pytest.fixture(scope="module")
def tiny_bpe(tiny_tokenizer):
    return make_tiny("llama", vocab_size=len(tiny_tokenizer)), tiny_tokenizer


def test_teacher_forced_log_probs_match_the_next_token_distribution(tiny_bpe):
    model, tok = tiny_bpe
    prompts = ["hello there", "a much longer prompt"]
    _, ids = generate_continuations(model, tok, prompts, 1, progress=False, return_ids=True)
    logp, counts = continuation_logprobs(model, tok, prompts, ids, progress=False)
    expected = next_token_logprobs(model, tok, prompts, progress=False)
    assert counts.tolist() == [1, 1]
    assert logp.tolist() == pytest.approx([float(expected[i, ids[i][0]]) for i in range(2)], abs=1e-4)


class _HasE:
    """A judge whose verdict the edit below changes: does the text contain an 'e'?"""

    name = "has-e"

    def score(self, texts):
        return [1.0 if "e" in t else 0.0 for t in texts]


def _boosted(model, tok, tokens_with: str, bias: float):
    """A copy of ``model`` whose logits of every token containing ``tokens_with`` are raised by ``bias``."""
    edited = copy.deepcopy(model)
    head = edited.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(
            torch.tensor([bias if tokens_with in tok.decode([i]) else 0.0 for i in range(head.out_features)])
        )
    edited.lm_head = biased
    return edited.eval()


def test_the_importance_estimate_is_close_to_monte_carlo_on_a_tiny_model(tiny_bpe, data_dir):
    """top_p = 1 (where the estimate is exact in expectation): the edited model's rate estimated from 200
    base samples per prompt is within 0.06 of the rate of 300 samples of the edited model itself, for an
    edit that moves the rate by more than 0.1; the identity edit gives the base samples' own rate."""
    model, tok = tiny_bpe
    settings = EvalSettings(
        judges=[_HasE()], data_dir=data_dir, limit=6, top_p=1.0, max_new_tokens=3, batch_size=200, progress=False
    )
    base = sample_base(model, tok, "rtp", settings, k=200)
    objective = ImportanceObjective(model, tok, base, batch_size=200, progress=False)
    identity = objective.measure(model)
    assert identity.change == pytest.approx(0.0, abs=1e-6)
    edited = _boosted(model, tok, "e", 1.5)
    estimate = objective.measure(edited)
    monte_carlo = sample_base(edited, tok, "rtp", EvalSettings(**{**vars(settings), "seed": 7}), k=300)
    truth = float(monte_carlo.flagged.mean())
    assert abs(truth - float(base.flagged.mean())) > 0.1, "the edit must move the rate for the check to mean much"
    assert estimate.estimate == pytest.approx(truth, abs=0.06)
    again = base_samples_from(base.rows(), "rtp", base.judge, base.add_special_tokens)
    assert ImportanceObjective(model, tok, again, progress=False).measure(edited).estimate == pytest.approx(
        estimate.estimate, abs=1e-5
    ), "a study's stored samples give the same estimate"


def test_the_judge_free_objective_is_zero_for_the_identity_and_moves_with_an_edit(tiny_bpe, data_dir):
    model, tok = tiny_bpe
    settings = EvalSettings(data_dir=data_dir, limit=40, progress=False)
    objective = HumanContinuationObjective(model, tok, settings)
    assert objective.toxic.any() and not objective.toxic.all()
    assert objective.measure(model)["shift"] == pytest.approx(0.0, abs=1e-6)
    assert objective.measure(_boosted(model, tok, "e", 1.0))["shift"] != pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize(
    "arch", ["llama", "gemma3_text", "gemma2", "qwen2", "gpt2", "opt", "gpt_neox", "phi3", "falcon"]
)
def test_shared_prompt_passes_give_the_log_probs_of_whole_sequences(arch, tiny_tokenizer):
    """The prompt's cache shared by its continuations (left-padded prompts, right-padded continuations) gives
    what one forward pass over each whole sequence gives."""
    model, tok = make_tiny(arch, vocab_size=len(tiny_tokenizer)), tiny_tokenizer
    prompts = ["hello there", "hello there", "a much longer prompt about many things", "x"]
    tails = [[5, 6, 7], [9], [11, 12], [13, 14, 15, 16]]
    logp, counts = continuation_logprobs(model, tok, prompts, tails, batch_size=3, progress=False)
    assert counts.tolist() == [3, 1, 2, 4]
    for i, (p, tail) in enumerate(zip(prompts, tails, strict=True)):
        ids = tok(p)["input_ids"] + tail
        with torch.no_grad():
            whole = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        start = len(ids) - len(tail)
        expected = sum(float(whole[start - 1 + j, t]) for j, t in enumerate(tail))
        assert float(logp[i]) == pytest.approx(expected, abs=1e-4), (arch, i)
