"""Prompt tokenizers for the umT5 text encoder: prompts -> ``ids``, ``mask`` [B, text_len] (512 in the
release), right-padded, truncated with EOS kept last and the truncation reported. ``UMT5Tokenizer`` reads
the release's tokenizer files offline with its whitespace cleaning (needs the ``text`` extra);
``ByteTokenizer`` needs nothing: UTF-8 bytes past three specials (pad 0, eos 1, unk 2), 259 ids, paired with
the tiny preset's random encoder so the demo runs with no download."""

from __future__ import annotations

import html
import importlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PromptError", "TokenizedPrompts", "ByteTokenizer", "UMT5Tokenizer", "clean_prompt", "load_tokenizer",
           "require_text_extra", "TEXT_EXTRA_INSTALL"]

TEXT_EXTRA_INSTALL = "pip install -e '.[text]'"  # from a clone, as the README installs; the package: hallolive-rt[text]

# The release collapses whitespace with the `regex` package, whose \s (Unicode White_Space) excludes the
# four ASCII separators U+001C..U+001F that Python's `re` counts as space. This class is that \s in `re`.
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")


class PromptError(ValueError):
    """A prompt that cannot be encoded (empty after cleaning), or a tokenizer that cannot be loaded."""


def _missing_text_modules(names: tuple[str, ...] = ("transformers", "ftfy")) -> list[str]:
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def require_text_extra() -> None:
    """Raise ``PromptError`` saying how to install the ``text`` extra unless ``transformers`` (the tokenizer)
    and ``ftfy`` (the prompt cleaning) import; called before anything else of a ``--model-dir`` run is checked."""
    missing = _missing_text_modules()
    if missing:
        raise PromptError(f"--model-dir runs read the release's umT5 tokenizer, which needs the optional "
                          f"'text' dependencies (transformers, sentencepiece, ftfy; missing: "
                          f"{', '.join(missing)}). Install them with {TEXT_EXTRA_INSTALL} (or pip install "
                          "'hallolive-rt[text]'), or run --random-weights / the tiny preset, which use an "
                          "offline byte tokenizer.")


def clean_prompt(text: str, *, fix_text: bool = True) -> str:
    """The release's 'whitespace' cleaning: ftfy, HTML unescape twice, strip, collapse whitespace runs.
    ``fix_text=False`` skips ftfy (the offline byte tokenizer must not need the package); ftfy only
    changes mojibake and odd Unicode, so plain prompts clean identically either way."""
    if fix_text:
        try:
            import ftfy
        except ImportError as e:
            raise PromptError(f"the umT5 tokenizer cleans prompts with 'ftfy', part of the 'text' extra: "
                              f"{TEXT_EXTRA_INSTALL}") from e
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


@dataclass(frozen=True)
class TokenizedPrompts:
    """Encoder inputs for a batch of prompts: ids/mask [B, text_len] int64, mask 1 for the prompt's tokens
    (EOS included), then 0; ``lengths[i]`` = tokens kept, ``dropped[i]`` = tokens removed by truncation,
    ``dropped_text[i]`` the text those tokens spelled (empty when nothing was dropped)."""

    ids: torch.Tensor
    mask: torch.Tensor
    texts: tuple[str, ...]
    lengths: tuple[int, ...]
    dropped: tuple[int, ...]
    dropped_text: tuple[str, ...]

    @property
    def truncated(self) -> bool:
        return any(self.dropped)

    def truncation_messages(self) -> list[str]:
        """One human-readable line per truncated prompt (empty list when none was)."""
        limit = self.ids.shape[1]
        out = []
        for i, (n, tail) in enumerate(zip(self.dropped, self.dropped_text)):
            if n:
                shown = tail if len(tail) <= 80 else tail[:77] + "..."
                out.append(f"prompt {i}: {n} token(s) past the {limit}-token limit were dropped: {shown!r}")
        return out


