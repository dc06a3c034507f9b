"""lm-eval's own `local-chat-completions` model runs a generate-until task end to end against the gateway's
/v1/chat/completions (the way lm-eval users point it at vLLM)."""

from __future__ import annotations

import pytest

from tests.fixtures.servers import start_gateway, start_textgen


@pytest.fixture(scope="module")
def gateway_url(default_model_dir):
    tg = start_textgen(default_model_dir, max_context_tokens=512)
    gw = start_gateway((tg.address,))
    yield gw.url
    gw.stop()
    tg.stop()


def test_local_chat_completions_runs_a_generate_until_task(gateway_url):
    import lm_eval
    import lm_eval.models  # noqa: F401 - registers lm-eval's models

    from services.evaluator.harness import offline_env, task_manager

    offline_env()
    results = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args={
            "model": "smollm2-135m-instruct",
            "base_url": f"{gateway_url}/v1/chat/completions",
            "num_concurrent": 1,
            "max_retries": 1,
            "tokenized_requests": False,
        },
        tasks=["megastack_arithmetic"],
        limit=4,
        apply_chat_template=True,
        task_manager=task_manager(),
        bootstrap_iters=0,
        log_samples=True,
    )
    metrics = results["results"]["megastack_arithmetic"]
    score = metrics["exact_match,first-number"]
    assert 0.0 <= score <= 1.0
    samples = results["samples"]["megastack_arithmetic"]
    assert len(samples) == 4 and all(isinstance(s["resps"][0][0], str) for s in samples)
    assert any(s["resps"][0][0].strip() for s in samples)  # the model answered through the chat route
