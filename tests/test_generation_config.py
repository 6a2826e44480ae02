"""The model's sampling defaults, as vLLM takes them (``--generation-config``,
``--override-generation-config``): read from a generation config, overridden, refused where a
request's field would refuse them, and given by the gateway to each request field left out."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from baton.engine.generation_config import (
    GenerationDefaults, generation_config_arg, load_generation_defaults, parse_override,
)
from baton.services.gateway import __main__ as gateway_main, sampling_defaults
from baton.services.gateway.__main__ import build_parser, config_from_args, main
from baton.services.gateway.app import create_app
from baton.services.gateway.config import GatewayConfig
from test_gateway_api import MODEL, FakeBackend, client_for, post, tok  # noqa: F401 (tok: a fixture)

from conftest import DEMO_MODEL

pytestmark = pytest.mark.unit

FILE = {"temperature": 0.0, "max_new_tokens": 5, "top_p": 0.8, "top_k": 7, "min_p": 0.05, "repetition_penalty": 1.1,
        "do_sample": True, "eos_token_id": 9, "bos_token_id": 1}
DEFAULTS = {"temperature": 0.0, "max_tokens": 5, "top_p": 0.8, "top_k": 7, "min_p": 0.05, "repetition_penalty": 1.1}
USUAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}   # a request's defaults
BODIES = {
    "/v1/completions": {"model": MODEL, "prompt": "JULIET:\nO Romeo"},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "Speak."}]},
    "/v1/responses": {"model": MODEL, "input": "Speak."},
}


def model_copy(directory: Path, generation_config: dict | None) -> Path:
    """The demo checkpoint's config and tokenizer (what the gateway reads) in ``directory``, with
    ``generation_config`` as its generation_config.json (None: none)."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in DEMO_MODEL.iterdir():
        if path.suffix != ".safetensors" and path.name != "generation_config.json":
            shutil.copy(path, directory / path.name)
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config))
    return directory


def folder_with(directory: Path, generation_config: dict) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "generation_config.json").write_text(json.dumps(generation_config))
    return str(directory)


def make_config(**overrides: object) -> GatewayConfig:
    return GatewayConfig(**{"model_dir": str(DEMO_MODEL), "served_model_name": MODEL, **overrides})


def sampled(params) -> dict:
    return {name: getattr(params, name) for name in DEFAULTS}


# ---- reading the generation config -------------------------------------------------------


def test_auto_takes_the_sampling_keys_of_the_models_file_and_nothing_else(tmp_path):
    defaults = load_generation_defaults(model_copy(tmp_path / "m", FILE))
    assert defaults.values == DEFAULTS                     # do_sample, eos / bos ids are no sampling defaults
    assert defaults.path == tmp_path / "m" / "generation_config.json"
    assert defaults.max_tokens_cap is None                 # the checkpoint's own max_new_tokens is a default only
    assert load_generation_defaults(model_copy(tmp_path / "none", None)).values == {}


def test_the_demo_checkpoints_file_sets_no_sampling_default():
    assert load_generation_defaults(DEMO_MODEL).values == {}


def test_vllm_reads_none_and_a_folder_its_own(tmp_path):
    model = model_copy(tmp_path / "m", FILE)
    assert load_generation_defaults(model, "vllm").values == {}
    folder = folder_with(tmp_path / "g", {"temperature": 0.3, "max_new_tokens": 11, "top_k": None})
    defaults = load_generation_defaults(model, folder)
    assert defaults.values == {"temperature": 0.3, "max_tokens": 11}       # a null is no value
    assert defaults.max_tokens_cap == 11                                  # vLLM: a folder's is a server-wide limit


def test_the_override_sets_values_on_top_and_a_null_removes_one(tmp_path):
    model = model_copy(tmp_path / "m", FILE)
    override = {"temperature": 0.5, "top_k": None, "max_new_tokens": 3}
    defaults = load_generation_defaults(model, "auto", override)
    assert defaults.values == {name: value for name, value in DEFAULTS.items() if name != "top_k"} | {
        "temperature": 0.5, "max_tokens": 3}
    assert defaults.max_tokens_cap == 3                                   # vLLM: the override's caps every request
    assert load_generation_defaults(model, "vllm", {"min_p": 0.2}).values == {"min_p": 0.2}
    assert load_generation_defaults(model, "auto", {"temperature": None}).max_tokens_cap is None


@pytest.mark.parametrize("text,message", [
    ("{temperature: 1}", "not JSON"),
    ("[0.5]", "must be a JSON object"),
    ('{"do_sample": false}', "unknown key(s) 'do_sample'"),
    ('{"top_k": 2.5}', "top_k must be an integer, got 2.5"),
    ('{"temperature": "0.5"}', "temperature must be a number"),
    ('{"max_new_tokens": true}', "max_new_tokens must be an integer"),
])
def test_a_malformed_override_is_refused_saying_why(text, message):
    with pytest.raises(ValueError) as err:
        parse_override(text)
    assert message in str(err.value)


