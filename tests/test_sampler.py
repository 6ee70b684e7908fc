"""Next-token sampling (model.sampler): greedy picks argmax's token, ties included, and a row with
a NaN or infinite score is reported bad without a finite neighbour being touched."""

from __future__ import annotations

import math

import pytest
import torch

from model.sampler import SamplingRow, greedy, non_finite_rows, sample

VOCAB = 49152  # SmolLM2's vocabulary: the size the fast paths were measured at


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax_and_takes_the_first_of_tied_scores(dtype):
    torch.manual_seed(0)
    scores = torch.randn(6, VOCAB).to(dtype)
    scores[1, 5] = scores[1, 40000] = 100.0  # a tie: the first index wins, as with argmax
    scores[2, :] = 0.0  # all tied
    scores[3, -1] = 100.0  # the last token
    picked = greedy(scores)
    assert picked.tolist() == scores.argmax(-1).tolist()
    assert picked[1].item() == 5 and picked[2].item() == 0 and picked[3].item() == VOCAB - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_with_a_nan_or_infinite_score_are_bad_and_only_those(dtype):
    logits = torch.randn(7, VOCAB).to(dtype)
    logits[1, 17] = math.nan
    logits[2, 0] = math.inf
    logits[3, -1] = -math.inf
    logits[4, 3], logits[4, 9] = math.inf, -math.inf  # sum NaN
    big = torch.finfo(dtype).max
    logits[5, :4] = big  # every score finite, their sum past float32's range: not bad
    logits[6, :4] = -big
    assert non_finite_rows(logits).tolist() == [False, True, True, True, True, False, False]
    assert not non_finite_rows(torch.randn(3, VOCAB).to(dtype)).any()


def test_sample_reports_bad_rows_and_picks_greedy_tokens_for_the_others():
    torch.manual_seed(1)
    logits = torch.randn(4, VOCAB)
    logits[2, 100] = math.nan
    rows = [SamplingRow(0.0, 1.0, None)] * 4
    out = sample(logits, rows)
    assert out.bad.tolist() == [False, False, True, False]
    good = [0, 1, 3]
    assert out.tokens[good].tolist() == logits[good].argmax(-1).tolist()


def test_a_seeded_row_draws_the_same_token_whatever_its_neighbours():
    torch.manual_seed(2)
    logits = torch.randn(3, VOCAB) * 3
    seeded = lambda: SamplingRow(0.8, 0.9, torch.Generator().manual_seed(7))  # noqa: E731
    alone = sample(logits[1:2], [seeded()]).tokens[0].item()
    together = sample(logits, [SamplingRow(1.0, 1.0, None), seeded(), SamplingRow(0.0, 1.0, None)])
    assert together.tokens[1].item() == alone
    assert together.tokens[2].item() == logits[2].argmax().item()
