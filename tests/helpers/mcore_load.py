"""Run under torchrun: load megastack-written Megatron checkpoints into megatron-core at TP/PP > 1.

    torchrun --nproc-per-node 2 tests/helpers/mcore_load.py --tp 2 --ckpt DIR --format mcore --ref REF.pt

(``--ep 2``: a mixture of experts with its experts split over the two ranks.)

Builds the GPTModel stage of this rank, loads the checkpoint the way Megatron users do
(``dist_checkpointing.load`` for torch_dist, ``load_state_dict(strict=True)`` of this rank's
mp_rank file for legacy), gathers the TP-split logits and compares them with the reference logits.
Prints "OK <max diff>" on rank 0 and exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--format", choices=("mcore", "legacy"), required=True)
    ap.add_argument("--ref", type=Path, required=True)
    ap.add_argument("--tol", type=float, default=1e-5)
    a = ap.parse_args()
    from megatron.core import parallel_state as ps

    from llm.checkpoints.megatron import MegatronCheckpoint, legacy_rank_dir, load_weights_pickle
    from llm.mcore import dist as mdist
    from llm.mcore.model import build_gpt_model, transformer_config

    mdist.init(mdist.Parallelism(tp=a.tp, pp=a.pp, ep=a.ep))
    reader = MegatronCheckpoint(a.ckpt, a.format)
    arch = reader.arch
    padded = int(reader.meta["padded_vocab_size"])
    model = build_gpt_model(
        arch,
        transformer_config(
            arch, tp=a.tp, pp=a.pp, **({"expert_model_parallel_size": a.ep} if a.ep > 1 else {})
        ),
        vocab_size=padded,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    ).eval()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    if a.format == "mcore":
        from megatron.core import dist_checkpointing

        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(reader.iter_dir)))
    else:
        name = legacy_rank_dir(tp_rank, pp_rank, a.pp, ps.get_expert_model_parallel_rank(), a.ep)
        model.load_state_dict(
            load_weights_pickle(reader.iter_dir / name / "model_optim_rng.pt")["model"], strict=True
        )
    if a.pp > 1:  # strict per-stage loading is the check; logits need the pipeline schedule
        if torch.distributed.get_rank() == 0:
            print("OK strict load of every stage", flush=True)
        mdist.shutdown()
        return 0
    ref = torch.load(a.ref)
    tokens = ref["tokens"]
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens, pos, None))[..., : arch.vocab_size]
    diff = float((logits - ref["logits"]).abs().max())
    ok = diff <= a.tol
    if torch.distributed.get_rank() == 0:
        print(f"{'OK' if ok else 'MISMATCH'} {diff:.3g}", flush=True)
    mdist.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
