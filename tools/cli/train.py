"""`megastack train`: submit typed training jobs to the trainer service and follow them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tools.cli.endpoints import endpoint
from tools.cli.import_args import FORMATS as IMPORT_FORMATS


def _stub(server: str):
    from protos.trainer.v1 import trainer_pb2_grpc as pb_grpc
    from shared.grpc.channel import make_channel

    channel = make_channel(server)
    return channel, pb_grpc.TrainerServiceStub(channel)


def _state(job) -> str:
    from protos.common.v1 import common_pb2

    return common_pb2.JobState.Name(job.status.state).removeprefix("JOB_STATE_").lower()


def _line(job) -> str:
    m = job.metrics
    parts = [
        f"{job.status.job_id}  {_state(job):<9}  {job.spec.name}",
        f"step {m.step}/{job.spec.training.train_iters}",
    ]
    if m.step:
        parts += [
            f"loss {m.loss:.4f}",
            f"lr {m.lr:.3g}",
            f"{m.tokens_per_s:,.0f} tok/s",
            f"{m.tflops * 1000:.2f} GFLOP/s",
            f"MFU {m.mfu:.1%}",
        ]
    if job.status.attempt > 1:
        parts.append(f"attempt {job.status.attempt}")
    if job.status.error:
        parts.append(f"({job.status.error})")
    return "  ".join(parts)


def submit(a: argparse.Namespace) -> int:
    from protos.trainer.v1 import trainer_pb2 as pb
    from services.trainer.api import load_yaml, spec_to_pb
    from tools.cli.rpc import rpc

    spec = load_yaml(
        a.spec
    )  # YAML -> the proto's fields (unknown keys refused by name); the service validates
    channel, stub = _stub(a.server)
    with channel:
        if a.dry_run:
            rpc(stub.SubmitTrainJob, pb.SubmitTrainJobRequest(spec=spec_to_pb(spec), validate_only=True))
            print(f"{a.spec}: valid (checked by the trainer service; nothing submitted)")
            return 0
        job_id = rpc(stub.SubmitTrainJob, pb.SubmitTrainJobRequest(spec=spec_to_pb(spec))).job_id
        print(job_id)
        if not a.follow:
            return 0
        last = None
        for ev in rpc(stub.WatchTrainJob, pb.WatchTrainJobRequest(job_id=job_id), stream=True):
            line = _line(ev.job)
            if line != last:
                print(line, flush=True)
                last = line
        return 0 if ev.job.status.error == "" and _state(ev.job) == "succeeded" else 1


def status(a: argparse.Namespace) -> int:
    from protos.trainer.v1 import trainer_pb2 as pb
    from tools.cli.rpc import rpc

    channel, stub = _stub(a.server)
    with channel:
        print(_line(rpc(stub.GetTrainJob, pb.GetTrainJobRequest(job_id=a.job_id)).job))
    return 0


def logs(a: argparse.Namespace) -> int:
    from protos.trainer.v1 import trainer_pb2 as pb
    from tools.cli.rpc import rpc

    channel, stub = _stub(a.server)
    with channel:
        for chunk in rpc(
            stub.GetTrainJobLogs, pb.GetTrainJobLogsRequest(job_id=a.job_id, follow=a.follow), stream=True
        ):
            for line in chunk.lines:
                print(line, flush=True)
    return 0


def cancel(a: argparse.Namespace) -> int:
    from protos.trainer.v1 import trainer_pb2 as pb
    from tools.cli.rpc import rpc

    channel, stub = _stub(a.server)
    with channel:
        print(_line(rpc(stub.CancelTrainJob, pb.CancelTrainJobRequest(job_id=a.job_id, reason=a.reason)).job))
    return 0


def list_jobs(a: argparse.Namespace) -> int:
    from protos.trainer.v1 import trainer_pb2 as pb
    from tools.cli.rpc import rpc

    channel, stub = _stub(a.server)
    with channel:
        for job in rpc(stub.ListTrainJobs, pb.ListTrainJobsRequest(limit=a.limit)).jobs:
            print(_line(job))
    return 0


def import_args(a: argparse.Namespace) -> int:
    import sys

    from services.trainer.api import spec_from_dict, validate
    from tools.cli.import_args import import_args as do_import
    from tools.cli.import_args import render_yaml, split_command_text

    if a.from_file:
        tokens = split_command_text(Path(a.from_file).read_text())
    else:
        tokens = list(a.args)
        if tokens and tokens[0] == "--":
            tokens = tokens[1:]
    if not tokens:
        print(
            "megastack train import-args: give the arguments after `--`, or --from-file FILE", file=sys.stderr
        )
        return 2
    imp = do_import(
        tokens,
        a.format,
        name=a.name,
        world_size=a.world_size,
        tokenizer=a.tokenizer,
        gpus_per_worker=a.gpus_per_worker,
    )
    print(
        f"read a {imp.source} command line: {len(imp.mapped)} mapped, {len(imp.no_effect)} without effect, "
        f"{len(imp.unmapped)} not mapped"
    )
    for item, where in imp.mapped:
        print(f"  mapped     {item}  ->  {where}")
    for item, why in imp.no_effect:
        print(f"  no effect  {item}  ({why})")
    for item, why in imp.unmapped:
        print(f"  NOT MAPPED {item}  ({why})")
    if imp.unmapped and not a.allow_unmapped:
        print(
            f"megastack train import-args: {len(imp.unmapped)} argument(s) cannot be honoured (listed "
            "above); nothing written. "
            "Remove them, or pass --allow-unmapped to write the spec with them listed in its header.",
            file=sys.stderr,
        )
        return 2
    out = Path(a.output)
    config_file = None
    if imp.hf_config is not None:
        config_path = out.with_name(out.stem + ".config.json")
        config_file = str(config_path)
    text = render_yaml(imp, config_file)
    import yaml

    if config_file:
        from shared.atomic import write_text_atomic

        write_text_atomic(Path(config_file), json.dumps(imp.hf_config, indent=2) + "\n")
    spec = spec_from_dict(yaml.safe_load(text))
    if not a.no_validate:
        try:
            validate(spec)
        except Exception:
            if config_file:
                Path(config_file).unlink(missing_ok=True)
            raise
    from shared.atomic import write_text_atomic

    write_text_atomic(out, text)
    print(
        f"wrote {out}"
        + (f" and {config_file} (the architecture)" if config_file else "")
        + ("" if not a.no_validate else " (not validated: --no-validate)")
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="submit and follow megatron-core training jobs on Ray")
    p.add_argument(
        "--server", default=endpoint("trainer"), help="trainer service address (default %(default)s)"
    )
    tsub = p.add_subparsers(dest="train_cmd", required=True)
    s = tsub.add_parser("submit", help="submit a TrainJobSpec YAML (the trainer service validates it)")
    s.add_argument("spec", type=Path)
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="have the service check the spec as a submit would; submit nothing",
    )
    s.add_argument("--follow", "-f", action="store_true", help="follow progress until the job ends")
    s.set_defaults(func=submit)
    st = tsub.add_parser("status", help="one job's state and latest metrics")
    st.add_argument("job_id")
    st.set_defaults(func=status)
    lg = tsub.add_parser("logs", help="a job's log (all ranks)")
    lg.add_argument("job_id")
    lg.add_argument("--follow", "-f", action="store_true")
    lg.set_defaults(func=logs)
    c = tsub.add_parser("cancel", help="stop every rank of a job")
    c.add_argument("job_id")
    c.add_argument("--reason", default="cancelled from the CLI")
    c.set_defaults(func=cancel)
    im = tsub.add_parser(
        "import-args",
        help="turn a Megatron flag list or a Pai positional argument list into a spec YAML",
        description="Read an existing command line: Megatron-LM pretrain_gpt.py flags (torchrun launcher "
        "arguments allowed in front), or the positional arguments of Pai-Megatron-Patch "
        "run_mcore_qwen.sh (Qwen2.5) / run_pretrain_megatron_llama.sh (Llama 2) / "
        "run_ds_train_huggingface_llama.sh (HF + DeepSpeed: an hf-deepspeed spec), or the flags of "
        "ds_train_huggingface_llama.py. Every argument "
        "is reported as mapped, without effect, or not mapped; nothing is dropped silently.",
    )
    im.add_argument("args", nargs=argparse.REMAINDER, help="the arguments, after `--`")
    im.add_argument(
        "--from-file", help="read the command line from a file (line continuations and comments allowed)"
    )
    im.add_argument("--format", default="auto", choices=IMPORT_FORMATS, help="default: told by the arguments")
    im.add_argument(
        "--output", "-o", default="imported.yaml", help="spec YAML to write (default %(default)s)"
    )
    im.add_argument("--name", default="", help="job name (default: from the layout)")
    im.add_argument(
        "--world-size",
        type=int,
        default=0,
        help="GPUs in all (torchrun nproc x nodes) when the arguments do not say",
    )
    im.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per rank; 0 runs the ranks on CPU with gloo (default: 1 for Pai's GPU scripts, "
        "the spec's default for Megatron flags)",
    )
    im.add_argument(
        "--tokenizer", default="", help="HF tokenizer folder (Pai scripts take it from the checkpoint folder)"
    )
    im.add_argument(
        "--allow-unmapped",
        action="store_true",
        help="write the spec even if some arguments cannot be honoured",
    )
    im.add_argument(
        "--no-validate", action="store_true", help="do not check that the files it names exist here"
    )
    im.set_defaults(func=import_args)
    ls = tsub.add_parser("list", help="jobs, newest first")
    ls.add_argument("--limit", type=int, default=20)
    ls.set_defaults(func=list_jobs)
