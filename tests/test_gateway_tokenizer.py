"""Gateway tokenization: parity with transformers on the demo checkpoint, the
incremental detokenizer, the stop-string matcher and the chat-template sandbox."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.services.gateway.tokenizer import (
    ChatTemplateError, GatewayTokenizer, IncrementalDetokenizer, StopStringMatcher,
)

from conftest import DEMO_MODEL, MISTRAL_MARKERS, marked_tokenizer

TEXTS = [
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?",
    "  leading spaces and\ttabs\n\nand blank lines  ",
    "naïve café — 日本語 🎭 émigré",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Wherefore art thou?"}],
    [
        {"role": "system", "content": "You are Juliet."},
        {"role": "user", "content": "Speak again, bright angel!"},
        {"role": "assistant", "content": "Ay me!"},
        {"role": "user", "content": "She speaks: 日本 🎭"},
    ],
]
# Text with multi-byte characters, so byte-level tokens split UTF-8 sequences.
TEXT = st.text(alphabet=st.sampled_from(list("abc xyz\nROMEO:!,'é日本🎭—")), max_size=60)
# Text and special tokens: Mistral's markers, the BOS, the EOS and the pad.
MARKED_TEXT = st.lists(st.one_of(TEXT, st.sampled_from([*MISTRAL_MARKERS, "<s>", "</s>", "<pad>"])), max_size=8).map("".join)


@pytest.fixture(scope="module")
def tok() -> GatewayTokenizer:
    return GatewayTokenizer(DEMO_MODEL)


@pytest.fixture(scope="module")
def marked(tmp_path_factory: pytest.TempPathFactory) -> GatewayTokenizer:
    """The demo tokenizer with Mistral's markers as special tokens."""
    return GatewayTokenizer(marked_tokenizer(tmp_path_factory.mktemp("marked")))


@pytest.mark.model
def test_plain_prompts_match_transformers(tok: GatewayTokenizer) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf(text).input_ids
        assert ids[0] == hf.bos_token_id