def test_a_folder_without_a_generation_config_is_refused_naming_it(tmp_path):
    for source in (str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(ValueError, match="generation_config " + source) as err:
            load_generation_defaults(DEMO_MODEL, source)
        assert repr(source) in str(err.value)
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"generation_config\.json is not JSON"):
        load_generation_defaults(DEMO_MODEL, str(tmp_path))
    assert generation_config_arg("vllm") == "vllm" and generation_config_arg(str(tmp_path)) == str(tmp_path)


def test_each_reader_checks_the_ranges_naming_the_origin(tmp_path):
    def refuse_hot(values):
        if values.get("temperature", 0) > 1:
            raise ValueError("too hot")

    model = model_copy(tmp_path / "m", {"temperature": 1.5})
    with pytest.raises(ValueError, match=r"^generation_config auto: .*generation_config\.json: too hot$"):
        load_generation_defaults(model, check=refuse_hot)
    with pytest.raises(ValueError, match=r"^override_generation_config: too hot$"):
        load_generation_defaults(model, "vllm", {"temperature": 1.5}, check=refuse_hot)
    with pytest.raises(ValueError, match=r"^--generation-config auto: .*: top_k must be an integer"):
        load_generation_defaults(model_copy(tmp_path / "k", {"top_k": "5"}), names=("--generation-config", "-"))


# ---- the gateway's flags ---------------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    ('{"temperature": 2.5}', "temperature: Input should be less than or equal to 2"),
    ('{"top_p": 0}', "top_p: Input should be greater than 0"),
    ('{"max_new_tokens": 0}', "max_new_tokens: Input should be greater than or equal to 1"),
    ('{"seed": 1}', "unknown key(s) 'seed'"),
    ("temperature=0", "not JSON"),
])
def test_an_override_a_request_would_refuse_stops_the_gateway_naming_the_flag(capsys, override, message):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model-dir", str(DEMO_MODEL), "--override-generation-config", override])
    assert f"argument --override-generation-config: {message}" in capsys.readouterr().err


def test_a_generation_config_a_request_would_refuse_stops_the_gateway_naming_the_flag_and_file(
    tmp_path, capsys, monkeypatch,
):
    def serve(config, tokenizer, log_level, listen_fd, supervisor):
        raise AssertionError("the gateway went on to serve")

    monkeypatch.setattr(gateway_main, "serve", serve)
    model = model_copy(tmp_path / "m", {"top_k": -2})
    with pytest.raises(SystemExit):
        main(["--model-dir", str(model)])
    err = capsys.readouterr().err
    assert f"--generation-config auto: {model / 'generation_config.json'}: top_k: Input should be greater" in err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model-dir", str(model), "--generation-config", str(tmp_path / "nowhere")])
    assert f"argument --generation-config: '{tmp_path / 'nowhere'}' is not a folder" in capsys.readouterr().err


def test_the_flags_reach_the_gateways_config(tmp_path):
    folder = folder_with(tmp_path / "g", {"temperature": 0.2})
    args = build_parser().parse_args(["--model-dir", str(DEMO_MODEL), "--generation-config", folder,
                                      "--override-generation-config", '{"top_k": 3, "max_new_tokens": null}'])
    config = config_from_args(args)
    assert config.generation_config == folder
    assert config.override_generation_config == {"top_k": 3, "max_new_tokens": None}
    config = config_from_args(build_parser().parse_args(["--model-dir", str(DEMO_MODEL)]))
    assert (config.generation_config, config.override_generation_config) == ("auto", {})


# ---- the gateway's requests ------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path) -> str:
    return str(model_copy(tmp_path / "model", FILE))


async def generated(tok, path: str, config, **fields) -> tuple[dict, dict]:
    """What the workers were asked to sample with, and the response, for a request of ``fields``."""
    backend = FakeBackend(tok)
    response = await post(backend, tok, path, {**BODIES[path], **fields}, config)
    assert response.status_code == 200, response.text
    return sampled(backend.requests[0].params), response.json()


@pytest.mark.parametrize("path", list(BODIES))
async def test_fields_left_out_take_the_models_defaults(tok, model_dir, path):
    params, _ = await generated(tok, path, make_config(model_dir=model_dir))
    assert params == DEFAULTS
    params, _ = await generated(tok, path, make_config(model_dir=model_dir), temperature=None, top_p=None)
    assert params == DEFAULTS                                            # null means "the default": the model's


