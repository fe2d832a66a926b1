"""SamplingOptions: the one place a decode's options are checked, whoever asks (engine, batch row, server)."""

from __future__ import annotations

import pytest

from darkhorse.errors import DarkhorseError
from darkhorse.infer.engine import Row
from darkhorse.infer.sampling import SamplingOptions

BAD = {
    "max_new_tokens": (-1, "max_new_tokens must be >= 0, got -1"),
    "temperature": (float("nan"), "temperature must be a finite number, got nan"),
    "top_k": (2.5, "top_k must be an integer, got 2.5"),
    "top_p": (0, "top_p must be > 0 and <= 1, got 0"),
    "repetition_penalty": (-1.0, "repetition_penalty must be > 0, got -1.0"),
    "seed": (True, "seed must be an integer, got True"),
    "stop_ids": ([3, -2], "stop_ids must be token ids (integers >= 0), got [-2, 3]"),
    "speculative": ("medusa", "unknown speculative decoding 'medusa'; the one there is: mtp"),
}


@pytest.mark.parametrize("field", BAD)
def test_bad_values_are_one_line_errors(field):
    value, message = BAD[field]
    with pytest.raises(DarkhorseError) as caught:
        SamplingOptions(**({"max_new_tokens": 4} | {field: value}))
    assert str(caught.value) == message
    with pytest.raises(DarkhorseError):  # a row of the continuous batch builds the same options
        Row([1, 2], **({"max_new_tokens": 4} | {field: value}))


def test_options_are_normalised_and_changed_by_keywords():
    options = SamplingOptions(max_new_tokens=4, stop_ids=[3, 3, 5])
    assert options.stop_ids == frozenset({3, 5}) and options.greedy
    sampled = SamplingOptions.of(options, temperature=0.7, seed=1)
    assert (sampled.max_new_tokens, sampled.temperature, sampled.greedy) == (4, 0.7, False)
    assert SamplingOptions.of(None, max_new_tokens=2) == SamplingOptions(max_new_tokens=2)
    with pytest.raises(DarkhorseError, match="greedily only"):
        SamplingOptions.of(sampled, speculative="mtp")
