"""`megastack demo` (make demo): the whole lifecycle on the embedded default model, through the services.

    prose corpus (shipped wheel) -> preprocess (.bin/.idx)
    -> converter: HF -> megatron-core torch_dist, TP=3 (with logits parity)
    -> trainer: continued pretraining on a local Ray head, PP=2 (the checkpoint is resharded at load)
    -> converter: the trained torch_dist checkpoint -> HF (with logits parity)
    -> textgen + gateway serve it; `megastack generate` asks it a question over PUT /api
    -> evaluator: the offline suite on the trained model (through textgen) and the original (lm-eval hf)
    -> a summary table

Artifacts go to runs/demo/, service state and logs to .run/demo/. Re-running starts from scratch
(previous demo processes are stopped, previous artifacts replaced); every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shared.atomic import check_output_folder, reset_output_folder
from shared.errors import InvalidArgument
from shared.paths import DEFAULT_MODEL_DIR, REPO_ROOT, RUN_DIR
from shared.roots import ENDPOINTS_ENV
from tools.stack import StackOptions, down, free_port, up

PROMPT = "The capital of France is"


DEFAULT_WORK, DEFAULT_RUN = REPO_ROOT / "runs" / "demo", RUN_DIR / "demo"


def _default_folder(p: Path) -> bool:
    """The demo's own default folders (made by demos before the output marker existed)."""
    return p in (DEFAULT_WORK.resolve(), DEFAULT_RUN.resolve())