async def test_fields_the_client_sets_win_even_at_their_usual_value(tok, model_dir):
    config = make_config(model_dir=model_dir)
    params, _ = await generated(tok, "/v1/completions", config, max_tokens=16, **USUAL)
    assert params == {**USUAL, "max_tokens": 16}
    params, _ = await generated(tok, "/v1/completions", config, temperature=1.0, max_tokens=9)
    assert params == {**DEFAULTS, "temperature": 1.0, "max_tokens": 9}
    for limit in ("max_tokens", "max_completion_tokens"):
        params, _ = await generated(tok, "/v1/chat/completions", config, top_k=0, **{limit: 12})
        assert params == {**DEFAULTS, "top_k": 0, "max_tokens": 12}


async def test_a_response_echoes_the_defaults_it_took_and_keeps_what_it_was_given(tok, model_dir):
    config = make_config(model_dir=model_dir)
    params, body = await generated(tok, "/v1/responses", config)
    assert params == DEFAULTS and (body["temperature"], body["top_p"]) == (0.0, 0.8)
    params, body = await generated(tok, "/v1/responses", config, temperature=1.0, top_p=1.0, max_output_tokens=8)
    assert params == {**DEFAULTS, "temperature": 1.0, "top_p": 1.0, "max_tokens": 8}
    assert (body["temperature"], body["top_p"], body["max_output_tokens"]) == (1.0, 1.0, 8)


async def test_the_default_limit_is_cut_to_the_room_the_prompt_leaves(tok, model_dir):
    prompt_tokens = len(tok.encode(BODIES["/v1/completions"]["prompt"]))
    config = make_config(model_dir=model_dir, max_model_len=prompt_tokens + 2)
    params, _ = await generated(tok, "/v1/completions", config)
    assert params["max_tokens"] == 2                                     # not a 400: the client asked for nothing


async def test_vllm_mode_ignores_the_models_file(tok, model_dir):
    prompt_tokens = len(tok.encode(BODIES["/v1/completions"]["prompt"]))
    config = make_config(model_dir=model_dir, generation_config="vllm", max_model_len=64)
    params, _ = await generated(tok, "/v1/completions", config)
    assert params == {**USUAL, "max_tokens": 64 - prompt_tokens}


async def test_the_override_wins_over_the_file_and_its_max_new_tokens_caps_every_request(tok, model_dir):
    config = make_config(model_dir=model_dir, override_generation_config={"temperature": 0.5, "top_k": None})
    params, _ = await generated(tok, "/v1/chat/completions", config)
    assert params == {**DEFAULTS, "temperature": 0.5, "top_k": 0}
    params, _ = await generated(tok, "/v1/completions", make_config(model_dir=model_dir), max_tokens=10)
    assert params["max_tokens"] == 10                                    # the checkpoint's max_new_tokens: no cap
    config = make_config(model_dir=model_dir, override_generation_config={"max_new_tokens": 3})
    for path, limit in (("/v1/completions", "max_tokens"), ("/v1/chat/completions", "max_completion_tokens"),
                        ("/v1/responses", "max_output_tokens")):
        assert (await generated(tok, path, config, **{limit: 10}))[0]["max_tokens"] == 3
        assert (await generated(tok, path, config, **{limit: 2}))[0]["max_tokens"] == 2
        assert (await generated(tok, path, config))[0]["max_tokens"] == 3


async def test_a_generation_config_folder_sets_the_defaults_and_caps(tok, model_dir, tmp_path):
    folder = folder_with(tmp_path / "g", {"top_p": 0.5, "max_new_tokens": 4})
    config = make_config(model_dir=model_dir, generation_config=folder)
    params, _ = await generated(tok, "/v1/completions", config, max_tokens=10)
    assert params == {**USUAL, "top_p": 0.5, "max_tokens": 4}


async def test_the_gateway_logs_the_defaults_once_at_start(tok, model_dir, caplog):
    caplog.set_level(logging.INFO, logger=sampling_defaults.__name__)
    app = create_app(make_config(model_dir=model_dir), FakeBackend(tok), tok)
    async with client_for(app) as client:
        for _ in range(2):
            assert (await client.post("/v1/completions", json=BODIES["/v1/completions"])).status_code == 200
    logged = [r.getMessage() for r in caplog.records if r.name == sampling_defaults.__name__]
    assert len(logged) == 1 and f"from {model_dir}/generation_config.json" in logged[0]
    assert all(f"'{name}': {value}" in logged[0] for name, value in DEFAULTS.items())
    caplog.clear()
    create_app(make_config(), FakeBackend(tok), tok)
    assert [r.getMessage() for r in caplog.records] == ["the generation config (--generation-config auto) sets no "
                                                        "sampling defaults"]


def test_defaults_value_the_request_fields_by_their_names():
    defaults = GenerationDefaults(file={"max_new_tokens": 4, "top_k": 2}, override={"top_k": None})
    assert defaults.values == {"max_tokens": 4} and defaults.max_tokens_cap is None
    assert sampling_defaults.default_limit(9, defaults) == 4 and sampling_defaults.default_limit(3, defaults) == 3
    assert sampling_defaults.capped(None, defaults) is None and sampling_defaults.capped(7, defaults) == 7
