"""Tokenizer of a checkpoint: `tokenizer.json` through `tokenizers`, or `tokenizer.model` through
sentencepiece; added and special tokens; end-of-sequence ids; a streaming detokenizer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from .chat_template import ChatTemplate
from .checkpoint import read_json
from .errors import ModelLoadError


def _token_text(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


class _SentencePiece:
    """`tokenizer.model` with the added tokens of `tokenizer_config.json`, which sentencepiece
    does not know: text is split on them and each piece is encoded by the model."""

    def __init__(self, file: Path, added: dict[int, dict[str, Any]]):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
        self.added = {i: t["content"] for i, t in added.items()}
        self.added_ids = {content: i for i, content in self.added.items()}
        self.special = {i for i, t in added.items() if t.get("special")}
        names = sorted(self.added_ids, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.split.split(text) if self.split else [text]:
            if piece in self.added_ids:
                ids.append(self.added_ids[piece])
            elif piece:
                ids.extend(self.sp.encode(piece))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out, run = [], []
        for i in ids:
            if i in self.added:
                out.append(self.sp.decode(run))
                run = []
                if not (skip_special_tokens and i in self.special):
                    out.append(self.added[i])
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self.added_ids:
            return self.added_ids[token]
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, i: int) -> str | None:
        if i in self.added:
            return self.added[i]
        return self.sp.id_to_piece(i) if 0 <= i < self.sp.piece_size() else None

    @property
    def vocab_size(self) -> int:
        return max([self.sp.piece_size() - 1, *self.added]) + 1


class _HF:
    """`tokenizer.json` through the `tokenizers` library."""

    def __init__(self, file: Path):
        try:
            self.tok = _HFTokenizer.from_file(str(file))
        except Exception as e:
            raise ModelLoadError(f"{file}: cannot be read ({e})") from None
        self.special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


class Tokenizer:
    """Encode/decode with a checkpoint's tokenizer, its special tokens, EOS ids and chat template.

    `eos_token_ids` joins the `eos_token` of `tokenizer_config.json` with the `eos_token_id`
    (an id or a list) of `generation_config.json`: Qwen lists both `<|im_end|>` and
    `<|endoftext|>` there."""

    def __init__(
        self,
        backend: _HF | _SentencePiece,
        config: dict[str, Any],
        generation_config: dict[str, Any] | None = None,
        chat_template: ChatTemplate | None = None,
    ):
        self.backend = backend
        self.config = config
        self.chat_template = chat_template
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token = _token_text(config.get("bos_token"))
        eos = (generation_config or {}).get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_token_ids = {int(i) for i in eos} | {i for i in (self.token_to_id(self.eos_token),) if i is not None}

    @classmethod
    def from_dir(cls, path: str | Path, generation_config: dict[str, Any] | None = None) -> Tokenizer:
        """generation_config: the directory's generation_config.json when the caller has read it
        already (a load reads it once, for the end tokens and the sampling defaults)."""
        path = Path(path)
        config = read_json(path / "tokenizer_config.json")
        if (path / "tokenizer.json").is_file():
            backend: _HF | _SentencePiece = _HF(path / "tokenizer.json")
        elif (path / "tokenizer.model").is_file():
            added = {int(i): t for i, t in (config.get("added_tokens_decoder") or {}).items()}
            try:
                backend = _SentencePiece(path / "tokenizer.model", added)
            except (OSError, RuntimeError) as e:
                raise ModelLoadError(f"{path / 'tokenizer.model'}: cannot be read ({e})") from None
        else:
            raise ModelLoadError(
                f"{path}: no tokenizer.json or tokenizer.model; the model directory needs its tokenizer files"
            )
        tokens = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template = ChatTemplate.from_dir(path, config, tokens)
        if generation_config is None:
            generation_config = read_json(path / "generation_config.json")
        return cls(backend, config, generation_config, template)

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    @property
    def special_token_ids(self) -> set[int]:
        return self.backend.special

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in it (`<|im_start|>`) become their ids."""
        return self.backend.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = True) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special_tokens)


class StreamingDetokenizer:
    """Text of a growing token sequence, piece by piece, never cutting a character in two.

    Each step decodes a short window that starts at the last emitted boundary, once up to
    the previous token and once including the new one; the difference is the new text,
    held back while it ends in an incomplete UTF-8 sequence (U+FFFD). Decoding a window
    instead of single tokens keeps context-dependent decoders (sentencepiece's leading
    space) right, so the pieces always join to the one-shot decode."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.start = 0  # window start: a character boundary
        self.emitted = 0  # tokens whose text has been returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append a token; returns the text that is now complete (possibly "")."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.start : self.emitted])
        after = self._decode(self.ids[self.start :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.start, self.emitted = self.emitted, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes as U+FFFD, as one-shot)."""
        before = self._decode(self.ids[self.start : self.emitted])
        after = self._decode(self.ids[self.start :])
        self.start = self.emitted = len(self.ids)
        return after[len(before) :]
