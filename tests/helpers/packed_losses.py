"""Per-token losses of neat-packed SFT samples against the same samples one by one (one process,
megatron-core).

    python tests/helpers/packed_losses.py --arch HF_DIR --packed PREFIX --single PREFIX --seq-length N

Builds a tiny GPTModel (local spec, fp32, seeded), reads both datasets through the trainer's SFTDataset and
runs them through the trainer's forward step. For each sample it prints, as JSON, the largest difference
between its per-token losses inside the pack and alone, and the same for the pack run with isolation switched
off (one causal sequence, positions 0..s-1), which must differ.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def losses(model, batch) -> torch.Tensor:
    from services.trainer.train import _forward_step

    with torch.no_grad():
        out, _ = _forward_step(iter([batch]), model)
    return out[0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", required=True)
    ap.add_argument("--packed", required=True)
    ap.add_argument("--single", required=True)
    ap.add_argument("--seq-length", type=int, required=True)
    a = ap.parse_args()
    from llm.mcore import dist as mdist
    from llm.mcore.model import build_gpt_model, padded_vocab_size, transformer_config
    from llm.mcore.packing import follow_positions
    from llm.models.registry import arch_from_hf_config
    from llm.tokenizers import FastTokenizer
    from services.trainer.data import SFTDataset, _collate

    mdist.init(mdist.Parallelism(), seed=7)
    arch = arch_from_hf_config(json.load(open(f"{a.arch}/config.json")), a.arch)
    model = build_gpt_model(
        arch,
        transformer_config(arch),
        vocab_size=padded_vocab_size(arch.vocab_size, 128, 1),
        impl="local",
        max_sequence_length=a.seq_length,
    ).eval()
    follow_positions(model)
    tok = FastTokenizer.from_dir(a.arch)
    pad = tok.pad_id if tok.pad_id is not None else tok.eod_id
    packed = SFTDataset([a.packed], a.seq_length, pad)
    single = SFTDataset([a.single], a.seq_length, pad)
    pack = packed[0]
    segs = pack["segment_ids"]
    n = int(segs.max())
    isolated = losses(model, _collate([pack]))
    leaky = losses(
        model,
        _collate(
            [
                {k: v for k, v in pack.items() if k != "segment_ids"}
                | {"position_ids": torch.arange(a.seq_length)}
            ]
        ),
    )
    report = {"samples_in_pack": n, "samples": []}
    for j in range(len(single)):
        item = single[j]
        length = int((item["segment_ids"] > 0).sum())
        alone = losses(model, _collate([item]))
        for k in range(1, n + 1):
            where = (segs == k).nonzero().flatten()
            if len(where) == length and torch.equal(pack["tokens"][where], item["tokens"][:length]):
                break
        else:
            print(f"sample {j} is not in the pack", file=sys.stderr)
            return 1
        m_pack, m_alone = pack["loss_mask"][where].bool(), item["loss_mask"][:length].bool()
        if not torch.equal(m_pack, m_alone):
            print(f"sample {j}: loss masks differ between the pack and alone", file=sys.stderr)
            return 1
        ref = alone[:length][m_alone]
        report["samples"].append(
            {
                "tokens": length,
                "scored": int(m_alone.sum()),
                "segment": k,
                "max_rel_diff": float(((isolated[where][m_pack] - ref).abs() / ref.abs()).max()),
                "leaky_max_rel_diff": float(((leaky[where][m_pack] - ref).abs() / ref.abs()).max()),
            }
        )
    print(json.dumps(report))
    mdist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
