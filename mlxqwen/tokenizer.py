"""Tokenizer of a checkpoint: `tokenizer.json` through the `tokenizers` library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend

from .errors import ModelLoadError


class Tokenizer:
    def __init__(self, backend: _Backend, config: dict[str, Any]):
        self.backend = backend
        self.config = config
        self.eos_token = self._token_text(config.get("eos_token"))
        self.eos_token_ids = {i for i in (self.token_to_id(self.eos_token),) if i is not None}

    @staticmethod
    def _token_text(token: Any) -> str | None:
        return token.get("content") if isinstance(token, dict) else token

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ModelLoadError(f"{file}: not found; the model directory needs its tokenizer files")
        try:
            backend = _Backend.from_file(str(file))
        except Exception as e:
            raise ModelLoadError(f"{file}: cannot be read ({e})") from None
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        return cls(backend, config)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