def _as_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise PromptError("no prompt given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise PromptError(f"prompt {i} is a {type(p).__name__}, expected a string")
    return prompts


def _reject_empty(raw: list[str], cleaned: list[str]) -> None:
    for i, (r, c) in enumerate(zip(raw, cleaned)):
        if not c:
            raise PromptError(f"prompt {i} is empty after cleaning (got {r!r}); give a description of the "
                              "scene and speech")


class ByteTokenizer:
    """Offline tokenizer for the tiny preset: id = UTF-8 byte + 3, after pad 0, eos 1, unk 2 (259 ids)."""

    PAD, EOS, UNK = 0, 1, 2
    OFFSET = 3
    VOCAB_SIZE = 256 + OFFSET
    name = "byte"

    def __init__(self, text_len: int = 512):
        if text_len < 2:
            raise PromptError(f"text_len must be at least 2 (one token + EOS), got {text_len}")
        self.text_len = text_len
        self.vocab_size = self.VOCAB_SIZE

    def __call__(self, prompts: str | Sequence[str]) -> TokenizedPrompts:
        raw = _as_list(prompts)
        texts = [clean_prompt(p, fix_text=False) for p in raw]
        _reject_empty(raw, texts)
        keep = self.text_len - 1  # room for EOS, like HF truncation with special tokens
        ids = torch.full((len(texts), self.text_len), self.PAD, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        lengths, dropped, tails = [], [], []
        for i, t in enumerate(texts):
            try:
                data = t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise PromptError(f"prompt {i} is not valid Unicode (a lone surrogate at character {e.start}): "
                                  f"send UTF-8 text") from None
            row = [b + self.OFFSET for b in data[:keep]] + [self.EOS]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
            mask[i, : len(row)] = 1
            lengths.append(len(row))
            dropped.append(max(0, len(data) - keep))
            tails.append(data[keep:].decode("utf-8", errors="ignore"))
        return TokenizedPrompts(ids, mask, tuple(texts), tuple(lengths), tuple(dropped), tuple(tails))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - self.OFFSET for i in ids if i >= self.OFFSET).decode("utf-8", errors="replace")


class UMT5Tokenizer:
    """The release's umT5 tokenizer from a local directory of Hugging Face tokenizer files, called exactly as
    the release calls it (so ``ids``/``mask`` are the release's); a second pass without truncation counts
    what was dropped."""

    def __init__(self, path: str | os.PathLike, text_len: int = 512):
        require_text_extra()  # first: without it nothing below can be checked
        p = Path(path)
        if not p.is_dir():
            raise PromptError(f"{p}: tokenizer directory not found. It ships with the Wan2.1-T2V-1.3B "
                              "download as 'google/umt5-xxl' (tokenizer.json / spiece.model + "
                              "tokenizer_config.json).")
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as e:  # transformers raises OSError/ValueError/... depending on what is missing
            hint = (f"; spiece.model needs sentencepiece, part of the 'text' extra: {TEXT_EXTRA_INSTALL}"
                    if _missing_text_modules(("sentencepiece",)) else "")
            raise PromptError(f"{p}: cannot load the umT5 tokenizer ({type(e).__name__}: {e}){hint}") from e
        self.name, self.text_len, self.vocab_size = str(p), text_len, len(self._tok)

    def __call__(self, prompts: str | Sequence[str]) -> TokenizedPrompts:
        raw = _as_list(prompts)
        texts = [clean_prompt(p) for p in raw]
        _reject_empty(raw, texts)
        enc = self._tok(texts, padding="max_length", truncation=True, max_length=self.text_len,
                        add_special_tokens=True, return_tensors="pt")
        ids, mask = enc.input_ids.to(torch.int64), enc.attention_mask.to(torch.int64)
        # untruncated, ragged lists; verbose=False silences the "longer than max length" warning we report
        full = self._tok(texts, add_special_tokens=True, verbose=False).input_ids
        lengths = [int(n) for n in mask.sum(dim=1)]
        dropped, tails = [], []
        for row, kept in zip(full, lengths):
            n = max(0, len(row) - kept)
            dropped.append(n)
            # truncation keeps the first kept-1 content tokens and the EOS; the rest is what was lost
            tails.append(self._tok.decode(row[kept - 1 : len(row) - 1], skip_special_tokens=True) if n else "")
        return TokenizedPrompts(ids, mask, tuple(texts), tuple(lengths), tuple(dropped), tuple(tails))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(path: str | os.PathLike | None = None, *, text_len: int = 512):
    """The tokenizer for a model directory: ``None`` gives the offline ``ByteTokenizer`` (tiny preset),
    a path gives the umT5 tokenizer read from ``<model_dir>/google/umt5-xxl`` (offline only)."""
    return ByteTokenizer(text_len) if path is None else UMT5Tokenizer(path, text_len)
