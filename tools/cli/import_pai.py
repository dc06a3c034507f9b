"""Pai-Megatron-Patch's positional launch scripts (``run_mcore_qwen.sh``: 25 arguments,
``run_mcore_qwen3.sh``: 27 with expert parallelism, ``run_pretrain_megatron_llama.sh``: 24) -> a TrainJobSpec
document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tools.cli.import_common import Imported, bad, flag_bool, flag_num, te_where, tokenizer_vocab

QWEN25 = {  # size: layers, hidden, heads, ffn, kv groups, max positions, norm eps, tied
    "0.5B": (24, 896, 14, 4864, 2, 32768, 1e-6, True),
    "1.5B": (28, 1536, 12, 8960, 2, 32768, 1e-6, True),
    "3B": (36, 2048, 16, 11008, 2, 32768, 1e-6, True),
    "7B": (28, 3584, 28, 18944, 4, 131072, 1e-6, False),
    "14B": (48, 5120, 40, 13824, 8, 131072, 1e-5, False),
    "32B": (64, 5120, 40, 27648, 8, 131072, 1e-5, False),
    "72B": (80, 8192, 64, 29568, 8, 131072, 1e-5, False),
}
# examples/qwen3/run_mcore_qwen3.sh: layers, hidden, heads, ffn, kv groups, tied, MoE (experts, top-k, expert
# ffn) or None; every size: head_dim 128, q/k norms, 40960 positions, rope base 1e6, eps 1e-6
QWEN3 = {
    "0.6B": (28, 1024, 16, 3072, 8, True, None),
    "1.7B": (28, 2048, 16, 6144, 8, True, None),
    "4B": (36, 2560, 32, 9728, 8, True, None),
    "8B": (36, 4096, 32, 12288, 8, False, None),
    "14B": (40, 5120, 40, 17408, 8, False, None),
    "32B": (64, 5120, 64, 25600, 8, False, None),
    "A3B": (48, 2048, 32, 6144, 4, False, (128, 8, 768)),
    "A22B": (94, 4096, 64, 12288, 4, False, (128, 8, 1536)),
}
LLAMA2 = {"7B": (32, 4096, 32, 11008, 32), "13B": (40, 5120, 40, 13824, 40), "70B": (80, 8192, 64, 28672, 8)}
QWEN25_ARGS = (
    "ENV",
    "MODEL_SIZE",
    "BATCH_SIZE",
    "GLOBAL_BATCH_SIZE",
    "LR",
    "MIN_LR",
    "SEQ_LEN",
    "PAD_LEN",
    "PR",
    "TP",
    "PP",
    "CP",
    "SP",
    "DO",
    "FL",
    "SFT",
    "AC",
    "OPTIMIZER_OFFLOAD",
    "SAVE_INTERVAL",
    "DATASET_PATH",
    "VALID_DATASET_PATH",
    "PRETRAIN_CHECKPOINT_PATH",
    "TRAIN_TOKENS_OR_ITERS",
    "WARMUP_TOKENS_OR_ITERS",
    "OUTPUT_BASEPATH",
)
QWEN3_ARGS = (
    *QWEN25_ARGS[:11],  # ENV .. PP
    "CP",
    "ETP",
    "EP",
    *QWEN25_ARGS[12:],  # SP .. OUTPUT_BASEPATH
)
LLAMA2_ARGS = (
    "ENV",
    "MEGATRON_PATCH_PATH",
    "MODEL_SIZE",
    "BATCH_SIZE",
    "GLOBAL_BATCH_SIZE",
    "LR",
    "MIN_LR",
    "SEQ_LEN",
    "PAD_LEN",
    "EXTRA_VOCAB_SIZE",
    "PR",
    "TP",
    "PP",
    "AC",
    "DO",
    "FL",
    "SP",
    "TE",
    "SAVE_INTERVAL",
    "DATASET_PATH",
    "PRETRAIN_CHECKPOINT_PATH",
    "TRAIN_TOKENS",
    "WARMUP_TOKENS",
    "OUTPUT_BASEPATH",
)


def import_pai(
    tokens: list[str], layout: str, *, name: str = "", world_size: int = 0, tokenizer: str = ""
) -> Imported:
    names = {"pai-qwen2.5": QWEN25_ARGS, "pai-qwen3": QWEN3_ARGS}.get(layout, LLAMA2_ARGS)
    if len(tokens) != len(names):
        raise bad(f"{layout} takes {len(names)} positional arguments ({' '.join(names)}), got {len(tokens)}")
    a = dict(zip(names, tokens))
    for k, v in a.items():
        if v.startswith("$"):
            raise bad(f"{k} is the unresolved shell variable {v}")
    imp = Imported(layout, {"name": name or f"{layout}-{a['MODEL_SIZE']}".lower(), "kind": "pretrain"})
    if a["ENV"] not in ("dsw", "dlc"):
        raise bad(f"ENV must be dsw or dlc, got {a['ENV']!r}")
    imp.no_effect.append(
        (f"ENV={a['ENV']}", "the cluster is Ray's; GPUs per rank come from resources.gpus_per_worker")
    )
    if "MEGATRON_PATCH_PATH" in a:
        imp.no_effect.append(
            (f"MEGATRON_PATCH_PATH={a['MEGATRON_PATCH_PATH']}", "megastack brings megatron-core")
        )
    sft = flag_bool("SFT", a["SFT"]) if "SFT" in a else False
    imp.set("kind", "sft" if sft else "pretrain", f"SFT={a.get('SFT', 'false')}")
    mbs, gbs, seq = (
        flag_num("BATCH_SIZE", a["BATCH_SIZE"]),
        flag_num("GLOBAL_BATCH_SIZE", a["GLOBAL_BATCH_SIZE"]),
        flag_num("SEQ_LEN", a["SEQ_LEN"]),
    )
    imp.set("training.micro_batch_size", mbs, f"BATCH_SIZE={mbs}")
    imp.set("training.global_batch_size", gbs, f"GLOBAL_BATCH_SIZE={gbs}")
    imp.set("optimizer.lr", flag_num("LR", a["LR"], float), f"LR={a['LR']}")
    imp.set("optimizer.min_lr", flag_num("MIN_LR", a["MIN_LR"], float), f"MIN_LR={a['MIN_LR']}")
    imp.set("data.seq_length", seq, f"SEQ_LEN={seq}")
    imp.no_effect.append(
        (f"PAD_LEN={a['PAD_LEN']}", "padding length of raw JSON datasets; megastack trains on .bin/.idx")
    )
    pr = a["PR"]
    if pr in ("bf16", "fp16"):
        imp.set("training.precision", pr, f"PR={pr}")
    else:
        imp.unmapped.append(
            (f"PR={pr}", "fp8 training is not supported" if pr == "fp8" else "expected bf16 or fp16")
        )
    tp, pp = flag_num("TP", a["TP"]), flag_num("PP", a["PP"])
    imp.set("parallel.tensor_parallel", tp, f"TP={tp}")
    imp.set("parallel.pipeline_parallel", pp, f"PP={pp}")
    if "CP" in a:
        cp = flag_num("CP", a["CP"])
        (imp.mapped if cp == 1 else imp.unmapped).append(
            (f"CP={cp}", "no context parallelism" if cp == 1 else "context parallelism is not supported")
        )
    if "EP" in a:
        _experts(imp, a, tp)
    sp = flag_bool("SP", a["SP"])
    if sp and tp > 1:
        imp.set("parallel.sequence_parallel", True, "SP=true")
    else:
        imp.no_effect.append((f"SP={a['SP']}", "sequence parallelism needs TP > 1 (the script drops it too)"))
    imp.set("parallel.distributed_optimizer", flag_bool("DO", a["DO"]), f"DO={a['DO']}")
    te = flag_bool("TE", a["TE"]) if "TE" in a else True
    if "TE" in a:
        imp.set("training.transformer_impl", "auto" if te else "local", f"TE={a['TE']}", note=te_where())
    imp.mapped.append(
        (
            f"FL={a['FL']}",
            f"flash/fused attention comes with the Transformer Engine spec: "
            f"{'used' if te else 'not used (TE=false)'}; {te_where()}",
        )
    )
    ac = a["AC"]
    if ac in ("full", "sel", "none"):
        imp.set("training.recompute", {"full": "full", "sel": "selective", "none": "none"}[ac], f"AC={ac}")
    else:
        imp.unmapped.append((f"AC={ac}", "activation offloading is not supported"))
    if "OPTIMIZER_OFFLOAD" in a:
        off = a["OPTIMIZER_OFFLOAD"]
        (imp.mapped if off == "false" else imp.unmapped).append(
            (
                f"OPTIMIZER_OFFLOAD={off}",
                "optimizer on the GPU" if off == "false" else "optimizer offloading is not supported",
            )
        )
    if "EXTRA_VOCAB_SIZE" in a:
        imp.no_effect.append(
            (
                f"EXTRA_VOCAB_SIZE={a['EXTRA_VOCAB_SIZE']}",
                "megastack pads the vocabulary itself (multiple of 128 x TP)",
            )
        )
    imp.set(
        "checkpoint.save_interval",
        flag_num("SAVE_INTERVAL", a["SAVE_INTERVAL"]),
        f"SAVE_INTERVAL={a['SAVE_INTERVAL']}",
    )
    data = a["DATASET_PATH"]
    if data.endswith((".json", ".jsonl")):
        raise bad(
            f"DATASET_PATH {data} is raw JSON: preprocess it first, e.g. `megastack preprocess --input "
            f"{data} "
            f"--output-prefix <prefix> --tokenizer-name-or-path <hf tokenizer> --append-eod`, and give the "
            "<prefix>_text_document it prints"
        )
    imp.set("data.paths", [{"prefix": data, "weight": 1.0}], f"DATASET_PATH={data}")
    imp.set("data.split", "99,1,0", "the script's --split 99,1,0")
    if "VALID_DATASET_PATH" in a:
        valid = a["VALID_DATASET_PATH"]
        if sft:  # SFT validates on its own set; without one megastack holds out data.split's valid part
            imp.set("data.valid_paths", [{"prefix": valid, "weight": 1.0}], f"VALID_DATASET_PATH={valid}")
        else:
            imp.no_effect.append(
                (
                    f"VALID_DATASET_PATH={valid}",
                    "pretraining validates on the data.split (99,1,0) part of "
                    "DATASET_PATH that it never trains on; validation sets are for SFT",
                )
            )
    ckpt = a["PRETRAIN_CHECKPOINT_PATH"]
    size = a["MODEL_SIZE"]
    if ckpt != "none":
        imp.set("model.init_from", ckpt, f"PRETRAIN_CHECKPOINT_PATH={ckpt}")
        imp.mapped.append((f"MODEL_SIZE={size}", "the architecture is read from the checkpoint"))
    else:
        imp.hf_config = _pai_arch(layout, size, seq, tokenizer)
        imp.mapped.append((f"MODEL_SIZE={size}", "model.architecture (the script's size table)"))
    if tokenizer:
        imp.set("model.tokenizer", tokenizer, f"tokenizer {tokenizer}")
    first, second = (
        (a["TRAIN_TOKENS_OR_ITERS"], a["WARMUP_TOKENS_OR_ITERS"])
        if "TRAIN_TOKENS_OR_ITERS" in a
        else (a["TRAIN_TOKENS"], a["WARMUP_TOKENS"])
    )
    if sft:
        iters, warmup = flag_num("TRAIN_ITERS", first), flag_num("LR_WARMUP_ITERS", second)
        imp.set("training.train_iters", iters, f"TRAIN_ITERS={iters}")
        imp.set("optimizer.lr_warmup_iters", warmup, f"LR_WARMUP_ITERS={warmup}")
        imp.set("optimizer.lr_decay_iters", iters - warmup, "TRAIN_ITERS - LR_WARMUP_ITERS (as the script)")
    else:
        tokens, warm = flag_num("TRAIN_TOKENS", first), flag_num("WARMUP_TOKENS", second)
        iters = tokens // gbs // seq
        imp.set("training.train_iters", iters, f"TRAIN_TOKENS={tokens} / GLOBAL_BATCH_SIZE / SEQ_LEN")
        imp.set(
            "optimizer.lr_warmup_iters",
            warm // gbs // seq,
            f"WARMUP_TOKENS={warm} / GLOBAL_BATCH_SIZE / SEQ_LEN",
        )
        imp.set("optimizer.lr_decay_iters", iters, "train iterations (as the script)")
    out = a["OUTPUT_BASEPATH"]
    imp.set("checkpoint.save_dir", str(Path(out) / "checkpoint" / imp.doc["name"]), f"OUTPUT_BASEPATH={out}")
    for path, value in (
        ("optimizer.lr_decay_style", "linear" if layout == "pai-llama2" else "cosine"),
        ("optimizer.weight_decay", 0.01 if layout == "pai-qwen3" else 0.1),
        ("optimizer.adam_beta1", 0.9),
        ("optimizer.adam_beta2", 0.95),
        ("optimizer.clip_grad", 1.0),
        ("training.log_interval", 1),
        ("training.eval_interval", 10000),
        ("training.eval_iters", 10),
    ):
        imp.set(path, value, "fixed in the script")
    if world_size:
        if world_size % (tp * pp):
            raise bad(f"--world-size {world_size} is not a multiple of TP x PP = {tp * pp}")
        imp.set("parallel.data_parallel", world_size // (tp * pp), f"world size {world_size} / (TP x PP)")
    imp.set("resources.gpus_per_worker", 1, "one GPU per rank (torchrun --nproc_per_node = GPUs)")
    return imp


def _experts(imp: Imported, a: dict[str, str], tp: int) -> None:
    """run_mcore_qwen3.sh's ETP and EP, and the MoE options its MoE sizes add."""
    etp, ep = flag_num("ETP", a["ETP"]), flag_num("EP", a["EP"])
    moe = QWEN3.get(a["MODEL_SIZE"], (None,) * 7)[6]
    if moe is None:
        imp.no_effect.append((f"ETP={etp} EP={ep}", f"MODEL_SIZE={a['MODEL_SIZE']} is dense: no experts"))
        return
    imp.set("parallel.expert_parallel", ep, f"EP={ep}")
    (imp.mapped if etp == tp else imp.unmapped).append(
        (
            f"ETP={etp}",
            "the experts split over the TP ranks like the dense MLP (megatron-core's default)"
            if etp == tp
            else f"expert tensor parallelism other than TP ({tp}) is not supported",
        )
    )
    imp.set("training.moe_aux_loss_coeff", 0.001, "the script's --moe-aux-loss-coeff 0.001")
    imp.set("training.moe_grouped_gemm", True, "the script's --moe-grouped-gemm (GPU ranks)")


