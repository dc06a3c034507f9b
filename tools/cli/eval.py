"""`megastack eval`: lm-evaluation-harness runs on the evaluator service, kept and comparable."""

from __future__ import annotations

import argparse
import sys

from tools.cli.endpoints import endpoint
from tools.cli.leaderboard import add_parser as add_leaderboard
from tools.cli.leaderboard import headline as _headline


def _stub(server: str):
    from protos.evaluator.v1 import evaluator_pb2_grpc as pb_grpc
    from shared.grpc.channel import make_channel

    channel = make_channel(server)
    return channel, pb_grpc.EvaluatorServiceStub(channel)


def _state(ev) -> str:
    from protos.common.v1 import common_pb2

    return common_pb2.JobState.Name(ev.status.state).removeprefix("JOB_STATE_").lower()


def _model(ev) -> str:
    s = ev.spec
    return s.textgen_address or s.hf_checkpoint or s.completions_url


def _line(ev) -> str:
    p = ev.status.progress
    parts = [f"{ev.status.job_id}  {_state(ev):<9}  {ev.spec.name or ','.join(ev.spec.tasks)}", _model(ev)]
    if p.total:
        parts.append(f"{p.done}/{p.total} requests")
    for t in ev.result.tasks:
        main = _headline(t.metrics)
        if main:
            parts.append(f"{t.task} {main[0]}={main[1]:.4f}")
    if ev.status.error:
        parts.append(f"({ev.status.error})")
    return "  ".join(parts)


