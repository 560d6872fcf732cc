import dataclasses

import pytest

from torl.rollout.sampling import SamplingOverrides


def test_a_misspelled_override_fails_loudly_naming_the_known_keys():
    with pytest.raises(ValueError, match=r"unknown sampling overrides \['temprature'\].*'temperature'"):
        SamplingOverrides.from_dict({"temprature": 0.5})


def test_overrides_from_a_mapping_and_frozen():
    o = SamplingOverrides.from_dict({"temperature": 0.5, "stop": ["END"], "greedy": True})
    assert (o.temperature, o.stop, o.greedy, o.stream, o.logprobs) == (0.5, ("END",), True, True, True)
    assert SamplingOverrides.from_dict(None) == SamplingOverrides()
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.temperature = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("stop", ["END", [""], [3]])
def test_stop_strings_must_be_a_sequence_of_non_empty_strings(stop):
    with pytest.raises(ValueError, match="stop must be a sequence of non-empty strings"):
        SamplingOverrides(stop=stop)


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        SamplingOverrides(max_tokens=0)
