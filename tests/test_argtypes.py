"""The shared flag-value parsers: what they accept, and refusals that say what was expected."""

from __future__ import annotations

import argparse

import pytest

from dilateformer.argtypes import choice_from, float_pair, int_list, positive_float, positive_int, ranged


@pytest.mark.parametrize(
    "parse, text, expected",
    [
        (positive_int, "3", 3),
        (ranged(int, 0), "0", 0),
        (ranged(float, 0, 1, high_open=True), "0.5", 0.5),
        (ranged(int, 64, 4096, multiple_of=32), "96", 96),
        (positive_float, "1e-3", 1e-3),
        (int_list(), "1,2,2", (1, 2, 2)),
        (float_pair(low=0, high=1), "0.08,1", (0.08, 1.0)),
        (choice_from("optimizer", lambda: ["adamw", "sgd"]), "AdamW", "adamw"),
    ],
)
def test_accepted_values(parse, text: str, expected) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    "parse, text, message",
    [
        (positive_int, "0", "expected an integer >= 1, got '0'"),
        (positive_int, "1.5", "expected an integer >= 1, got '1.5'"),
        (ranged(int, 0), "-2", "expected an integer >= 0, got '-2'"),
        (ranged(float, 0, 1, high_open=True), "1", "expected a number >= 0 and < 1, got '1'"),
        (ranged(int, 64, 4096, multiple_of=32), "100", "a multiple of 32, got '100'"),
        (positive_float, "nan", "expected a number > 0, got 'nan'"),
        (positive_float, "inf", "expected a number > 0, got 'inf'"),
        (int_list(), "1,x", "expected positive integers separated by commas, got '1,x'"),
        (int_list(distinct=True), "1,1", "expected distinct positive integers"),
        (float_pair(low=0, high=1), "0.9,0.1", "LOW <= HIGH"),
        (choice_from("optimizer", lambda: ["adamw", "sgd"]), "adamv", "unknown optimizer 'adamv'; did you mean adamw?"),
    ],
)
def test_refusals_say_what_was_expected(parse, text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        parse(text)
    assert message in str(refused.value)