def run(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from protos.common.v1 import common_pb2
    from protos.evaluator.v1 import evaluator_pb2 as pb
    from tools.cli.rpc import rpc

    spec = pb.EvaluationSpec(
        tasks=[t for arg in a.tasks for t in arg.split(",") if t],
        num_fewshot=a.num_fewshot,
        limit=a.limit,
        batch_size=a.batch_size,
        seed=a.seed,
        name=a.name,
        include_paths=[str(p) for p in a.include_path],
        apply_chat_template=a.apply_chat_template,
        system_instruction=a.system_instruction,
        fewshot_as_multiturn=a.fewshot_as_multiturn,
    )
    if a.hf:
        spec.hf_checkpoint = str(a.hf.absolute())
    elif a.completions_url:
        spec.completions_url = a.completions_url
    else:
        spec.textgen_address = a.model
    channel, stub = _stub(a.server)
    with channel:
        if a.dry_run:
            rpc(stub.SubmitEvaluation, pb.SubmitEvaluationRequest(spec=spec, validate_only=True))
            print("valid (checked by the evaluator service; nothing submitted)")
            return 0
        job_id = rpc(stub.SubmitEvaluation, pb.SubmitEvaluationRequest(spec=spec)).job_id
        print(job_id, flush=True)
        if a.detach:
            return 0
        bar = tqdm(total=0, unit="req", desc=job_id, leave=False, disable=a.no_progress)
        last = None
        for ev in rpc(stub.WatchEvaluation, pb.WatchEvaluationRequest(job_id=job_id), stream=True):
            last = ev.evaluation
            p = last.status.progress
            bar.total, bar.n = int(p.total), int(p.done)
            bar.set_postfix_str(p.message[-30:], refresh=False)
            bar.refresh()
        bar.close()
    if last is None or last.status.state != common_pb2.JOB_STATE_SUCCEEDED:
        print(
            f"megastack eval: {job_id} {_state(last) if last else 'failed'}: "
            f"{last.status.error if last else 'no status received'}",
            file=sys.stderr,
        )
        return 1
    print(last.result.summary)
    print(
        f"{last.result.num_requests} requests in {last.result.seconds:.1f}s; lm-eval results: "
        f"{last.result.results_path}"
    )
    return 0


def _get(stub, job_id: str):
    from protos.evaluator.v1 import evaluator_pb2 as pb
    from tools.cli.rpc import rpc

    return rpc(stub.GetEvaluation, pb.GetEvaluationRequest(job_id=job_id)).evaluation


def status(a: argparse.Namespace) -> int:
    channel, stub = _stub(a.server)
    with channel:
        print(_line(_get(stub, a.job_id)))
    return 0


def results(a: argparse.Namespace) -> int:
    from pathlib import Path

    channel, stub = _stub(a.server)
    with channel:
        ev = _get(stub, a.job_id)
    if not ev.result.results_path:
        print(
            f"megastack eval: {a.job_id} has no results "
            f"({_state(ev)}{': ' + ev.status.error if ev.status.error else ''})",
            file=sys.stderr,
        )
        return 1
    if a.json:
        print(Path(ev.result.results_path).read_text())
    else:
        print(ev.result.summary)
    return 0


def compare_rows(runs: list) -> list[tuple[str, str, list[float | None]]]:
    """(task, metric, value per run) for every metric any run reports."""
    keys: dict[tuple[str, str], None] = {}
    for ev in runs:
        for t in ev.result.tasks:
            for m in sorted(t.metrics):
                keys[(t.task, m)] = None
    rows = []
    for task, metric in keys:
        values = []
        for ev in runs:
            found = [t.metrics[metric] for t in ev.result.tasks if t.task == task and metric in t.metrics]
            values.append(found[0] if found else None)
        rows.append((task, metric, values))
    return rows


def _paired(runs: list, max_flipped: int) -> dict[tuple[str, str], object]:
    """(task, metric) -> the paired comparison of two runs' per-sample scores, when both wrote them."""
    from pathlib import Path

    from services.evaluator.api import compare_samples, read_samples

    paths = [Path(ev.result.results_path).with_name("samples.jsonl") for ev in runs]
    if len(runs) != 2 or not all(p.is_file() for p in paths):
        return {}
    found = compare_samples(read_samples(paths[0]), read_samples(paths[1]), max_flipped=max_flipped)
    return {(c.task, c.metric): c for c in found}


def compare(a: argparse.Namespace) -> int:
    channel, stub = _stub(a.server)
    with channel:
        runs = [_get(stub, j) for j in a.job_ids]
    for ev in runs:
        if not ev.result.tasks:
            print(f"megastack eval: {ev.status.job_id} has no results ({_state(ev)})", file=sys.stderr)
            return 1
    paired = _paired(runs, a.samples)
    heads = [ev.status.job_id for ev in runs]
    extra = ["delta", "stderr", "p", "n"] if len(runs) == 2 else []
    table = [["task", "metric", *heads, *extra]]
    flagged = []
    for task, metric, values in compare_rows(runs):
        cells = ["-" if v is None else f"{v:.4f}" for v in values]
        if len(runs) == 2:
            cells.append("-" if None in values else f"{values[1] - values[0]:+.4f}")
            c = paired.get((task, metric.split(",")[0]))
            if c is None:
                cells += ["-", "-", "-"]
            else:
                star = " *" if c.significant else ""
                cells += [f"{c.stderr:.4f}", f"{c.p_value:.3g} ({c.test}){star}", str(c.n)]
                if c.significant:
                    flagged.append(c)
        table.append([task, metric.replace(",none", ""), *cells])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for i, row in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for ev in runs:
        print(
            f"{ev.status.job_id}: {_model(ev)}  tasks={','.join(ev.spec.tasks)}  "
            f"limit={ev.spec.limit or 'all'}  "
            f"fewshot={ev.spec.num_fewshot if ev.spec.num_fewshot >= 0 else 'default'}"
        )
    if len(runs) == 2:
        if not paired:
            print("no per-sample scores in both runs: delta only, no significance test")
        else:
            print(
                "p: paired over the samples both runs scored (McNemar's exact test for 0/1 metrics, a paired "
                "bootstrap otherwise); * = significant at 0.05"
                + (f": {', '.join(f'{c.task} {c.metric}' for c in flagged)}" if flagged else ": none")
            )
        for c in paired.values() if a.samples else ():
            for f in c.flipped:
                print(
                    f"  {c.task} {c.metric} doc {f['doc_id']}: {f['a']:g} -> {f['b']:g}  "
                    f"{f['answer_a']} -> {f['answer_b']}"
                )
    return 0


def cancel(a: argparse.Namespace) -> int:
    from protos.evaluator.v1 import evaluator_pb2 as pb
    from tools.cli.rpc import rpc

    channel, stub = _stub(a.server)
    with channel:
        print(
            _line(
                rpc(
                    stub.CancelEvaluation, pb.CancelEvaluationRequest(job_id=a.job_id, reason=a.reason)
                ).evaluation
            )
        )
    return 0


def list_runs(a: argparse.Namespace) -> int:
    from protos.evaluator.v1 import evaluator_pb2 as pb
    from tools.cli.rpc import rpc

    channel, stub = _stub(a.server)
    with channel:
        for ev in rpc(stub.ListEvaluations, pb.ListEvaluationsRequest(limit=a.limit)).evaluations:
            print(_line(ev))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "eval",
        help="lm-evaluation-harness runs against served models",
        description="Evaluate a model with lm-evaluation-harness through the evaluator service. The offline "
        "suite (megastack_suite: capitals, arithmetic, prose) ships with megastack; any lm-eval "
        "task works when its data is available offline.",
    )
    p.add_argument(
        "--server", default=endpoint("evaluator"), help="evaluator service address (default %(default)s)"
    )
    esub = p.add_subparsers(dest="eval_cmd", required=True)
    r = esub.add_parser("run", help="submit an evaluation and follow it to the summary table")
    r.add_argument(
        "tasks",
        nargs="+",
        help="lm-eval task or group names (comma- or space-separated), e.g. megastack_suite",
    )
    m = r.add_mutually_exclusive_group()
    m.add_argument(
        "--model", default=endpoint("textgen"), help="textgen gRPC address to evaluate (default %(default)s)"
    )
    m.add_argument(
        "--hf", type=Path, help="evaluate an HF checkpoint folder with lm-eval's own `hf` model instead"
    )
    m.add_argument(
        "--completions-url", help="evaluate an OpenAI /v1/completions endpoint (lm-eval local-completions)"
    )
    r.add_argument("--num-fewshot", type=int, default=-1, help="few-shot examples (default: the task's own)")
    r.add_argument("--limit", type=int, default=0, help="first N documents per task (default: all)")
    r.add_argument("--batch-size", type=int, default=16, help="requests sent together (default %(default)s)")
    r.add_argument("--seed", type=int, default=1234)
    r.add_argument("--name", default="", help="a label for the run")
    r.add_argument(
        "--include-path",
        type=Path,
        action="append",
        default=[],
        help="a folder of extra task YAMLs (repeatable)",
    )
    r.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="lay prompts out with the served model's own chat template (refused when it has none)",
    )
    r.add_argument("--system-instruction", default="", help="a system message before each prompt")
    r.add_argument(
        "--fewshot-as-multiturn",
        action="store_true",
        help="few-shot examples as alternating chat turns (with --apply-chat-template)",
    )
    r.add_argument("--detach", "-d", action="store_true", help="print the job id and return")
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="the service checks the run as a submit does (tasks, data, model reachable); nothing submitted",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=run)
    st = esub.add_parser("status", help="one run's state, progress and headline scores")
    st.add_argument("job_id")
    st.set_defaults(func=status)
    rs = esub.add_parser("results", help="a finished run's summary table (or lm-eval's JSON)")
    rs.add_argument("job_id")
    rs.add_argument("--json", action="store_true", help="print lm-eval's results JSON")
    rs.set_defaults(func=results)
    c = esub.add_parser(
        "compare",
        help="two (or more) runs side by side; for two, the difference with its standard error and a paired "
        "significance test over the samples both scored",
    )
    c.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    c.add_argument(
        "--samples",
        type=int,
        default=0,
        metavar="N",
        help="list up to N samples per metric whose score flipped",
    )
    c.set_defaults(func=compare)
    ca = esub.add_parser("cancel", help="stop a run (its answered requests are kept)")
    ca.add_argument("job_id")
    ca.add_argument("--reason", default="cancelled from the CLI")
    ca.set_defaults(func=cancel)
    ls = esub.add_parser("list", help="runs, newest first")
    ls.add_argument("--limit", type=int, default=20)
    ls.set_defaults(func=list_runs)
    add_leaderboard(esub)
