"""The request rules every gateway dialect shares (services/gateway/fields.py), checked once here."""

import pytest

from services.gateway.fields import sampling_params, stop_list
from services.gateway.http import HTTPError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(0.0, 0, 0.0), (1e-40, 50, 0.0), (0.7, 1, 0.0), (0.7, 0, 1e-300), (1.0, 1, 0.9)],
)
def test_greedy_requests_send_only_the_greedy_flag(temperature, top_k, top_p):
    s = sampling_params(temperature, top_k, top_p, 7, 1.1)
    assert s.greedy and (s.temperature, s.top_k, s.top_p) == (0.0, 0, 0.0)
    assert (s.seed, round(s.repetition_penalty, 5)) == (7, 1.1)


def test_sampling_values_travel_and_off_values_are_normalised():
    s = sampling_params(0.7, -1, 1.0, -1, 1.0)
    assert not s.greedy and s.top_k == 0 and s.top_p == 0.0 and abs(s.temperature - 0.7) < 1e-6
    s = sampling_params(0.7, 0, 0.9, 3, 1.0, top_p_decay=0.5, top_p_bound=0.2)
    assert (round(s.top_p, 5), round(s.top_p_decay, 5), round(s.top_p_bound, 5)) == (0.9, 0.5, 0.2)
    assert sampling_params(0.7, 40, 1.0, -1, 1.0).top_k == 40


def test_top_k_and_top_p_together_is_a_400_naming_top_p():
    with pytest.raises(HTTPError) as e:
        sampling_params(0.7, 40, 0.9, -1, 1.0)
    assert e.value.status == 400 and e.value.field == "top_p"


def test_stop_lists():
    assert stop_list({}) == [] and stop_list({"stop": None}) == []
    assert stop_list({"stop": "\n"}) == ["\n"] and stop_list({"stop": ["a", "", "b"]}) == ["a", "b"]
    assert stop_list({"stop": [str(i) for i in range(16)]}) == [str(i) for i in range(16)]
    for bad in ([str(i) for i in range(17)], [1], {"a": 1}, 3):
        with pytest.raises(HTTPError) as e:
            stop_list({"stop": bad})
        assert e.value.status == 400 and e.value.field == "stop" and "at most 16 strings" in e.value.message


def test_the_dialects_build_sampling_through_the_one_function():
    """No dialect module builds pb.SamplingParams itself (the greedy rule would drift)."""
    import inspect

    from services.gateway import megatron_api, openai_api, websocket

    for mod in (megatron_api, openai_api, websocket):
        src = inspect.getsource(mod)
        assert "SamplingParams(" not in src and "sampling_params(" in src, mod.__name__
