"""Tokenizer loading, the same for every service: HF folders (tokenizer.json) and GPT-2 BPE files.

Megatron calls the end-of-document token "EOD"; for HF tokenizers it is the EOS token, for GPT-2 BPE
``<|endoftext|>`` (50256).
"""

from __future__ import annotations

import json
import logging
import os
from functools import cached_property
from pathlib import Path
from typing import Any

from shared.errors import InvalidArgument, NotFound

logger = logging.getLogger(__name__)


class Tokenizer:
    """A thin, typed wrapper over a transformers fast tokenizer."""

    def __init__(self, hf: Any, path: Path) -> None:
        self.hf = hf
        self.path = path

    @classmethod
    def load(cls, path: Path | str) -> Tokenizer:
        """The HF tokenizer of a folder (404 naming tokenizer when it does not exist)."""
        path = Path(path)
        if not path.is_dir():
            raise NotFound(f"tokenizer folder {path} does not exist", field="tokenizer")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer, GPT2TokenizerFast  # type: ignore[attr-defined]  # a lazy attribute

        try:
            if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
                hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                hf = GPT2TokenizerFast.from_pretrained(str(path), local_files_only=True)
            else:
                raise InvalidArgument(
                    f"{path}: no tokenizer.json, tokenizer_config.json or vocab.json+merges.txt",
                    field="tokenizer",
                )
        except InvalidArgument:
            raise
        except Exception as e:  # noqa: BLE001 - surface as a clear input error
            raise InvalidArgument(
                f"{path}: cannot load tokenizer ({type(e).__name__}: {e})", field="tokenizer"
            ) from None
        return cls(hf, path)

    @classmethod
    def gpt2_bpe(cls, vocab_file: Path | str, merge_file: Path | str) -> Tokenizer:
        """Megatron's GPT2BPETokenizer from vocab.json + merges.txt (any file names)."""
        from tokenizers import Tokenizer as RawTokenizer
        from tokenizers import decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        for f in (vocab_file, merge_file):
            if not Path(f).is_file():
                raise NotFound(f"tokenizer file {f} does not exist", field="vocab_file")
        bpe = models.BPE.from_file(str(vocab_file), str(merge_file))
        raw = RawTokenizer(bpe)
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        hf = PreTrainedTokenizerFast(
            tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
        )
        return cls(hf, Path(vocab_file).parent)

    # -- properties ----------------------------------------------------------------------------
    @cached_property
    def vocab_size(self) -> int:
        """Tokens in the vocabulary, added tokens included."""
        return len(self.hf)

    @property
    def eos_id(self) -> int | None:
        """The end-of-sequence id, or None."""
        return self.hf.eos_token_id

    @property
    def eos_token(self) -> str:
        """The end-of-sequence token text ('' when none)."""
        return self.hf.eos_token or ""

    @property
    def bos_id(self) -> int | None:
        """The beginning-of-sequence id, or None."""
        return self.hf.bos_token_id

    @property
    def bos_token(self) -> str:
        """The beginning-of-sequence token text ('' when none)."""
        return self.hf.bos_token or ""

    @property
    def eod_id(self) -> int:
        """Megatron's EOD: the EOS id (also used as BOS by ``add_BOS``)."""
        if self.eos_id is None:
            raise InvalidArgument(f"{self.path}: tokenizer has no EOS token", field="tokenizer")
        return int(self.eos_id)

    @property
    def chat_template(self) -> str:
        """The chat template ('' when the tokenizer has none)."""
        template = getattr(self.hf, "chat_template", None)
        return template if isinstance(template, str) else ""

    @property
    def has_chat_template(self) -> bool:
        """Whether a chat template is set."""
        return bool(self.chat_template)

    def single_token_id(self, text: str) -> int | None:
        """The id when ``text`` encodes to exactly one token, else None."""
        ids = self.encode(text)
        return ids[0] if len(ids) == 1 else None

    # -- operations ----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of each text."""
        return [list(x) for x in self.hf(texts, add_special_tokens=add_special_tokens)["input_ids"]]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (no clean-up of spaces, so pieces concatenate exactly)."""
        return self.hf.decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def token_texts(self, ids: list[int]) -> list[str]:
        """The text of each token on its own (Megatron's ``segments``)."""
        return [self.decode([i]) for i in ids]

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """``messages`` as prompt text through the chat template (400 naming messages without one). With
        ``tools`` (OpenAI tool definitions): a template that uses ``tools`` gets them; for one that does not,
        they are described in the system message with the answer format the gateway reads back (a JSON
        object ``{"name": ..., "arguments": {...}}``)."""
        if not self.has_chat_template:
            raise InvalidArgument("the served tokenizer has no chat template", field="messages")
        if tools and "tools" not in self.chat_template:
            described = "\n".join(json.dumps(t.get("function", t)) for t in tools)
            note = (
                "You can call these functions. To call one, answer with only a JSON object "
                '{"name": <function name>, "arguments": <object>} and nothing else.\n' + described
            )
            if messages and messages[0]["role"] == "system":
                messages = [
                    {"role": "system", "content": messages[0]["content"] + "\n\n" + note},
                    *messages[1:],
                ]
            else:
                messages = [{"role": "system", "content": note}, *messages]
            tools = None
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools or None
        )

    def save(self, out_dir: Path) -> None:
        """Write the tokenizer files into ``out_dir``."""
        self.hf.save_pretrained(str(out_dir))