def _pai_arch(layout: str, size: str, seq: int, tokenizer: str) -> dict[str, Any]:
    from llm.models.base import ArchConfig
    from llm.models.registry import family

    table: dict[str, tuple] = {"pai-qwen2.5": QWEN25, "pai-qwen3": QWEN3}.get(layout, LLAMA2)
    if size not in table:
        raise bad(f"MODEL_SIZE {size!r} is not in the script's table ({', '.join(table)})")
    vocab = tokenizer_vocab(tokenizer)
    if not vocab:
        raise bad(
            "training from scratch (PRETRAIN_CHECKPOINT_PATH=none) needs --tokenizer: the HF tokenizer folder"
        )
    if layout == "pai-qwen3":
        layers, hidden, heads, ffn, groups, tied, moe = table[size]
        experts, topk, moe_ffn = moe or (0, 0, 0)
        arch = ArchConfig(
            family="qwen3_moe" if moe else "qwen3",
            architecture="Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM",
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_attention_heads=heads,
            num_query_groups=groups,
            head_dim=128,
            ffn_hidden_size=ffn,
            max_position_embeddings=40960,
            normalization="RMSNorm",
            norm_eps=1e-6,
            activation="swiglu",
            position_embedding="rope",
            rope_theta=1e6,
            qk_layernorm=True,
            tie_word_embeddings=tied,
            num_experts=experts,
            moe_topk=topk,
            moe_ffn_hidden_size=moe_ffn,
        )
    elif layout == "pai-qwen2.5":
        layers, hidden, heads, ffn, groups, max_pos, eps, tied = table[size]
        arch = ArchConfig(
            family="qwen2",
            architecture="Qwen2ForCausalLM",
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_attention_heads=heads,
            num_query_groups=groups,
            head_dim=hidden // heads,
            ffn_hidden_size=ffn,
            max_position_embeddings=max_pos,
            normalization="RMSNorm",
            norm_eps=eps,
            activation="swiglu",
            position_embedding="rope",
            rope_theta=1e6,
            qkv_bias=True,
            linear_bias=False,
            tie_word_embeddings=tied,
        )
    else:
        layers, hidden, heads, ffn, groups = table[size]
        arch = ArchConfig(
            family="llama",
            architecture="LlamaForCausalLM",
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_attention_heads=heads,
            num_query_groups=groups,
            head_dim=hidden // heads,
            ffn_hidden_size=ffn,
            max_position_embeddings=seq,
            normalization="RMSNorm",
            norm_eps=1e-5,
            activation="swiglu",
            position_embedding="rope",
            rope_theta=10000.0,
            qkv_bias=False,
            linear_bias=False,
            tie_word_embeddings=False,
        )
    return family(arch.family).hf_config_from_arch(arch)
