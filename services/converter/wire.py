"""protobuf <-> converter types."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protos.common.v1 import common_pb2
from protos.converter.v1 import converter_pb2 as pb
from services.converter.conversion import EXPECTABLE, ConvertSpec
from shared.errors import InvalidArgument
from shared.jobs import JobRecord
from shared.jobs_wire import spec_doc, spec_message, status_pb

FORMAT_TO_PB = {
    "hf": common_pb2.CHECKPOINT_FORMAT_HF,
    "mcore": common_pb2.CHECKPOINT_FORMAT_MCORE,
    "legacy": common_pb2.CHECKPOINT_FORMAT_LEGACY,
    "deepspeed": common_pb2.CHECKPOINT_FORMAT_DEEPSPEED,  # a source only
}
PB_TO_FORMAT = {v: k for k, v in FORMAT_TO_PB.items()}
DTYPE_FROM_PB = {
    common_pb2.DTYPE_FLOAT32: "float32",
    common_pb2.DTYPE_BFLOAT16: "bfloat16",
    common_pb2.DTYPE_FLOAT16: "float16",
}
DTYPE_TO_PB = {v: k for k, v in DTYPE_FROM_PB.items()}


def spec_from_pb(s: pb.ConversionSpec) -> ConvertSpec:
    if not s.load_dir:
        raise InvalidArgument("load_dir is required", field="load_dir")
    if not s.save_dir:
        raise InvalidArgument("save_dir is required", field="save_dir")
    if s.target_format not in PB_TO_FORMAT:
        raise InvalidArgument("target_format is required (hf, mcore or legacy)", field="target_format")
    for name in (
        "target_tensor_parallel_size",
        "target_pipeline_parallel_size",
        "target_expert_parallel_size",
        "num_layers_per_virtual_pipeline_stage",
        "make_vocab_size_divisible_by",
        "iteration",
        "load_iteration",
    ):
        if getattr(s, name) < 0:
            raise InvalidArgument(f"{name} must be >= 0", field=name)
    return ConvertSpec(
        load_dir=Path(s.load_dir),
        save_dir=Path(s.save_dir),
        target_format=PB_TO_FORMAT[s.target_format],
        source_format=PB_TO_FORMAT.get(s.source_format),
        tp=s.target_tensor_parallel_size or 1,
        pp=s.target_pipeline_parallel_size or 1,
        ep=s.target_expert_parallel_size or 1,
        num_layer_list=tuple(s.num_layer_list),
        layers_per_virtual_stage=s.num_layers_per_virtual_pipeline_stage,
        params_dtype=DTYPE_FROM_PB.get(s.params_dtype),
        divisible_by=s.make_vocab_size_divisible_by or 128,
        lora_dir=Path(s.lora_load) if s.lora_load else None,
        verify=s.verify,
        overwrite=s.overwrite,
        iteration=s.iteration,
        load_iteration=s.load_iteration or None,
        expect=_expect_from_pb(s.source),
    )


def _expect_from_pb(m: pb.SourceExpectation) -> tuple[tuple[str, Any], ...]:
    """The stated (non-zero, non-empty) facts, in EXPECTABLE order."""
    for name in EXPECTABLE:
        if name != "family" and getattr(m, name) < 0:
            raise InvalidArgument(f"source.{name} must be >= 0 (0 = not stated)", field=f"source.{name}")
    return tuple((name, getattr(m, name)) for name in EXPECTABLE if getattr(m, name))


def spec_to_pb(spec: ConvertSpec) -> pb.ConversionSpec:
    """The domain spec as the message (spec_from_pb of it gives ``spec`` back)."""
    return pb.ConversionSpec(
        load_dir=str(spec.load_dir),
        save_dir=str(spec.save_dir),
        target_format=FORMAT_TO_PB[spec.target_format],
        source_format=FORMAT_TO_PB.get(spec.source_format or "", common_pb2.CHECKPOINT_FORMAT_UNSPECIFIED),
        target_tensor_parallel_size=spec.tp,
        target_pipeline_parallel_size=spec.pp,
        target_expert_parallel_size=spec.ep,
        num_layer_list=spec.num_layer_list,
        num_layers_per_virtual_pipeline_stage=spec.layers_per_virtual_stage,
        params_dtype=DTYPE_TO_PB.get(spec.params_dtype or "", common_pb2.DTYPE_UNSPECIFIED),
        make_vocab_size_divisible_by=spec.divisible_by,
        lora_load=str(spec.lora_dir) if spec.lora_dir else "",
        verify=spec.verify,
        overwrite=spec.overwrite,
        iteration=spec.iteration,
        load_iteration=spec.load_iteration or 0,
        source=pb.SourceExpectation(**dict(spec.expect)),
    )


def spec_record(spec: ConvertSpec) -> dict[str, Any]:
    """What a job record (and the worker's spec.json) keeps: the message's JSON mapping."""
    return spec_doc(spec_to_pb(spec))


def spec_from_record(doc: dict[str, Any]) -> ConvertSpec:
    """The domain spec of a job record."""
    return spec_from_pb(spec_message(doc, pb.ConversionSpec))


def conversion_pb(rec: JobRecord) -> pb.Conversion:
    r = rec.result
    result = pb.ConversionResult()
    if r:
        result = pb.ConversionResult(
            save_dir=r.get("save_dir", ""),
            num_tensors=r.get("num_tensors", 0),
            bytes_written=r.get("bytes_written", 0),
            seconds=r.get("seconds", 0.0),
            peak_rss_bytes=r.get("peak_rss_bytes", 0),
            summary=r.get("summary", ""),
        )
        p = r.get("parity") or {}
        if p:
            result.parity.CopyFrom(
                pb.ParityReport(
                    max_abs_logit_diff=p["max_abs_logit_diff"],
                    mean_abs_logit_diff=p["mean_abs_logit_diff"],
                    top1_agreement=p["top1_agreement"],
                    num_positions=p["num_positions"],
                    weights_exact=bool(p.get("weights_exact")),
                    layers=[pb.LayerParity(**d) for d in p.get("layers", [])],
                    tolerance=p.get("tolerance", 0.0),
                    tolerance_reason=p.get("tolerance_reason", ""),
                    first_layer_over=p.get("first_layer_over", ""),
                )
            )
    return pb.Conversion(status=status_pb(rec), spec=spec_message(rec.spec, pb.ConversionSpec), result=result)
