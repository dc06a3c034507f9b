"""Render HF chat templates (Jinja) without transformers, the way transformers renders them."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from shared.errors import InvalidArgument


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render(
    template: str, messages: list[dict[str, str]], *, add_generation_prompt: bool, **special_tokens: Any
) -> str:
    """``messages`` laid out by a chat ``template`` (sandboxed Jinja); 400 naming prompt_type when there is
    none or it fails."""
    if not template:
        raise InvalidArgument("the tokenizer has no chat template", field="prompt_type")
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens
        )
    except Exception as e:  # noqa: BLE001 - a template error is the input's fault
        raise InvalidArgument(f"chat template failed: {e}", field="messages") from None