class FastTokenizer:
    """HF ``tokenizers`` only, for bulk encoding: no transformers or torch import (start-up in ~0.1 s).

    Encodes exactly as the transformers fast tokenizer of the same folder does (it wraps the same
    ``tokenizers.Tokenizer``); special tokens and the chat template come from tokenizer_config.json.
    """

    def __init__(
        self,
        raw: Any,
        *,
        eos_token: str | None,
        bos_token: str | None,
        pad_token: str | None,
        chat_template: str = "",
        path: Path | None = None,
    ) -> None:
        self.raw = raw
        self.path = path
        self.eos_token, self.bos_token, self.pad_token = eos_token, bos_token, pad_token
        self.chat_template = chat_template
        self.eos_id = raw.token_to_id(eos_token) if eos_token else None
        self.bos_id = raw.token_to_id(bos_token) if bos_token else None
        self.pad_id = raw.token_to_id(pad_token) if pad_token else None
        self.vocab_size = raw.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def _token(value: Any) -> str | None:
        return value.get("content") if isinstance(value, dict) else value

    @classmethod
    def from_dir(cls, path: Path | str) -> FastTokenizer:
        """The tokenizer of a folder: tokenizer.json, or GPT-2 BPE vocab.json + merges.txt."""
        import json

        from tokenizers import Tokenizer as RawTokenizer

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                return cls.gpt2_bpe(path / "vocab.json", path / "merges.txt")
            raise InvalidArgument(
                f"{path}: no tokenizer.json (or vocab.json + merges.txt)", field="tokenizer"
            )
        cfg: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (path / name).is_file():
                cfg.update(json.loads((path / name).read_text()))
        template = cfg.get("chat_template") or ""
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        return cls(
            RawTokenizer.from_file(str(tj)),
            eos_token=cls._token(cfg.get("eos_token")),
            bos_token=cls._token(cfg.get("bos_token")),
            pad_token=cls._token(cfg.get("pad_token")),
            chat_template=template if isinstance(template, str) else "",
            path=path,
        )

    @classmethod
    def gpt2_bpe(cls, vocab_file: Path | str, merge_file: Path | str) -> FastTokenizer:
        """GPT-2 byte-level BPE from vocab.json + merges.txt, as Megatron's GPT2BPETokenizer tokenizes."""
        from tokenizers import Tokenizer as RawTokenizer
        from tokenizers import decoders, models, pre_tokenizers, processors

        for f in (vocab_file, merge_file):
            if not Path(f).is_file():
                raise NotFound(f"tokenizer file {f} does not exist", field="vocab_file")
        raw = RawTokenizer(models.BPE.from_file(str(vocab_file), str(merge_file)))
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        raw.post_processor = processors.ByteLevel(trim_offsets=False)
        raw.add_special_tokens(["<|endoftext|>"])
        eod = "<|endoftext|>"
        return cls(raw, eos_token=eod, bos_token=eod, pad_token=None, path=Path(vocab_file).parent)

    @property
    def eod_id(self) -> int:
        """The end-of-document id (EOS); 400 naming tokenizer when there is none."""
        if self.eos_id is None:
            raise InvalidArgument("the tokenizer has no end-of-document (EOS) token", field="tokenizer")
        return int(self.eos_id)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens, in parallel."""
        return [e.ids for e in self.raw.encode_batch_fast(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        return self.raw.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``."""
        return self.raw.decode(list(ids), skip_special_tokens=False)
