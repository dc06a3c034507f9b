"""Evaluator pieces that need no model: spec checks, task names, the suite, the compare table."""

from __future__ import annotations

import json

import pytest
import yaml

from protos.evaluator.v1 import evaluator_pb2 as pb
from services.evaluator.harness import EvalSpec, check_spec, check_tasks
from services.evaluator.suite import PLACEHOLDER, SUITE_DIR, render
from services.evaluator.wire import spec_from_pb, spec_from_record, spec_record, spec_to_pb
from shared.errors import InvalidArgument
from tools.cli.eval import _headline, compare_rows

KNOWN = ["mmlu", "mmlu_anatomy", "hellaswag", "megastack_capitals", "megastack_suite", "arc_easy"]


def test_unknown_task_names_its_close_matches():
    with pytest.raises(InvalidArgument) as e:
        check_tasks(("hellaswg",), KNOWN)
    assert (
        "unknown task 'hellaswg'" in e.value.message
        and "hellaswag" in e.value.message
        and e.value.field == "tasks"
    )
    with pytest.raises(InvalidArgument) as e:
        check_tasks(("zzzzqqq",), KNOWN)
    assert "close names" not in e.value.message
    check_tasks(("mmlu", "megastack_suite"), KNOWN)


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(limit=-3), "limit"),
        (dict(batch_size=0), "batch_size"),
        (dict(textgen_address=""), "model"),
        (dict(hf_checkpoint="/x"), "model"),
        (dict(tasks=()), "tasks"),
    ],
)
def test_bad_specs_name_the_field(kw, field):
    spec = EvalSpec(**{"tasks": ("mmlu",), "textgen_address": "127.0.0.1:1", **kw})
    with pytest.raises(InvalidArgument) as e:
        check_spec(spec, KNOWN)
    assert e.value.field == field


def test_spec_survives_its_record_and_protobuf():
    spec = EvalSpec(
        tasks=("a", "b"),
        completions_url="http://h/v1/completions",
        num_fewshot=3,
        limit=7,
        batch_size=2,
        seed=9,
        include_paths=("/p",),
        name="n",
        apply_chat_template=True,
    )
    assert spec_from_record(json.loads(json.dumps(spec_record(spec)))) == spec
    assert spec_from_pb(spec_to_pb(spec)) == spec
    assert spec_from_pb(pb.EvaluationSpec(tasks=["a"], textgen_address="x:1")).batch_size == 16
    assert spec_record(spec)["completions_url"] == "http://h/v1/completions"  # the proto's JSON mapping


def test_suite_renders_with_absolute_data_paths(tmp_path):
    out = render(tmp_path / "suite")
    names = sorted(p.name for p in out.glob("*.yaml"))
    assert names == sorted(p.name for p in (SUITE_DIR / "tasks").glob("*.yaml"))
    for p in out.glob("*.yaml"):
        text = p.read_text()
        assert PLACEHOLDER not in text
        doc = yaml.safe_load(text.replace("!function", ""))
        for f in (doc.get("dataset_kwargs", {}).get("data_files") or {}).values():
            assert (SUITE_DIR / "data").resolve().joinpath(f.rsplit("/", 1)[-1]).is_file(), f


def _run(job_id, tasks):
    return pb.Evaluation(
        status={"job_id": job_id},
        result=pb.EvaluationResult(tasks=[pb.TaskScores(task=t, metrics=m) for t, m in tasks.items()]),
    )


def test_compare_rows_line_up_metrics_and_mark_missing():
    a = _run("a", {"t1": {"acc,none": 0.5, "acc_norm,none": 0.6}, "t2": {"word_perplexity,none": 30.0}})
    b = _run("b", {"t1": {"acc,none": 0.75}})
    rows = {(t, m): v for t, m, v in compare_rows([a, b])}
    assert rows[("t1", "acc,none")] == [0.5, 0.75]
    assert rows[("t1", "acc_norm,none")] == [0.6, None]
    assert rows[("t2", "word_perplexity,none")] == [30.0, None]


def test_headline_prefers_normalised_accuracy_then_exact_match():
    assert _headline({"acc,none": 0.1, "acc_norm,none": 0.2}) == ("acc_norm", 0.2)
    assert _headline({"exact_match,first-number": 0.4}) == ("exact_match", 0.4)
    assert _headline({"word_perplexity,none": 12.0, "bits_per_byte,none": 1.0}) == ("word_perplexity", 12.0)


def test_named_suites_resolve_to_their_datasets_and_a_cached_one_passes(tmp_path, monkeypatch):
    from services.evaluator import harness

    tm = harness.task_manager()
    subs = harness.task_datasets(tm, "mmlu")
    assert len(subs) == 57 and {p for _, p, _, _ in subs} == {"cais/mmlu"}
    assert harness.task_datasets(tm, "gsm8k") == [("gsm8k", "openai/gsm8k", "main", None)]
    assert {p for _, p, _, f in harness.task_datasets(tm, "megastack_suite")} == {"json"}
    harness.check_data(tm, ("megastack_suite",))  # shipped data files exist
    monkeypatch.setattr(
        harness, "dataset_locations", lambda path: [tmp_path / f"datasets--{path.replace('/', '--')}"]
    )
    with pytest.raises(Exception, match="openai/gsm8k"):
        harness.check_data(tm, ("gsm8k",))
    (tmp_path / "datasets--openai--gsm8k").mkdir()
    harness.check_data(tm, ("gsm8k",))


def test_lm_evals_templates_render_the_same_compiled_once(monkeypatch):
    """The task manager has lm-eval compile each template string once; what it renders is unchanged."""
    import lm_eval.utils as U

    from services.evaluator import harness

    original = getattr(U.apply_template, "original", U.apply_template)  # lm-eval's own
    monkeypatch.setattr(U, "apply_template", original)  # restored after the test
    template = "Question: What is {{a}} + {{b}}?\nAnswer:{{ ' ' ~ choices[label] }}"
    docs = [{"a": i, "b": 2 * i, "choices": ["x", str(3 * i)], "label": 1} for i in range(50)]
    expected = [original(template, d) for d in docs]
    calls = []
    real = U.env.from_string
    monkeypatch.setattr(U.env, "from_string", lambda t: calls.append(t) or real(t))
    harness._compile_templates_once()
    assert U.apply_template is not original
    assert [U.apply_template(template, d) for d in docs] == expected
    assert calls == [template]  # compiled once for 50 documents
    harness._compile_templates_once()  # a second install keeps the first
    assert U.apply_template(template, docs[0]) == expected[0] and calls == [template]
