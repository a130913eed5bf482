"""Text <-> token ids: a checkpoint's tokenizer.json through `tokenizers`, or a byte-level one for presets.

Also renders chat templates from tokenizer_config.json with jinja2 (the format Hugging Face uses).
"""

from __future__ import annotations

import json
import os
from typing import Any

# Byte-level tokenizer ids: bytes are 0..255, then specials.
BYTE_BOS, BYTE_EOS, BYTE_PAD, BYTE_UNK = 256, 257, 258, 259
BYTE_VOCAB_SIZE = 260
_DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class Tokenizer:
    """encode(text) -> ids (with BOS as the tokenizer specifies), decode(ids) -> text."""

    def __init__(
        self,
        hf_tokenizer: Any | None,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        chat_template: str | None,
        special: dict[str, str] | None = None,
    ):
        self._hf = hf_tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.chat_template = chat_template or _DEFAULT_CHAT_TEMPLATE
        self._special = special or {}

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @classmethod
    def byte_level(cls) -> Tokenizer:
        return cls(None, BYTE_BOS, [BYTE_EOS], None, {"bos_token": "<s>", "eos_token": "</s>"})

    @classmethod
    def from_dir(cls, path: str, eos_token_ids: list[int], bos_token_id: int | None) -> Tokenizer:
        """Loads path/tokenizer.json (+ tokenizer_config.json); falls back to byte-level if absent."""
        tok_path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_path):
            return cls.byte_level()
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_file(tok_path)
        cfg_path = os.path.join(path, "tokenizer_config.json")
        cfg: dict[str, Any] = {}
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        special = {}
        for key in ("bos_token", "eos_token"):
            value = cfg.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                special[key] = value
        eos = list(eos_token_ids)
        if not eos and "eos_token" in special and hf.token_to_id(special["eos_token"]) is not None:
            eos = [hf.token_to_id(special["eos_token"])]
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(hf, bos_token_id, eos, template, special)

    def encode(self, text: str) -> list[int]:
        if self._hf is None:
            return [BYTE_BOS] + list(text.encode("utf-8"))
        return list(self._hf.encode(text, add_special_tokens=True).ids)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._hf is None:
            data = bytes(t for t in token_ids if 0 <= t < 256)
            return data.decode("utf-8", errors="replace")
        return self._hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Renders the chat template to a prompt string (encode it with encode_chat or yourself)."""
        import jinja2

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template: {message}")

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._special.get("bos_token", ""),
            eos_token=self._special.get("eos_token", ""),
        )

    def encode_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered chat; a BOS the template already wrote is not doubled."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        ids = self.encode(text)
        bos_text = self._special.get("bos_token")
        if (
            bos_text
            and text.startswith(bos_text)
            and len(ids) > 1
            and ids[0] == ids[1] == self.bos_token_id
        ):
            ids = ids[1:]
        return ids
