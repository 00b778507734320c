"""The one set of value checks (ds_lowrank.utils.validation): a bool is never a number, and a
failed check names the key, the value and what was expected."""

import math

import pytest
import torch

from ds_lowrank.utils.validation import check, is_count, is_finite, is_int, is_number


@pytest.mark.parametrize("value, int_, count, number, finite", [
    (3, True, True, True, True),
    (0, True, True, True, True),
    (-2, True, False, True, True),
    (2.5, False, False, True, True),
    (math.inf, False, False, True, False),
    (math.nan, False, False, True, False),
    (True, False, False, False, False),
    (False, False, False, False, False),
    ("3", False, False, False, False),
    (None, False, False, False, False),
    (torch.tensor(1.0), False, False, False, False),
])
def test_each_check_on_each_kind_of_value(value, int_, count, number, finite):
    assert (is_int(value), is_count(value), is_number(value), is_finite(value)) == (int_, count, number, finite)


def test_a_failed_check_names_key_value_and_expectation():
    check(True, "rank", 4, "a positive int")
    with pytest.raises(ValueError, match=r"^invalid rank=True: expected a positive int$"):
        check(is_int(True), "rank", True, "a positive int")