@pytest.mark.model
def test_chat_template_matches_transformers(tok: GatewayTokenizer) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        expected_ids = expected["input_ids"] if hasattr(expected, "keys") else expected
        ids = tok.encode_chat(messages)
        assert ids == list(expected_ids)
        assert ids.count(hf.bos_token_id) == 1  # the template's BOS, not a second one
        assert tok.render_chat(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.unit
@settings(max_examples=60, deadline=None)
@given(prompt=TEXT, output=TEXT)
def test_incremental_detokenizer_emits_exact_text(tok: GatewayTokenizer, prompt: str, output: str) -> None:
    prompt_ids = tok.encode(prompt)
    out_ids = tok.encode(output)[1:]  # no BOS inside the output
    detok = IncrementalDetokenizer(tok, prompt_ids)
    pieces = [detok.add(t) for t in out_ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tok.decode(out_ids)
    assert all("\ufffd" not in p for p in pieces)  # partial UTF-8 is held back, never sent


@pytest.mark.unit
def test_markers_are_kept_by_id_where_each_is_one_special_token(tok: GatewayTokenizer, marked: GatewayTokenizer) -> None:
    """Only a marker that is one special token has an id to keep: plain text, or a token of the
    vocabulary that is not special, has none."""
    ids = marked.special_token_ids([*MISTRAL_MARKERS, "<think>", "functools", "R", "Romeo"])
    assert sorted(marked.token_text(i) for i in ids) == sorted(MISTRAL_MARKERS)
    assert marked.special_ids == ids | {0, 1, 2} == tok.special_ids | ids
    assert tok.special_token_ids(MISTRAL_MARKERS) == frozenset()


@pytest.mark.unit
@settings(max_examples=80, deadline=None)
@given(prompt=MARKED_TEXT, output=MARKED_TEXT, kept=st.sets(st.sampled_from(MISTRAL_MARKERS)), skip=st.booleans())
def test_incremental_detokenizer_skips_the_special_tokens_not_kept(
    marked: GatewayTokenizer, prompt: str, output: str, kept: set[str], skip: bool,
) -> None:
    """Token by token, the text is the whole output's with the special tokens left out but the
    kept ones (all kept where special tokens are not skipped); with none kept, the tokenizer's own
    skipping, as before."""
    out_ids = marked.encode(output, add_special_tokens=False)
    kept_ids = marked.special_token_ids(kept)
    detok = IncrementalDetokenizer(marked, marked.encode(prompt), skip, kept_ids)
    text = "".join(detok.add(t) for t in out_ids) + detok.flush()
    shown = [t for t in out_ids if not skip or t not in marked.special_ids or t in kept_ids]
    assert text == marked.decode(shown, skip_special_tokens=False)
    if not kept_ids:
        assert text == marked.decode(out_ids, skip_special_tokens=skip)


def _reference_stop(text: str, stops: list[str], include: bool = False) -> tuple[str, str | None]:
    """Character by character: stop at the first stop string to complete (the longest of those
    completing together), before it or after it with ``include``; and that stop string."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            matched = max(done, key=len)
            return text[: end if include else end - len(matched)], matched
    return text, None


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc\n", max_size=40),
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
    include=st.booleans(),
)
def test_stop_matcher_never_leaks(text: str, stops: list[str], cuts: list[int], include: bool) -> None:
    """Nothing past the stop string is sent, nor the stop string itself unless it is to be included."""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    matcher = StopStringMatcher(stops, include=include)
    sent, matched = "", None
    for a, b in zip(bounds, bounds[1:]):
        result = matcher.feed(text[a:b])
        sent += result.text
        if result.stopped:
            matched = result.matched
            break
        assert not any(s in sent for s in stops)
    if matched is None:
        sent += matcher.flush()
    assert (sent, matched) == _reference_stop(text, stops, include)


@pytest.mark.unit
def test_stop_matcher_holds_back_only_possible_prefixes() -> None:
    matcher = StopStringMatcher(["\n\nROMEO:", "END"])
    assert matcher.feed("Good night\n").text == "Good night"
    assert matcher.feed("\nRO").text == ""
    assert matcher.feed("SALIND:").text == "\n\nROSALIND:"
    result = matcher.feed(" fair E")
    assert (result.text, result.stopped) == (" fair ", False)
    result = matcher.feed("ND of it")
    assert (result.text, result.stopped, result.matched) == ("", True, "END")


@pytest.mark.unit
def test_token_bytes_reassemble_utf8(tok: GatewayTokenizer) -> None:
    text = "naïve 日本 🎭 Romeo"
    ids = tok.encode(text)[1:]
    assert b"".join(bytes(tok.token_bytes(t)) for t in ids) == text.encode("utf-8")
    assert any("\ufffd" in tok.token_text(t) for t in ids)  # some tokens are partial characters


def _tokenizer_with_template(tmp_path: Path, template: str) -> GatewayTokenizer:
    shutil.copy(DEMO_MODEL / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((DEMO_MODEL / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return GatewayTokenizer(tmp_path)


@pytest.mark.unit
def test_template_raise_exception_and_sandbox(tmp_path: Path) -> None:
    strict = _tokenizer_with_template(
        tmp_path,
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('only user and assistant roles') }}{% endif %}{{ m['content'] }}{% endfor %}",
    )
    assert strict.render_chat([{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(ChatTemplateError, match="only user and assistant"):
        strict.render_chat([{"role": "system", "content": "x"}])
    mutate = _tokenizer_with_template(tmp_path, "{{ messages.append(1) }}")
    with pytest.raises(ChatTemplateError):
        mutate.render_chat([{"role": "user", "content": "x"}])
    escape = _tokenizer_with_template(tmp_path, "{{ messages.__class__.__base__.__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        escape.render_chat([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        _tokenizer_with_template(tmp_path, "{% for m in messages %}")


@pytest.mark.unit
def test_no_template_is_a_clear_error(tmp_path: Path) -> None:
    shutil.copy(DEMO_MODEL / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = GatewayTokenizer(tmp_path)
    assert tok.eos_token_id == 2
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "x"}])


@pytest.mark.unit
def test_a_chat_template_given_in_place_of_the_models_own(tmp_path: Path) -> None:
    """vLLM's ``--chat-template``: the template itself, or a file holding it, wins over the model's."""
    import argparse

    from baton.services.gateway.tokenizer import chat_template_arg

    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    (tmp_path / "t.jinja").write_text(template)
    assert chat_template_arg(template) == template == chat_template_arg(str(tmp_path / "t.jinja"))
    with pytest.raises(argparse.ArgumentTypeError, match="neither a chat template"):
        chat_template_arg(str(tmp_path / "missing.jinja"))
    tok = GatewayTokenizer(DEMO_MODEL, template)
    assert tok.render_chat([{"role": "user", "content": "Speak!"}]) == "<user>Speak!\n<assistant>"
    assert GatewayTokenizer(DEMO_MODEL).render_chat([{"role": "user", "content": "Speak!"}]) != "<user>Speak!\n<assistant>"
    with pytest.raises(ChatTemplateError, match="the --chat-template does not parse"):
        GatewayTokenizer(DEMO_MODEL, "{% for m in messages %}")
