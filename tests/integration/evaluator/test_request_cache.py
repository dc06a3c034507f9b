"""The evaluator's request cache against a real textgen: a re-run sends nothing, a run cut short resumes
with only what is missing, and another checkpoint or parameter never reads another's answers."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
from lm_eval.api.instance import Instance
from prometheus_client import REGISTRY

from llm.checkpoints.fingerprint import checkpoint_id
from services.evaluator.lm import TextgenLM
from services.evaluator.request_cache import RequestCache, namespace, request_key

PAIRS = [
    ("The cat sat on", " the mat"),
    ("The cat sat on", " a hat"),
    ("one two three", " four"),
    ("hello", " world and more words"),
    ("a", " b"),
    ("it was the best of times", " it was"),
]
PROMPTS = ["one two", "the cat", "hello there"]


def loglik(lm, pairs):
    return lm.loglikelihood(
        [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)],
        disable_tqdm=True,
    )


def generate(lm, prompts, n=5):
    reqs = [
        Instance(
            request_type="generate_until",
            doc={},
            arguments=(p, {"until": ["\n\n"], "max_gen_toks": n, "do_sample": False}),
            idx=i,
        )
        for i, p in enumerate(prompts)
    ]
    return lm.generate_until(reqs)


def textgen_requests() -> float:
    """Sequences textgen finished (it runs in this process): what the engine was asked to do."""
    return sum(
        REGISTRY.get_sample_value("megastack_textgen_request_success_total", {"finished_reason": r}) or 0.0
        for r in ("length", "eos", "stop_sequence", "eol")
    )


def test_a_rerun_sends_nothing_to_textgen_and_gets_the_same_answers(textgen, tmp_path):
    cache = RequestCache(tmp_path / "cache.sqlite")
    first = TextgenLM(textgen.address, batch_size=2, cache=cache)
    scores, texts = loglik(first, PAIRS), generate(first, PROMPTS)
    assert first.sent == len(PAIRS) + len(PROMPTS) and len(cache) == len(PAIRS) + len(PROMPTS)
    before = textgen_requests()
    again = TextgenLM(textgen.address, batch_size=2, cache=RequestCache(tmp_path / "cache.sqlite"))
    assert loglik(again, PAIRS) == scores and generate(again, PROMPTS) == texts
    assert textgen_requests() == before  # not one request reached the engine
    assert again.sent == 0 and again.cache.hits == len(PAIRS) + len(PROMPTS) and again.cache.misses == 0
    assert again._done == again._total  # progress counts the cached answers as done
    uncached = TextgenLM(textgen.address, batch_size=2)
    assert loglik(uncached, PAIRS) == scores


def test_a_run_cut_short_resumes_with_only_the_missing_requests(textgen, tmp_path):
    path = tmp_path / "cache.sqlite"
    half = TextgenLM(textgen.address, batch_size=2, cache=RequestCache(path))
    loglik(half, PAIRS[:3])  # the run was killed after these
    before = textgen_requests()
    resumed = TextgenLM(textgen.address, batch_size=2, cache=RequestCache(path))
    got = loglik(resumed, PAIRS)
    assert resumed.sent == len(PAIRS) - 3 and resumed.cache.hits == 3
    assert textgen_requests() - before == len(PAIRS) - 3
    assert got == loglik(TextgenLM(textgen.address, batch_size=2), PAIRS)


def test_another_checkpoint_or_parameter_never_reads_anothers_answers(textgen, tiny_models, tmp_path):
    from tests.fixtures.servers import start_textgen

    path = tmp_path / "cache.sqlite"
    ours = TextgenLM(textgen.address, batch_size=2, cache=RequestCache(path))
    loglik(ours, PAIRS)
    generate(ours, PROMPTS, n=5)
    longer = TextgenLM(textgen.address, batch_size=2, cache=RequestCache(path))
    generate(longer, PROMPTS, n=6)  # another max_gen_toks: other keys
    assert longer.cache.hits == 0 and longer.sent == len(PROMPTS)
    other = start_textgen(tiny_models["qwen2"])  # another checkpoint (the same tokenizer)
    try:
        theirs = TextgenLM(other.address, batch_size=2, cache=RequestCache(path))
        loglik(theirs, PAIRS)
        assert theirs.cache.hits == 0 and theirs.sent == len(PAIRS)
    finally:
        other.stop()


def test_the_key_names_model_tokenizer_dtype_device_and_numeric_mode():
    base = dict(checkpoint_id="c", tokenizer_id="t", dtype="float32", device="cpu", batch_invariant="scoring")
    ns = namespace(SimpleNamespace(**base))
    assert namespace(SimpleNamespace(**{**base, "device": "cpu"})) == ns
    for field, value in [
        ("checkpoint_id", "c2"),
        ("tokenizer_id", "t2"),
        ("dtype", "bfloat16"),
        ("device", "cuda:0"),
        ("batch_invariant", "off"),
    ]:
        assert namespace(SimpleNamespace(**{**base, field: value})) != ns, field
    assert request_key(ns, "score", [1, 2, 3], "1") != request_key(ns, "score", [1, 2, 3], "2")
    assert request_key(ns, "score", [1, 2, 3]) != request_key(ns, "score", [12, 3])
    assert request_key(ns, "score", [1, 2]) != request_key(ns, "generate", [1, 2])


def test_a_checkpoint_fingerprint_follows_its_content_not_its_folder(tiny_models, tmp_path):
    src = tiny_models["llama"]
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    assert checkpoint_id(copy) == checkpoint_id(src)
    weights = next(p for p in copy.iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    assert checkpoint_id(copy) != checkpoint_id(src)


@pytest.mark.parametrize("kind", ["score", "generate"])
def test_cached_answers_survive_a_new_process(tmp_path, kind):
    path = tmp_path / "c.sqlite"
    RequestCache(path).put_many({"k": [[-1.5, -0.25], [3, 4]] if kind == "score" else "text"})
    got = RequestCache(path).get_many(["k", "missing"])
    assert got == {"k": [[-1.5, -0.25], [3, 4]] if kind == "score" else "text"}
