"""Every metric vLLM also exports moves with its vLLM twin (``vllm:*``, labelled model_name)."""

import pytest
from prometheus_client import REGISTRY

from services.textgen import metrics as M

pytestmark = pytest.mark.unit


@pytest.fixture
def model():
    before = M.MODEL[0]
    M.bind_model("twin-test")
    yield "twin-test"
    M.bind_model(before)


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_finish_reasons_map_to_vllms_and_refusals_have_no_twin(model):
    def stop():
        return value("vllm:request_success_total", model_name=model, finished_reason="stop")

    def abort():
        return value("vllm:request_success_total", model_name=model, finished_reason="abort")

    s0, a0, eos0 = stop(), abort(), value("megastack_textgen_request_success_total", finished_reason="eos")
    M.SUCCESS.labels("eos").inc()
    M.SUCCESS.labels("stop_sequence").inc()
    M.FAILURE.labels("cancelled").inc()
    M.FAILURE.labels("overloaded").inc(3)  # refused before running: vLLM has no such count
    assert (stop() - s0, abort() - a0) == (2.0, 1.0)
    assert value("megastack_textgen_request_success_total", finished_reason="eos") - eos0 == 1.0


def test_gauges_histograms_and_counters_move_together(model):
    M.NUM_RUNNING.set(5)
    assert value("vllm:num_requests_running", model_name=model) == 5.0
    assert value("megastack_textgen_num_requests_running") == 5.0
    n0 = value("vllm:time_to_first_token_seconds_count", model_name=model)
    M.TTFT.observe(0.2)
    assert value("vllm:time_to_first_token_seconds_count", model_name=model) == n0 + 1
    t0 = value("vllm:generation_tokens_total", model_name=model)
    M.GENERATION_TOKENS.inc(7)
    assert value("vllm:generation_tokens_total", model_name=model) == t0 + 7
    M.NUM_RUNNING.set(0)
