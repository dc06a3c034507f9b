"""`megastack convert`: HF <-> Megatron conversion with Megatron's flag names.

Runs in this process by default; with --server it submits the job to a converter service and follows it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("hf", "mcore", "legacy")


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def families_table() -> str:
    """Every model family the converter knows: its HF architectures, what its table maps, the formats and
    parallel layouts, and whether the per-family tests run it (tools/tiny.py FAMILIES: round trips HF ->
    torch_dist/legacy at TP 1-2 x PP 1-2 with megatron-core logits parity, textgen greedy == HF)."""
    from llm.models.registry import FAMILIES
    from tools.tiny import FAMILIES as TESTED

    rows = [("family", "HF architectures", "what it covers", "formats", "parallel", "per-family tests")]
    for name, fam in FAMILIES.items():
        rows.append(
            (
                name,
                ", ".join(fam.hf_architectures),
                fam.covers,
                "hf, mcore, legacy",
                "TP, PP, VPP, EP (legacy)" if fam.moe else "TP, PP, VPP (legacy)",
                "yes" if name in TESTED else "no",
            )
        )
    from shared.text import aligned

    return aligned([list(r) for r in rows])


class _ListFamilies(argparse.Action):
    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(families_table())
        parser.exit(0)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert checkpoints between HF and Megatron (mcore torch_dist, legacy), reshard TP/PP",
        description="Convert HF <-> Megatron checkpoints (torch_dist or legacy mp_rank layout), reshard "
        "TP/PP, "
        "change dtype, merge LoRA, and verify logits parity. Output is written atomically.",
    )
    p.add_argument(
        "--list-families",
        action=_ListFamilies,
        help="print the model families, what each maps, formats, parallel layouts and tests, and exit",
    )
    p.add_argument("--load-dir", type=Path, required=True, help="source checkpoint folder")
    p.add_argument(
        "--save-dir", type=Path, required=True, help="target folder (must not exist unless --overwrite)"
    )
    p.add_argument(
        "--source-format",
        choices=(*FORMATS, "deepspeed"),
        default=None,
        help="default: detected from --load-dir (deepspeed: a DeepSpeed save folder of an hf-deepspeed job)",
    )
    p.add_argument("--target-format", choices=FORMATS, required=True)
    p.add_argument("--target-tensor-parallel-size", type=int, default=1, metavar="N")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1, metavar="M")
    p.add_argument(
        "--target-expert-parallel-size",
        type=int,
        default=1,
        metavar="E",
        help="mixture-of-experts models: split the experts over E ranks (legacy mp_rank_TT[_PPP]_EEE "
        "folders; torch_dist loads at any EP)",
    )
    p.add_argument(
        "--num-layer-list",
        type=_layer_list,
        default=(),
        metavar="8,8,...",
        help="uneven layers per pipeline stage",
    )
    p.add_argument(
        "--num-layers-per-virtual-pipeline-stage",
        type=int,
        default=0,
        metavar="K",
        help="virtual pipeline (legacy target)",
    )
    p.add_argument(
        "--params-dtype",
        choices=("fp32", "bf16", "fp16", "float32", "bfloat16", "float16"),
        default=None,
        help="default: keep the source dtype",
    )
    p.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="vocab padding multiple (x TP), as in Megatron",
    )
    p.add_argument(
        "--lora-load", type=Path, default=None, help="PEFT LoRA adapter folder to merge into the base"
    )
    p.add_argument(
        "--verify", action="store_true", help="run both models on the same tokens and report logits parity"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save-dir")
    p.add_argument(
        "--iteration", type=int, default=0, help="Megatron targets: iteration number (0 = release)"
    )
    p.add_argument(
        "--load-iteration",
        "--ckpt-step",
        type=int,
        default=0,
        help="Megatron sources: convert this saved iteration instead of the newest (0 = newest)",
    )
    p.add_argument(
        "--server",
        default=None,
        metavar="HOST:PORT",
        help="submit to a converter service instead of running here",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run every check a conversion makes before it writes anything, then stop (with --server: the "
        "service's own checks, nothing submitted)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group(
        "what the source is (never needed: read from the checkpoint; a value given is checked, and a "
        "mismatch is an error naming both)"
    )
    for flag, help_ in SOURCE_FLAGS:
        g.add_argument(flag, type=int, default=0, metavar="N", help=help_)
    g.add_argument("--model-family", default="", metavar="NAME", help="llama, qwen2, qwen3, gpt2, ...")
    p.set_defaults(func=run)


# Megatron's names for the source's layout and architecture (Pai's mcore -> HF scripts pass them all)
SOURCE_FLAGS = (
    ("--tensor-model-parallel-size", "the source's TP (legacy; torch_dist loads at any TP; HF: 1)"),
    ("--pipeline-model-parallel-size", "the source's PP (legacy; torch_dist loads at any PP; HF: 1)"),
    ("--expert-model-parallel-size", "the source's EP (legacy MoE; torch_dist loads at any EP; HF: 1)"),
    ("--num-layers", None),
    ("--hidden-size", None),
    ("--ffn-hidden-size", None),
    ("--num-attention-heads", None),
    ("--num-query-groups", None),
)


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def run(a: argparse.Namespace) -> int:
    return _remote(a) if a.server else _local(a)


def _spec(a: argparse.Namespace, *, absolute: bool = False):
    """The conversion the arguments ask for (paths made absolute for a service on another cwd)."""
    from services.converter.api import EXPECTABLE, ConvertSpec

    def path(p: Path | None) -> Path | None:
        return p.absolute() if absolute and p is not None else p

    stated = {n: getattr(a, n) for n in EXPECTABLE if n != "family"} | {"family": a.model_family}
    return ConvertSpec(
        load_dir=path(a.load_dir),
        save_dir=path(a.save_dir),
        target_format=a.target_format,
        source_format=a.source_format,
        tp=a.target_tensor_parallel_size,
        pp=a.target_pipeline_parallel_size,
        ep=a.target_expert_parallel_size,
        num_layer_list=a.num_layer_list,
        layers_per_virtual_stage=a.num_layers_per_virtual_pipeline_stage,
        params_dtype=DTYPES.get(a.params_dtype, a.params_dtype),
        divisible_by=a.make_vocab_size_divisible_by,
        lora_dir=path(a.lora_load),
        verify=a.verify,
        overwrite=a.overwrite,
        iteration=a.iteration,
        load_iteration=a.load_iteration or None,
        expect=tuple((n, v) for n, v in stated.items() if v),
    )


def _local(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from services.converter.api import convert, validate

    spec = _spec(a)
    if a.dry_run:
        validate(spec)  # the checks convert() makes first (and the service makes at submit)
        print(f"{a.load_dir} -> {a.save_dir}: valid (nothing written)")
        return 0
    bars: list[tqdm] = []  # created on the first progress report: nothing is drawn for refused input

    def progress(done: int, total: int, message: str) -> None:
        if not bars:
            bars.append(
                tqdm(total=total, unit="tensor", disable=a.no_progress, desc="converting", leave=False)
            )
        bar = bars[0]
        bar.total = total
        bar.n = done
        bar.set_postfix_str(message[-50:], refresh=False)
        bar.refresh()

    try:
        result = convert(spec, progress)
    finally:
        for bar in bars:
            bar.close()
    print(result.summary)
    return 0


def _remote(a: argparse.Namespace) -> int:
    """The request built from the arguments; the service validates it (validate_only for --dry-run)."""
    from tqdm import tqdm

    from protos.common.v1 import common_pb2
    from protos.converter.v1 import converter_pb2 as pb
    from protos.converter.v1 import converter_pb2_grpc as pb_grpc
    from services.converter.api import spec_to_pb
    from shared.grpc.channel import make_channel
    from tools.cli.rpc import rpc

    req = spec_to_pb(_spec(a, absolute=True))
    with make_channel(a.server) as ch:
        stub = pb_grpc.ConverterServiceStub(ch)
        if a.dry_run:
            rpc(stub.SubmitConversion, pb.SubmitConversionRequest(spec=req, validate_only=True))
            print(
                f"{a.load_dir} -> {a.save_dir}: valid (checked by the converter service; nothing submitted)"
            )
            return 0
        job_id = rpc(stub.SubmitConversion, pb.SubmitConversionRequest(spec=req)).job_id
        print(f"submitted {job_id}", file=sys.stderr)
        bar = tqdm(total=0, unit="tensor", disable=a.no_progress, desc=job_id, leave=False)
        last = None
        for ev in rpc(stub.WatchConversion, pb.WatchConversionRequest(job_id=job_id), stream=True):
            last = ev.conversion
            p = last.status.progress
            bar.total, bar.n = int(p.total), int(p.done)
            bar.set_postfix_str(p.message[-50:], refresh=False)
            bar.refresh()
        bar.close()
    if last is None or last.status.state != common_pb2.JOB_STATE_SUCCEEDED:
        why = last.status.error if last else "no status received"
        state = (
            common_pb2.JobState.Name(last.status.state).removeprefix("JOB_STATE_").lower()
            if last
            else "failed"
        )
        print(f"megastack convert: {job_id} {state}: {why}", file=sys.stderr)
        return 1
    print(last.result.summary)
    return 0