class Demo:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.work: Path = a.work_dir
        self.state: Path = a.run_dir
        self.rows: list[tuple[str, str, str]] = []
        self.t0 = time.perf_counter()
        self.step_no = 0

    # -- printing --------------------------------------------------------------------------------
    def step(self, title: str, *commands: str) -> None:
        self.step_no += 1
        print(f"\n== [{self.step_no}/8] {title}  (+{time.perf_counter() - self.t0:.0f}s)", flush=True)
        for c in commands:
            print(f"   $ {c}")

    def row(self, stage: str, what: str, value: str) -> None:
        self.rows.append((stage, what, value))
        print(f"   {what}: {value}", flush=True)

    # -- the job -----------------------------------------------------------------------------------
    def run(self) -> int:
        a = self.a
        # both folders are emptied: only when new, empty or megastack's own, and never one holding the model
        folders = ((self.state, "--run-dir"), (self.work, "--work-dir"))
        for d, flag in folders:
            check_output_folder(d, inputs=[a.model_dir], field=flag, owned=_default_folder)
        for d in (self.state / "jobs", self.state / "serve"):
            down(d)
        for d, flag in folders:
            reset_output_folder(d, inputs=[a.model_dir], field=flag, owned=_default_folder)
        print(f"megastack demo on {a.model_dir} (artifacts in {self.work}, logs in {self.state})")
        jobs = serve = None
        try:
            self.step(
                "start the job services: converter, trainer (with a local Ray head), evaluator",
                "megastack up",
            )
            jobs = up(
                StackOptions(
                    run_dir=self.state / "jobs",
                    model_dir=a.model_dir,
                    free_ports=True,
                    services=("converter", "trainer", "evaluator"),
                    data_roots=(self.work, a.model_dir),
                    extra_env={ENDPOINTS_ENV: "127.0.0.1"},
                ),  # the model is served later, on a free port
                log=lambda s: print(" " + s),
            )
            data_prefix = self.preprocess()
            mcore = self.convert(
                jobs.endpoint("converter", "grpc"),
                a.model_dir,
                self.work / "mcore",
                "mcore",
                tp=3,
                title="convert HF -> megatron-core torch_dist, TP=3",
            )
            cpt = self.train(jobs.endpoint("trainer", "grpc"), mcore, data_prefix)
            hf = self.convert(
                jobs.endpoint("converter", "grpc"),
                cpt,
                self.work / "hf",
                "hf",
                tp=1,
                title="convert the trained checkpoint back to HF",
            )
            self.step(
                "serve the trained model: textgen + gateway",
                f"megastack up --model-dir {hf} --services textgen,gateway",
            )
            port = a.port if _port_free(a.port) else free_port()
            serve = up(
                StackOptions(
                    run_dir=self.state / "serve",
                    model_dir=hf,
                    services=("textgen", "gateway"),
                    gateway_port=port,
                ),
                log=lambda s: print(" " + s),
            )
            self.generate(serve.endpoint("gateway", "http"))
            self.evaluate(jobs.endpoint("evaluator", "grpc"), serve.endpoint("textgen", "grpc"), a.model_dir)
        finally:
            for stack in (serve, jobs):
                if stack is not None:
                    stack.down()
        self.summary()
        return 0

    def preprocess(self) -> str:
        corpus = self.work / "corpus.jsonl"
        prefix = self.work / "data" / "prose"
        exe = str(Path(sys.executable).with_name("megastack"))
        cmd = [
            exe,
            "preprocess",
            "--input",
            str(corpus),
            "--output-prefix",
            str(prefix),
            "--tokenizer-name-or-path",
            str(self.a.model_dir),
            "--append-eod",
        ]
        self.step("preprocess a prose corpus into Megatron .bin/.idx", " ".join(_rel(c) for c in cmd[1:]))
        docs = write_corpus(corpus)
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"preprocess failed:\n{out.stdout}{out.stderr}")
        from llm.indexed_dataset import IndexedDatasetReader

        tokens = int(IndexedDatasetReader(str(prefix) + "_text_document").lengths.sum())
        self.row(
            "preprocess",
            "corpus",
            f"{docs} documents, {corpus.stat().st_size / 1e6:.1f} MB -> {tokens:,} tokens "
            f"in {time.perf_counter() - t:.1f}s",
        )
        return str(prefix) + "_text_document"

    def convert(self, address: str, src: Path, dst: Path, fmt: str, *, tp: int, title: str) -> Path:
        from protos.common.v1 import common_pb2
        from protos.converter.v1 import converter_pb2 as pb
        from protos.converter.v1 import converter_pb2_grpc as pb_grpc
        from shared.grpc.channel import make_channel
        from tools.cli.rpc import rpc

        target = {"mcore": common_pb2.CHECKPOINT_FORMAT_MCORE, "hf": common_pb2.CHECKPOINT_FORMAT_HF}[fmt]
        self.step(
            title,
            f"megastack convert --load-dir {_rel(src)} --save-dir {_rel(dst)} --target-format {fmt}"
            + (f" --target-tensor-parallel-size {tp}" if tp > 1 else "")
            + " --verify --server "
            + address,
        )
        with make_channel(address) as ch:
            stub = pb_grpc.ConverterServiceStub(ch)
            spec = pb.ConversionSpec(
                load_dir=str(src),
                save_dir=str(dst),
                target_format=target,
                target_tensor_parallel_size=tp,
                verify=True,
            )
            job_id = rpc(stub.SubmitConversion, pb.SubmitConversionRequest(spec=spec)).job_id
            last = None
            for ev in rpc(stub.WatchConversion, pb.WatchConversionRequest(job_id=job_id), stream=True):
                last = ev.conversion
        if last is None or last.status.state != common_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(
                f"conversion {job_id} did not succeed: {last.status.error if last else 'no status'}"
            )
        r, p = last.result, last.result.parity
        stage = "convert " + ("HF->mcore" if fmt == "mcore" else "mcore->HF")
        self.row(
            stage,
            "time",
            f"{r.seconds:.1f}s, {r.bytes_written / 1e6:.0f} MB written, peak RSS "
            f"{r.peak_rss_bytes / 1e6:.0f} MB",
        )
        self.row(
            stage,
            "logits parity",
            f"max |diff| {p.max_abs_logit_diff:.2e}, top-1 agreement {100 * p.top1_agreement:.1f}%, "
            f"weights exact: {'yes' if p.weights_exact else 'no'}",
        )
        return dst

    def train(self, address: str, init_from: Path, data_prefix: str) -> Path:
        import yaml

        from protos.common.v1 import common_pb2
        from protos.trainer.v1 import trainer_pb2 as pb
        from protos.trainer.v1 import trainer_pb2_grpc as pb_grpc
        from services.trainer.api import spec_from_dict, spec_to_pb, validate
        from shared.grpc.channel import make_channel
        from tools.cli.rpc import rpc

        save_dir = self.work / "cpt"
        doc = {
            "name": "demo-continued-pretraining",
            "kind": "pretrain",
            "model": {"init_from": str(init_from)},
            "data": {"paths": [{"prefix": data_prefix, "weight": 1.0}], "split": "98,1,1", "seq_length": 256},
            "parallel": {"tensor_parallel": 1, "pipeline_parallel": 2},
            "optimizer": {
                "lr": 5e-5,
                "min_lr": 5e-6,
                "lr_warmup_iters": 1,
                "lr_decay_style": "cosine",
                "clip_grad": 1.0,
            },
            "training": {
                "micro_batch_size": 1,
                "global_batch_size": 4,
                "train_iters": self.a.train_iters,
                "precision": self.a.precision,
                "log_interval": 1,
            },
            "checkpoint": {"save_dir": str(save_dir), "save_interval": self.a.train_iters},
            "resources": {"cpus_per_worker": 1, "max_retries": 1},
        }
        spec_file = self.work / "cpt.yaml"
        spec_file.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.step(
            f"continued pretraining on Ray: {self.a.train_iters} steps, PP=2 (resharded from TP=3 at load)",
            f"megastack train submit {_rel(spec_file)} --follow --server {address}",
        )
        spec = spec_from_dict(doc)
        validate(spec)
        with make_channel(address) as ch:
            stub = pb_grpc.TrainerServiceStub(ch)
            job_id = rpc(stub.SubmitTrainJob, pb.SubmitTrainJobRequest(spec=spec_to_pb(spec))).job_id
            last, shown = None, 0
            for ev in rpc(stub.WatchTrainJob, pb.WatchTrainJobRequest(job_id=job_id), stream=True):
                last = ev.job
                m = last.metrics
                if m.step > shown:
                    shown = m.step
                    print(
                        f"   step {m.step}/{self.a.train_iters}  loss {m.loss:.4f}  lr {m.lr:.2e}  "
                        f"{m.tokens_per_s:,.0f} tok/s",
                        flush=True,
                    )
        if last is None or last.status.state != common_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(
                f"training job {job_id} did not succeed: {last.status.error if last else 'no status'}"
            )
        curve = [
            json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
        ]
        curve = [c for c in curve if "loss" in c and not c.get("done")]
        times = [c["step_time_s"] for c in curve[1:] if "step_time_s" in c] or [
            c.get("step_time_s", 0.0) for c in curve
        ]
        self.row(
            "train (Ray, PP=2)",
            "steps",
            f"{last.metrics.step} x {4 * 256} tokens, loss {curve[0]['loss']:.3f} -> {curve[-1]['loss']:.3f}",
        )
        self.row(
            "train (Ray, PP=2)",
            "step time",
            f"median {statistics.median(times):.2f}s, {last.metrics.tokens_per_s:,.0f} tok/s, "
            f"{last.metrics.tflops * 1000:.0f} GFLOP/s",
        )
        return save_dir

    def generate(self, url: str) -> None:
        self.step(
            "generate through the gateway with `megastack generate` (Megatron's PUT /api)",
            f"megastack generate --url {url} -n 24 --greedy -p {PROMPT!r}",
        )
        t = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tools.cli.main",
                "generate",
                "--url",
                url,
                "-n",
                "24",
                "--greedy",
                "-p",
                PROMPT,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO_ROOT,
        )
        text = out.stdout.strip()
        if out.returncode != 0 or not text.startswith(PROMPT):
            raise RuntimeError(f"megastack generate failed:\n{out.stdout}{out.stderr}")
        print(f"   {text!r}")
        self.row(
            "serve", "PUT /api (24 tokens)", f"{time.perf_counter() - t:.1f}s end to end: {text[:60]!r}..."
        )

    def evaluate(self, address: str, textgen: str, base_model: Path) -> None:
        from protos.common.v1 import common_pb2
        from protos.evaluator.v1 import evaluator_pb2 as pb
        from protos.evaluator.v1 import evaluator_pb2_grpc as pb_grpc
        from shared.grpc.channel import make_channel
        from tools.cli.eval import _headline
        from tools.cli.rpc import rpc

        self.step(
            "evaluate the offline suite: the trained model (through textgen) vs. the original (lm-eval hf)",
            f"megastack eval run megastack_suite --model {textgen} --server {address}",
            f"megastack eval run megastack_suite --hf {_rel(base_model)} --server {address}",
            f"megastack eval compare <trained> <original> --server {address}",
        )
        runs = {}
        with make_channel(address) as ch:
            stub = pb_grpc.EvaluatorServiceStub(ch)
            for label, model in (
                ("trained", {"textgen_address": textgen}),
                ("original", {"hf_checkpoint": str(base_model)}),
            ):
                spec = pb.EvaluationSpec(tasks=["megastack_suite"], name=f"demo-{label}", **model)
                job_id = rpc(stub.SubmitEvaluation, pb.SubmitEvaluationRequest(spec=spec)).job_id
                last = None
                for ev in rpc(stub.WatchEvaluation, pb.WatchEvaluationRequest(job_id=job_id), stream=True):
                    last = ev.evaluation
                if last is None or last.status.state != common_pb2.JOB_STATE_SUCCEEDED:
                    raise RuntimeError(
                        f"evaluation {job_id} did not succeed: {last.status.error if last else 'no status'}"
                    )
                runs[label] = last
                print(
                    f"   {label}: {job_id}, {last.result.num_requests or '-'} requests in "
                    f"{last.result.seconds:.1f}s"
                )
        for t in runs["trained"].result.tasks:
            if not _headline(t.metrics):
                continue  # a group's own row
            name, value = _headline(t.metrics)
            base = next((b for b in runs["original"].result.tasks if b.task == t.task), None)
            key = next(k for k in t.metrics if k.startswith(name + ","))
            before = f" (original {base.metrics.get(key, float('nan')):.3f})" if base else ""
            self.row("evaluate", f"{t.task} {name}", f"{value:.3f}{before}")
        self.row("evaluate", "results", runs["trained"].result.results_path)

    def summary(self) -> None:
        print(f"\n== summary (demo finished in {time.perf_counter() - self.t0:.0f}s; all services stopped)\n")
        widths = [max(len(r[i]) for r in self.rows) for i in range(2)]
        for stage, what, value in self.rows:
            print(f"  {stage:<{widths[0]}}  {what:<{widths[1]}}  {value}")
        print(
            f"\n  artifacts: {_rel(self.work)}/ (corpus.jsonl, data/, mcore/, cpt.yaml, cpt/, hf/); logs: "
            f"{_rel(self.state)}/"
        )


def write_corpus(path: Path) -> int:
    from tools.assets import write_prose_corpus

    with path.open("w") as f:
        return write_prose_corpus(f)


def _rel(p: Any) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(p)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def run(a: argparse.Namespace) -> int:
    if a.precision == "auto":
        import torch

        a.precision = "bf16" if torch.cuda.is_available() else "fp32"
    try:
        return Demo(a).run()
    except InvalidArgument as e:
        print(f"megastack demo: error: {e.message}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"megastack demo: error: {e}", file=sys.stderr)
        return 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole lifecycle end to end on the default model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK,
        help="artifacts (default runs/demo); emptied first, so it must be new, empty or an earlier demo's",
    )
    p.add_argument(
        "--run-dir",
        type=Path,
        default=DEFAULT_RUN,
        help="service state and logs (default .run/demo); emptied first, like --work-dir",
    )
    p.add_argument(
        "--train-iters", type=int, default=10, help="continued-pretraining steps (default %(default)s)"
    )
    p.add_argument(
        "--precision", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 on GPU, fp32 on CPU"
    )
    p.add_argument("--port", type=int, default=5000, help="gateway port (a free one if it is taken)")
    p.set_defaults(func=run)
