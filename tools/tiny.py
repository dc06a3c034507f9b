"""Tiny random models and a tiny tokenizer, built from configs offline (never the hub): the test suite's
fixtures and gpu_check use them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus_lines(limit: int | None = None) -> list[str]:
    from tools.assets import ensure_asset

    doc = json.loads(ensure_asset("markov-corpus").read_text())
    lines = [b["text"] for d in doc for b in d["blocks"] if b["text"].strip()]
    return lines[:limit] if limit else lines


def synthetic_lines(n: int = 2000, seed: int = 0) -> list[str]:
    """Prose-shaped lines from a fixed word list (no asset needed: gpu_check runs where nothing can be
    fetched)."""
    import random

    words = (
        "the old man river bridge winter said would not last another looked at and he she it was "
        "of to in a house road light dark water stone tree long short came went saw knew"
    ).split()
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(6, 18))).capitalize() + "." for _ in range(n)
    ]


def train_tokenizer(out_dir: Path, vocab_size: int = 512, lines: list[str] | None = None) -> Path:
    """A byte-level BPE tokenizer trained in well under a second on ``lines`` (default: the shipped prose
    corpus)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        lines if lines is not None else corpus_lines(2000),
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))
    return out_dir


# Mixture-of-experts families: 4 experts, top-2 (Mixtral renormalises the two; the tiny Qwen3-MoE does too,
# the tiny Qwen2-MoE does not and adds its gated shared expert)
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
FAMILIES = ("llama", "qwen2", "qwen3", "gpt2", *MOE_FAMILIES)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=48)


# The dense decoders' shared tiny shape (GQA: 4 heads over 2 key/value groups)
DENSE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
)


def hf_config(family: str, vocab_size: int, **over):
    from transformers import (
        GPT2Config,
        LlamaConfig,
        MixtralConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0)
    if family == "llama":
        cfg = LlamaConfig(**DENSE, tie_word_embeddings=False, **common)
    elif family == "qwen2":
        cfg = Qwen2Config(**DENSE, tie_word_embeddings=True, **common)
    elif family == "qwen3":  # head_dim 24 is not hidden / heads (16): Qwen3's explicit head_dim
        cfg = Qwen3Config(**DENSE, head_dim=24, tie_word_embeddings=True, **common)
    elif family == "mixtral":  # the experts' width is intermediate_size
        cfg = MixtralConfig(
            **{**DENSE, "intermediate_size": 48},
            num_local_experts=4,
            num_experts_per_tok=2,
            tie_word_embeddings=False,
            **common,
        )
    elif family in (
        "qwen3_moe",
        "qwen2_moe",
    ):  # Qwen3-MoE renormalises its top-2; Qwen2-MoE has a shared expert
        qwen3 = family == "qwen3_moe"
        extra = (
            dict(head_dim=24, norm_topk_prob=True, tie_word_embeddings=True)
            if qwen3
            else dict(shared_expert_intermediate_size=80, norm_topk_prob=False, tie_word_embeddings=False)
        )
        cfg = (Qwen3MoeConfig if qwen3 else Qwen2MoeConfig)(**DENSE, **MOE, num_experts=4, **extra, **common)
    elif family == "gpt2":
        cfg = GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            initializer_range=0.1,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    else:
        raise ValueError(family)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def make_tiny_hf(family: str, out_dir: Path, tok_dir: Path, *, seed: int = 0, **over) -> Path:
    """Save a random tiny model of ``family`` with the tokenizer of ``tok_dir`` to ``out_dir``."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    vocab = over.pop("vocab_size", len(tok))  # more rows than the tokenizer has: allowed, as in Qwen's models
    model = AutoModelForCausalLM.from_config(hf_config(family, vocab, **over)).eval()
    if family in ("qwen2", "qwen2_moe"):  # random q/k/v biases, so a dropped bias cannot go unnoticed
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    # random q/k norm weights (HF starts them at 1), so a dropped one cannot go unnoticed
    if family in ("qwen3", "qwen3_moe"):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1.0, 0.2)
                layer.self_attn.k_norm.weight.normal_(1.0, 0.2)
    model.save_pretrained(str(out_dir))
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out_dir / f.name)
    return out_dir


def corpus_rows(tok_dir: Path, length: int = 64) -> torch.Tensor:
    """The shipped corpus tokenized with ``tok_dir`` (each line ended by EOS), as rows of ``length``
    tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = [t for line in corpus_lines(3000) for t in [*tok.encode(line), tok.eos_token_id]]
    n = len(ids) // length * length
    return torch.tensor(ids[:n], dtype=torch.long, device="cpu").view(-1, length)


def train_briefly(model_dir: Path, rows: torch.Tensor, *, steps: int = 100, seed: int = 0) -> Path:
    """A few AdamW steps of next-token training on ``rows`` (batches of 16), saved over ``model_dir``: a
    random model's predictions are nearly flat, so one rounding step flips its top-1 token; trained ones are
    peaked like a real model's."""
    model = load_hf(model_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(steps):
        batch = rows[torch.randint(0, rows.shape[0], (16,), generator=g, device="cpu")]
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(str(model_dir))
    return model_dir


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
