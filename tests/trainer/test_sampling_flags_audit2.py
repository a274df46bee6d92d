"""`nf4lora generate`'s sampling flags and `generate`'s arguments follow one set of rules and messages
(`nf4lora.model.generate.check_sampling_arguments`): the flag --top-k 0 is the argument top_k=None."""

import argparse
import itertools
import math
import re

import pytest

from nf4lora.model.generate import check_sampling_arguments
from nf4lora.trainer.commands import _check_generate_flags

MAX_NEW_TOKENS = (-1, 0, 1, 64)
TEMPERATURES = (-1.0, 0.0, 0.7, math.inf, math.nan)
TOP_KS = (-3, 0, 1, 40)
TOP_PS = (0.0, 0.5, 1.0, 1.5, math.nan)


def refusal(check, *args, **kwargs):
    """The message of the ValueError ``check`` raises, or None."""
    try:
        check(*args, **kwargs)
    except ValueError as exc:
        return str(exc)
    return None


def test_the_command_refuses_exactly_what_generate_refuses():
    for values in itertools.product(MAX_NEW_TOKENS, TEMPERATURES, TOP_KS, TOP_PS):
        max_new_tokens, temperature, top_k, top_p = values
        flags = argparse.Namespace(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   seed=0, template=None)
        by_flag = refusal(_check_generate_flags, flags)
        by_argument = refusal(check_sampling_arguments, max_new_tokens, temperature, top_k or None, top_p)
        assert (by_flag is None) == (by_argument is None), (values, by_flag, by_argument)


@pytest.mark.parametrize(("flag", "value", "argument", "requirement"), [
    ("--max-new-tokens", 0, "max_new_tokens", ">= 1 (an int)"),
    ("--temperature", math.inf, "temperature", "a finite number >= 0 (0 = greedy)"),
    ("--top-p", 1.5, "top_p", "in (0, 1]"),
    ("--seed", 2**64, "seed", "an int in [-2**63, 2**64)"),  # torch's generators overflowed on it after loading
])
def test_a_flag_and_its_argument_are_refused_with_the_same_requirement(flag, value, argument, requirement):
    arguments = {"max_new_tokens": 4, "temperature": 1.0, "top_k": None, "top_p": None, "seed": 0, argument: value}
    by_argument = refusal(check_sampling_arguments, **arguments)
    assert f"{argument} {requirement}" in by_argument and f"{argument}={value!r}" in by_argument
    flags = argparse.Namespace(**{**arguments, "top_k": 0, "top_p": arguments["top_p"] or 1.0, "template": None})
    assert refusal(_check_generate_flags, flags) == f"{flag} {value} must be {requirement}"


def test_top_k_zero_is_no_cut_for_the_flag_only():
    assert refusal(check_sampling_arguments, 4, 1.0, 0, None, as_flags=True) is None
    assert re.search(r"need .*top_k >= 1 \(an int\) or None.*; got .*top_k=0",
                     refusal(check_sampling_arguments, 4, 1.0, 0, None))
    assert refusal(check_sampling_arguments, 4, 1.0, -3, None, as_flags=True) == \
        "--top-k -3 must be >= 0 (0 = no top-k cut)"
