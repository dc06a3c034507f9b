"""EvaluatorService over real gRPC: real lm-eval in worker processes against a real textgen server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from llm.mcore.dist import free_port
from protos.common.v1 import common_pb2
from protos.evaluator.v1 import evaluator_pb2 as pb
from protos.evaluator.v1 import evaluator_pb2_grpc as pb_grpc
from shared.grpc.channel import make_channel
from shared.grpc.interceptors import ERROR_FIELD_KEY
from tests.fixtures.servers import start_evaluator, start_gateway, start_textgen

SUCCEEDED, FAILED, CANCELLED = (
    common_pb2.JOB_STATE_SUCCEEDED,
    common_pb2.JOB_STATE_FAILED,
    common_pb2.JOB_STATE_CANCELLED,
)


@pytest.fixture(scope="module")
def served(default_model_dir):
    tg = start_textgen(default_model_dir, max_batch_size=16, max_context_tokens=512)
    gw = start_gateway((tg.address,))
    yield tg, gw
    gw.stop()
    tg.stop()


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-jobs")


@pytest.fixture(scope="module")
def evaluator_address(jobs_dir):
    servicer, server = start_evaluator(jobs_dir)
    yield server.address
    servicer.runner.shutdown()
    server.stop(0)


@pytest.fixture(scope="module")
def stub(evaluator_address):
    with make_channel(evaluator_address) as ch:
        yield pb_grpc.EvaluatorServiceStub(ch)


def submit(stub, **spec) -> str:
    return stub.SubmitEvaluation(pb.SubmitEvaluationRequest(spec=pb.EvaluationSpec(**spec))).job_id


def follow(stub, job_id, on_event=None) -> pb.Evaluation:
    last = None
    for ev in stub.WatchEvaluation(pb.WatchEvaluationRequest(job_id=job_id), timeout=300):
        last = ev.evaluation
        if on_event is not None:
            on_event(last)
    return last


def stub_get(address: str, job_id: str) -> pb.Evaluation:
    with make_channel(address) as ch:
        return (
            pb_grpc.EvaluatorServiceStub(ch).GetEvaluation(pb.GetEvaluationRequest(job_id=job_id)).evaluation
        )


def scores(ev: pb.Evaluation) -> dict[str, dict[str, float]]:
    return {t.task: dict(t.metrics) for t in ev.result.tasks}


def test_offline_suite_end_to_end_beats_chance(stub, served):
    tg, _ = served
    job_id = submit(stub, textgen_address=tg.address, tasks=["megastack_suite"], name="suite")
    ev = follow(stub, job_id)
    assert ev.status.state == SUCCEEDED, ev.status.error
    s = scores(ev)
    assert {"megastack_capitals", "megastack_arithmetic", "megastack_prose"} <= set(s)
    # four choices per question: chance is 0.25
    assert s["megastack_capitals"]["acc,none"] > 0.5, s
    assert 0 <= s["megastack_arithmetic"]["exact_match,first-number"] <= 1
    assert 1 < s["megastack_prose"]["word_perplexity,none"] < 1e4
    p = ev.status.progress
    assert p.total > 100 and p.done == p.total == ev.result.num_requests
    stored = json.loads(Path(ev.result.results_path).read_text())
    assert stored["results"]["megastack_capitals"]["acc,none"] == s["megastack_capitals"]["acc,none"]
    assert "megastack_capitals" in ev.result.summary and "|" in ev.result.summary
    # textgen's default batch invariance: requests re-scored alone after the run match bit for bit
    assert stored["megastack"]["batch_invariant"] == "scoring" and ev.result.determinism == 1.0
    assert stored["megastack"]["determinism"] == 1.0


def test_grpc_lm_and_local_completions_through_the_gateway_agree(stub, served):
    tg, gw = served
    common = dict(
        tasks=["megastack_capitals", "megastack_prose", "megastack_arithmetic"], limit=6, batch_size=4
    )
    a = follow(stub, submit(stub, textgen_address=tg.address, **common))
    b = follow(stub, submit(stub, completions_url=gw.url + "/v1/completions", **common))
    assert a.status.state == SUCCEEDED and b.status.state == SUCCEEDED, (a.status.error, b.status.error)
    sa, sb = scores(a), scores(b)
    assert sa.keys() == sb.keys()
    for task in sa:
        assert sa[task].keys() == sb[task].keys()
        for metric, value in sa[task].items():
            assert sb[task][metric] == pytest.approx(value, rel=1e-4), (task, metric)


def test_unknown_task_lists_close_names(stub, served):
    with pytest.raises(grpc.RpcError) as e:
        submit(stub, textgen_address=served[0].address, tasks=["megastack_capital"])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "unknown task 'megastack_capital'" in e.value.details() and "megastack_capitals" in e.value.details()
    )


@pytest.mark.parametrize(
    "spec,code,fragment",
    [
        (dict(tasks=["megastack_capitals"], limit=-1), grpc.StatusCode.INVALID_ARGUMENT, "limit must be > 0"),
        (dict(tasks=[]), grpc.StatusCode.INVALID_ARGUMENT, "tasks is empty"),
        (dict(tasks=["megastack_capitals"], batch_size=-2), grpc.StatusCode.INVALID_ARGUMENT, "batch_size"),
    ],
)
def test_bad_specs_are_refused_before_a_job_exists(stub, served, spec, code, fragment):
    before = len(stub.ListEvaluations(pb.ListEvaluationsRequest()).evaluations)
    with pytest.raises(grpc.RpcError) as e:
        submit(stub, textgen_address=served[0].address, **spec)
    assert e.value.code() == code and fragment in e.value.details()
    assert len(stub.ListEvaluations(pb.ListEvaluationsRequest()).evaluations) == before


def test_validate_only_and_the_cli_dry_run_check_like_a_submit_and_create_nothing(
    stub, served, evaluator_address, capsys
):
    from tools.cli.main import main

    before = len(stub.ListEvaluations(pb.ListEvaluationsRequest()).evaluations)
    spec = pb.EvaluationSpec(tasks=["megastack_capitals"], textgen_address=served[0].address, limit=2)
    assert stub.SubmitEvaluation(pb.SubmitEvaluationRequest(spec=spec, validate_only=True)).job_id == ""
    with pytest.raises(grpc.RpcError) as e:
        spec.tasks[:] = ["megastack_capital"]
        stub.SubmitEvaluation(pb.SubmitEvaluationRequest(spec=spec, validate_only=True))
    assert "unknown task 'megastack_capital'" in e.value.details()
    argv = ["eval", "--server", evaluator_address, "run", "megastack_capitals", "--model", served[0].address]
    assert main([*argv, "--dry-run"]) == 0
    assert "valid (checked by the evaluator service; nothing submitted)" in capsys.readouterr().out
    assert len(stub.ListEvaluations(pb.ListEvaluationsRequest()).evaluations) == before


def test_no_model_and_unreachable_models_are_clear_and_fast(stub, tmp_path):
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitEvaluation(
            pb.SubmitEvaluationRequest(spec=pb.EvaluationSpec(tasks=["megastack_capitals"]))
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "give a model" in e.value.details()
    t0 = time.monotonic()
    for spec, field in [
        (dict(textgen_address=f"127.0.0.1:{free_port()}"), "not reachable"),
        (dict(completions_url=f"http://127.0.0.1:{free_port()}/v1/completions"), "not reachable"),
        (dict(hf_checkpoint=str(tmp_path)), "not an HF folder"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            submit(stub, tasks=["megastack_capitals"], **spec)
        assert e.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
        assert field in e.value.details()
    assert time.monotonic() - t0 < 30


def test_model_dying_mid_run_fails_with_the_reason_and_keeps_progress(stub, default_model_dir):
    victim = start_textgen(default_model_dir, max_batch_size=4, max_context_tokens=512)
    stopped = []

    def kill_after_first_progress(ev):
        if not stopped and ev.status.progress.done > 0:
            victim.stop()
            stopped.append(ev.status.progress.done)

    try:
        ev = follow(
            stub,
            submit(stub, textgen_address=victim.address, tasks=["megastack_suite"], batch_size=1),
            kill_after_first_progress,
        )
    finally:
        if not stopped:
            victim.stop()
    assert stopped, "the run ended before any progress was reported"
    assert ev.status.state == FAILED
    assert "went away" in ev.status.error and victim.address in ev.status.error
    assert 0 < ev.status.progress.done < ev.status.progress.total


def test_cancel_records_the_reason(stub, served):
    job_id = submit(stub, textgen_address=served[0].address, tasks=["megastack_suite"], batch_size=1)
    follow_until = []

    def cancel_on_progress(ev):
        if not follow_until and ev.status.progress.done > 0:
            stub.CancelEvaluation(pb.CancelEvaluationRequest(job_id=job_id, reason="enough"))
            follow_until.append(True)

    ev = follow(stub, job_id, cancel_on_progress)
    assert ev.status.state == CANCELLED and "enough" in ev.status.error
    assert 0 < ev.status.progress.done < ev.status.progress.total


def test_results_survive_a_service_restart(stub, jobs_dir):
    done = [e for e in stub.ListEvaluations(pb.ListEvaluationsRequest(state=SUCCEEDED)).evaluations]
    assert done, "earlier tests left no finished run"
    servicer, server = start_evaluator(jobs_dir)  # a second service on the same records
    try:
        with make_channel(server.address) as ch:
            again = pb_grpc.EvaluatorServiceStub(ch)
            for ev in done:
                got = again.GetEvaluation(pb.GetEvaluationRequest(job_id=ev.status.job_id)).evaluation
                assert got.status.state == SUCCEEDED and scores(got) == scores(ev)
                assert Path(got.result.results_path).is_file()
    finally:
        servicer.runner.shutdown()
        server.stop(0)


def test_cli_run_results_compare(evaluator_address, served, capsys):
    from tools.cli.main import main

    addr = evaluator_address
    tg, _ = served
    ids = []
    for fewshot in ("0", "2"):
        rc = main(
            [
                "eval",
                "--server",
                addr,
                "run",
                "megastack_capitals",
                "--model",
                tg.address,
                "--limit",
                "6",
                "--num-fewshot",
                fewshot,
                "--no-progress",
            ]
        )
        out = capsys.readouterr().out
        assert rc == 0, out
        ids.append(out.splitlines()[0].strip())
        assert "megastack_capitals" in out and "acc" in out
    assert main(["eval", "--server", addr, "compare", *ids, "--samples", "6"]) == 0
    table = capsys.readouterr().out
    row = next(
        line for line in table.splitlines() if line.startswith("| megastack_capitals") and "| acc " in line
    )
    cells = [c.strip() for c in row.strip("|").split("|")]
    a, b, delta = float(cells[2]), float(cells[3]), float(cells[4])
    assert delta == pytest.approx(b - a, abs=1e-4)
    # the paired test over the 6 samples both runs scored: McNemar for accuracy, its p-value in [0, 1]
    assert cells[7] == "6" and "(mcnemar)" in cells[6] and 0 <= float(cells[6].split()[0]) <= 1
    assert "paired over the samples both runs scored" in table
    # each run's per-sample scores add up to its aggregate
    for job in ids:
        ev = stub_get(addr, job)
        lines = Path(ev.result.results_path).with_name("samples.jsonl").read_text().splitlines()
        accs = [json.loads(x)["metrics"]["acc"] for x in lines]
        assert len(accs) == 6 and sum(accs) / 6 == pytest.approx(scores(ev)["megastack_capitals"]["acc,none"])
    flips = [line for line in table.splitlines() if line.startswith("  megastack_capitals acc doc ")]
    net = round(abs(delta) * 6)  # discordant pairs: at least the net change, and of its parity
    assert len(flips) >= net and (len(flips) - net) % 2 == 0
    assert main(["eval", "--server", addr, "results", ids[0], "--json"]) == 0
    assert "megastack_capitals" in json.loads(capsys.readouterr().out)["results"]
    assert main(["eval", "--server", addr, "run", "megastack_capital", "--model", tg.address]) == 2
    assert "close names: megastack_capitals" in capsys.readouterr().err


def test_chat_template_runs_with_the_served_models_own_template(stub, served, tiny_models, tmp_path):
    """SmolLM2-Instruct's template lays out the prompts (system instruction and few-shot turns included);
    a model without a template is refused at submit, naming the field."""
    tg, _ = served
    ev = follow(
        stub,
        submit(
            stub,
            textgen_address=tg.address,
            tasks=["megastack_capitals"],
            limit=4,
            num_fewshot=1,
            apply_chat_template=True,
            system_instruction="Answer with the capital.",
            fewshot_as_multiturn=True,
        ),
    )
    assert ev.status.state == common_pb2.JOB_STATE_SUCCEEDED, ev.status.error
    # lm-eval's base model raises NotImplementedError for chat templates: the run succeeding means TextgenLM
    # laid the prompts out, with the served model's template
    from services.evaluator.lm import TextgenLM

    lm = TextgenLM(tg.address)
    text = lm.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}])
    assert text.startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n") and lm.chat_template(True) == lm.info.chat_template
    run = json.loads(open(ev.result.results_path).read())["megastack"]
    assert run == {
        "apply_chat_template": True,
        "system_instruction": "Answer with the capital.",
        "fewshot_as_multiturn": True,
        "batch_invariant": "scoring",
        "determinism": 1.0,
        "request_cache": None,  # this module's evaluator runs without one
    }
    import shutil

    plain = shutil.copytree(tiny_models["llama"], tmp_path / "no-template")
    for f in plain.rglob("chat_template.jinja"):
        f.unlink()
    cfg = plain / "tokenizer_config.json"
    cfg.write_text(json.dumps({k: v for k, v in json.loads(cfg.read_text()).items() if k != "chat_template"}))
    bare = start_textgen(plain)
    try:
        for spec, field in (
            (dict(textgen_address=bare.address, apply_chat_template=True), "apply_chat_template"),
            (dict(textgen_address=tg.address, fewshot_as_multiturn=True), "fewshot_as_multiturn"),
        ):
            with pytest.raises(grpc.RpcError) as e:
                submit(stub, tasks=["megastack_capitals"], limit=2, **spec)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert (ERROR_FIELD_KEY, field) in e.value.trailing_metadata()
    finally:
        bare.stop()


def test_hf_checkpoint_runs(stub, tiny_models):
    ok = follow(
        stub, submit(stub, hf_checkpoint=str(tiny_models["llama"]), tasks=["megastack_capitals"], limit=4)
    )
    assert ok.status.state == SUCCEEDED, ok.status.error
    assert 0 <= scores(ok)["megastack_capitals"]["acc,none"] <= 1 and ok.result.tasks[0].num_samples == 4
    # lm-eval's own model has its requests counted too: 4 questions x 4 choices, all done
    assert ok.result.num_requests == 16 and ok.status.progress.done == ok.status.progress.total == 16


@pytest.mark.parametrize(
    "suite,dataset",
    [
        ("mmlu", "cais/mmlu"),
        ("cmmlu", "haonan-li/cmmlu"),
        ("ceval-valid", "ceval/ceval-exam"),
        ("boolq", "aps/super_glue"),
        ("gsm8k", "openai/gsm8k"),
    ],
)
def test_named_suites_without_local_data_are_refused_naming_where_it_was_looked_for(
    stub, served, suite, dataset
):
    from services.evaluator.harness import dataset_locations

    if any(p.is_dir() for p in dataset_locations(dataset)):
        pytest.skip(f"{dataset} is on this machine")
    before = len(stub.ListEvaluations(pb.ListEvaluationsRequest()).evaluations)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        submit(stub, textgen_address=served[0].address, tasks=[suite])
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and time.monotonic() - t0 < 10
    msg = e.value.details()
    assert f"the data of {suite} is not on this machine" in msg and dataset in msg
    assert all(str(p) in msg for p in dataset_locations(dataset)) and "HF_HOME" in msg
    assert len(stub.ListEvaluations(pb.ListEvaluationsRequest()).evaluations) == before


@pytest.mark.parametrize(
    "spec, field",
    [
        (dict(include_paths=["/"]), "include_paths"),  # walk the disk, import any !function
        (dict(include_paths=["{root}/../outside"]), "include_paths"),  # .. resolved
        (dict(include_paths=["{root}/link"]), "include_paths"),  # a symlink out of the roots
        (dict(hf_checkpoint="/etc"), "hf_checkpoint"),
        (dict(completions_url="http://169.254.169.254/v1/completions"), "completions_url"),
        (dict(completions_url="http://10.1.2.3:5000/v1/completions"), "completions_url"),
        (dict(textgen_address="db.internal:5432"), "textgen_address"),
    ],
)
def test_jobs_read_only_under_the_data_roots_and_call_only_allowed_endpoints(
    stub, tmp_path, monkeypatch, spec, field
):
    root = tmp_path / "root"
    (root / "tasks").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    monkeypatch.setenv("MEGASTACK_DATA_ROOTS", str(root))  # read by the in-process service at each call
    spec = {k: [x.format(root=root) for x in v] if isinstance(v, list) else v for k, v in spec.items()}
    model = (
        {}
        if {"hf_checkpoint", "completions_url", "textgen_address"} & set(spec)
        else {"textgen_address": "127.0.0.1:1"}
    )
    before = len(stub.ListEvaluations(pb.ListEvaluationsRequest()).evaluations)
    with pytest.raises(grpc.RpcError) as e:
        submit(stub, tasks=["megastack_capitals"], **model, **spec)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert dict(e.value.trailing_metadata()).get("x-error-field") == field
    assert "data roots" in e.value.details() or "allowed model endpoint" in e.value.details()
    assert len(stub.ListEvaluations(pb.ListEvaluationsRequest()).evaluations) == before


def test_a_rerun_is_answered_from_the_request_cache(served, tmp_path):
    """With the request cache (the service's default), evaluating the same model again sends nothing to
    textgen and gives the same scores; the record says how many answers came from the cache."""
    tg, _ = served
    servicer, server = start_evaluator(tmp_path / "jobs", tmp_path / "jobs" / "cache.sqlite")
    try:
        with make_channel(server.address) as ch:
            st = pb_grpc.EvaluatorServiceStub(ch)
            runs = []
            for _ in range(2):
                ev = follow(st, submit(st, textgen_address=tg.address, tasks=["megastack_capitals"], limit=6))
                assert ev.status.state == SUCCEEDED, ev.status.error
                runs.append(ev)
        first, again = runs
        assert first.result.requests_sent == first.result.num_requests > 0 and first.result.cache_hits == 0
        assert again.result.requests_sent == 0 and again.result.cache_hits == first.result.num_requests
        assert scores(again) == scores(first)
        stored = json.loads(Path(again.result.results_path).read_text())["megastack"]["request_cache"]
        assert stored == {"hits": first.result.num_requests, "misses": 0, "sent": 0}
    finally:
        servicer.runner.shutdown()
        server.stop(0)


def test_a_mixture_of_experts_model_scores_through_textgen_as_through_transformers(stub, tiny_models):
    """The evaluator needs nothing for MoE: the tiny Mixtral served by textgen gets the scores lm-eval's own
    transformers model gives it, every choice's log-likelihood within 1e-4."""
    tg = start_textgen(tiny_models["mixtral"])
    try:
        served = follow(stub, submit(stub, textgen_address=tg.address, tasks=["megastack_capitals"], limit=8))
    finally:
        tg.stop()
    local = follow(
        stub, submit(stub, hf_checkpoint=str(tiny_models["mixtral"]), tasks=["megastack_capitals"], limit=8)
    )
    for ev in (served, local):
        assert ev.status.state == SUCCEEDED, ev.status.error
    assert scores(served)["megastack_capitals"] == pytest.approx(
        scores(local)["megastack_capitals"], abs=1e-9
    )
    import ast

    per_sample = [
        [json.loads(x) for x in Path(ev.result.results_path).with_name("samples.jsonl").open()]
        for ev in (served, local)
    ]
    assert len(per_sample[0]) == len(per_sample[1]) == 8
    for a, b in zip(*per_sample):  # each choice's log-likelihood, textgen's vs transformers'
        assert a["metrics"] == b["metrics"]
        mine, theirs = ast.literal_eval(a["answer"]), ast.literal_eval(b["answer"])
        assert [x for x, _ in mine] == pytest.approx([x for x, _ in theirs], abs=1e-4)
