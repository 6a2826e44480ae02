"""Tokenization for the gateway, without torch or transformers.

``GatewayTokenizer`` loads a Hugging Face model directory's ``tokenizer.json``
(with the ``tokenizers`` library) and ``tokenizer_config.json`` (special tokens,
chat template). Plain prompts are encoded with the tokenizer's own special tokens
(its post-processor adds the BOS); chat messages are rendered with the Jinja chat
template in a sandbox and encoded *without* special tokens, since templates emit
their own BOS.

Per sequence, ``IncrementalDetokenizer`` turns token ids into text as they
arrive, holding back an incomplete UTF-8 sequence and, where the request skips
special tokens, leaving out all but those kept: the markers a parser reads
(Mistral's ``[TOOL_CALLS]``, ``[THINK]``), as vLLM keeps them.
``StopStringMatcher`` holds back text that could still become a stop string so
that a stop string is never sent to the client.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
_CONTEXT_TOKENS = 5  # prompt tokens decoded before the output so leading spaces survive
REQUEST_TEMPLATES_KEPT = 16  # requests' own chat templates kept compiled


class ChatTemplateError(ValueError):
    """The chat template rejected the messages or could not be rendered."""


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet (GPT-2's printable stand-ins for bytes)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def chat_template_arg(value: str) -> str:
    """vLLM's ``--chat-template``: the template itself where it holds Jinja's braces or a line
    break, else the path of a file that holds it."""
    if "{" in value or "\n" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value!r} is neither a chat template (it has no '{{') nor a file")
    return path.read_text(encoding="utf-8")


class GatewayTokenizer:
    """The served model's tokenizer and chat template (``chat_template``, where given, in place of
    the model's own)."""

    def __init__(self, model_dir: str | Path, chat_template: str | None = None) -> None:
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
        self._tok = Tokenizer.from_file(str(tokenizer_file))
        config_file = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.bos_token: str | None = _token_content(config.get("bos_token"))
        self.eos_token: str | None = _token_content(config.get("eos_token"))
        self.eos_token_id: int | None = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        self.chat_template: str | None = chat_template or self._load_template(model_dir, config.get("chat_template"))
        self._byte_level = "ByteLevel" in json.dumps(json.loads(self._tok.to_str()).get("decoder"))
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_exception
        self._compile = lru_cache(maxsize=REQUEST_TEMPLATES_KEPT)(env.from_string)
        source = "the --chat-template" if chat_template else f"the chat template of {model_dir}"
        self._template = self._parse(self.chat_template, source) if self.chat_template else None

    def _parse(self, template: str, source: str) -> jinja2.Template:
        try:
            return self._compile(template)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"{source} does not parse: {exc}") from exc

    @staticmethod
    def _load_template(model_dir: Path, value: Any) -> str | None:
        if isinstance(value, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t["name"]: t["template"] for t in value}
            return named.get("default")
        if value:
            return str(value)
        jinja_file = model_dir / "chat_template.jinja"
        return jinja_file.read_text() if jinja_file.is_file() else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A plain prompt, with the tokenizer's own special tokens (the BOS) unless told not to."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        documents: list[dict[str, str]] | None = None,
    ) -> str:
        """The template's text. ``continue_final_message``: cut right after the last message's
        content, so that generation continues it; ``template_kwargs``: more template variables
        (the messages, special tokens, ``tools`` and ``documents`` win over them); ``tools``: the request's
        tools, in OpenAI's form, as transformers hands them to a template; ``chat_template``: a
        request's own template, in place of the served one (the last few compiled are kept);
        ``documents``: a RAG template's documents (each a dict of strings, such as title and text)."""
        template = self._template if chat_template is None else self._parse(chat_template, "the request's chat_template")
        if template is None:
            raise ChatTemplateError("the model has no chat template; use /v1/completions")
        given = {"tools": tools, "documents": documents}
        variables = {**(template_kwargs or {}), **{k: v for k, v in given.items() if v is not None}}
        try:
            text = template.render(
                **variables,
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc
        if continue_final_message:
            final = messages[-1]["content"]
            end = text.rfind(final)
            if not final or end < 0:
                raise ChatTemplateError("the chat template does not render the final message's content as it is, "
                                        "so it cannot be continued")
            text = text[: end + len(final)]
        return text

    def encode_chat(self, messages: list[dict[str, Any]], add_special_tokens: bool = False, **render: Any) -> list[int]:
        """Chat messages through the template (``render_chat``'s options), then tokens, without
        adding the tokenizer's special tokens again unless ``add_special_tokens``."""
        return self._tok.encode(self.render_chat(messages, **render), add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def special_token_ids(self, markers: Iterable[str]) -> frozenset[int]:
        """The ids of those of ``markers`` that are each one special token (the others are text)."""
        return frozenset(i for i in map(self._tok.token_to_id, markers) if i in self.special_ids)

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included (for logprobs)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def token_piece(self, token_id: int) -> str:
        """One token's vocabulary entry, as the tokenizer spells it (byte-level ``Ġ`` and all)."""
        return self._tok.id_to_token(token_id) or ""

    def token_bytes(self, token_id: int) -> list[int]:
        """The raw bytes of one token (exact even for a token that splits a UTF-8 character)."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return []
        table = _byte_level_decoder()
        if self._byte_level and all(ch in table for ch in piece):
            return [table[ch] for ch in piece]
        return list(self.token_text(token_id).encode("utf-8"))


class IncrementalDetokenizer:
    """Token ids in, newly completed text out; one per generated sequence.

    Decodes a short window (the previous few tokens as context) rather than the
    whole output, and holds text back while it ends in an incomplete UTF-8
    sequence (decoded as U+FFFD). With ``skip_special_tokens``, special tokens
    other than those in ``kept`` never enter the window (the tokenizer's own
    skipping leaves out the same tokens); the rest are decoded as written.
    """

    def __init__(self, tokenizer: GatewayTokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 kept: frozenset[int] = frozenset()) -> None:
        self._tok = tokenizer
        self._skipped = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._kept = kept
        self._ids = [t for t in prompt_token_ids[-_CONTEXT_TOKENS:] if self._shown(t)]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _shown(self, token_id: int) -> bool:
        return token_id not in self._skipped or token_id in self._kept

    def add(self, token_id: int) -> str:
        if not self._shown(token_id):
            return ""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (the sequence has finished)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        prefix_text = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=False)
        text = self._tok.decode(self._ids[self._prefix_offset :], skip_special_tokens=False)
        if len(text) > len(prefix_text) and (final or not text.endswith(REPLACEMENT_CHAR)):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return text[len(prefix_text) :]
        return ""


@dataclass
class StopResult:
    text: str                    # safe to send now
    matched: str | None = None   # the stop string that matched: ``text`` ends right before it (after it, included)

    @property
    def stopped(self) -> bool:
        return self.matched is not None


class StopStringMatcher:
    """Holds back the longest tail that could still grow into a stop string. The text ends
    right before the stop string that matched, or right after it with ``include``."""

    def __init__(self, stop: list[str], include: bool = False) -> None:
        self._stop = [s for s in stop if s]
        self._include = include
        self._pending = ""

    def feed(self, text: str) -> StopResult:
        if not self._stop:
            return StopResult(text)
        buf = self._pending + text
        # The stop string that completes first as characters arrive (the longest
        # of those completing together), whatever the chunking.
        hits = [(i + len(s), i, s) for s, i in ((s, buf.find(s)) for s in self._stop) if i >= 0]
        if hits:
            self._pending = ""
            end, start, matched = min(hits)
            return StopResult(buf[: end if self._include else start], matched)
        keep = partial_suffix(buf, self._stop)
        self._pending = buf[len(buf) - keep :] if keep else ""
        return StopResult(buf[: len(buf) - keep])

    def flush(self) -> str:
        """The held-back tail, released when the sequence ends without a match."""
        out, self._pending = self._pending, ""
        return out


def partial_suffix(text: str, markers: Iterable[str]) -> int:
    """How many of ``text``'s last characters could still grow into one of ``markers`` (the
    longest such tail; a whole marker is not a partial one)."""
    longest = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:k]):
                longest = k
                break
    return longest
