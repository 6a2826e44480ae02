"""Choosing how embeddings pool: vLLM's ``--pooler-config`` JSON, a checkpoint's
sentence-transformers modules, and the command lines that hand the choice to prefill workers."""

from __future__ import annotations

import json

import pytest

from baton.engine.model_config import load_pooler_config
from baton.engine.pooling import PoolerConfig

pytestmark = pytest.mark.unit

MODES = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
         "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


def test_the_config_reads_vllms_json_and_refuses_the_rest() -> None:
    assert PoolerConfig.from_json('{"pooling_type": "MEAN", "normalize": false}') == PoolerConfig("MEAN", normalize=False)
    assert PoolerConfig.from_json('{"pooling_type": "CLS"}') == PoolerConfig("CLS", normalize=True)
    assert PoolerConfig.from_json('{"normalize": false}') == PoolerConfig("LAST", normalize=False)
    assert PoolerConfig.from_json("{}") == PoolerConfig()
    for pooler in (PoolerConfig("MEAN", normalize=False), PoolerConfig("CLS")):
        assert PoolerConfig.from_json(pooler.to_json()) == pooler
    for text, message in [
        ("{not json", "not JSON"), ('["MEAN"]', "an object"), ('{"pooling_type": "MAX"}', "LAST, MEAN, CLS"),
        ('{"pooling_type": "mean"}', "'mean'"), ('{"pooling_type": "MEAN", "dimensions": 8}', "dimensions"),
        ('{"normalize": "yes"}', "true or false"), ('{"normalize": 1}', "true or false"),
    ]:
        with pytest.raises(ValueError, match=message):
            PoolerConfig.from_json(text)


def test_only_mean_and_cls_need_the_whole_prompt() -> None:
    assert [PoolerConfig(t).needs_whole_prompt for t in ("LAST", "MEAN", "CLS")] == [False, True, True]


def write_sentence_transformers(model_dir, mode: str | None, normalize: bool) -> None:
    """A sentence-transformers checkpoint's files: its modules (a Pooling module with ``mode`` on,
    when one is given; a Normalize module after it when ``normalize``), each in its folder."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    if mode is not None:
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
        (model_dir / "1_Pooling").mkdir()
        config = {"word_embedding_dimension": 256, **{m: m == mode for m in MODES}, "include_prompt": True}
        (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(config))
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (model_dir / "modules.json").write_text(json.dumps(modules))


@pytest.mark.parametrize("mode,pooling_type", [("pooling_mode_cls_token", "CLS"), ("pooling_mode_mean_tokens", "MEAN"),
                                               ("pooling_mode_lasttoken", "LAST")])
@pytest.mark.parametrize("normalize", [True, False])
def test_a_sentence_transformers_checkpoint_says_how_it_pools(tmp_path, mode, pooling_type, normalize) -> None:
    write_sentence_transformers(tmp_path, mode, normalize)
    assert load_pooler_config(tmp_path) == PoolerConfig(pooling_type, normalize)


@pytest.mark.parametrize("mode", ["pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                                  "pooling_mode_weightedmean_tokens"])
def test_a_pooling_mode_not_supported_here_is_refused_by_name(tmp_path, mode) -> None:
    write_sentence_transformers(tmp_path, mode, normalize=True)
    with pytest.raises(ValueError, match=f"mode {mode} is not supported"):
        load_pooler_config(tmp_path)


def test_a_pooling_module_must_set_exactly_one_mode(tmp_path) -> None:
    write_sentence_transformers(tmp_path, "pooling_mode_mean_tokens", normalize=True)
    config_path = tmp_path / "1_Pooling" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "pooling_mode_cls_token": True}))
    with pytest.raises(ValueError, match="sets 2 pooling modes"):
        load_pooler_config(tmp_path)
    config_path.write_text(json.dumps({**config, "pooling_mode_mean_tokens": False}))
    with pytest.raises(ValueError, match="sets 0 pooling modes"):
        load_pooler_config(tmp_path)


@pytest.mark.parametrize("normalize", [True, False])
def test_without_a_pooling_module_the_last_token_pools_normalized(tmp_path, normalize) -> None:
    assert load_pooler_config(tmp_path) == PoolerConfig("LAST", normalize=True)       # no modules.json
    write_sentence_transformers(tmp_path, None, normalize)
    assert load_pooler_config(tmp_path) == PoolerConfig("LAST", normalize=True)


def test_baton_up_hands_the_pooler_config_to_the_prefill_workers(capsys) -> None:
    from baton.services import launcher
    from baton.services.worker import worker_arg_parser

    text = json.dumps({"pooling_type": "CLS", "normalize": False})
    args = launcher.build_parser().parse_args(["up", "--redis-url", "redis://r:1/0", "--pooler-config", text])
    plan = launcher.make_plan(args)
    (prefill,), (decode,) = plan.prefill, plan.decode
    parsed = worker_arg_parser("prefill", default_port=1).parse_args(prefill[4:])
    assert parsed.pooler_config == PoolerConfig("CLS", normalize=False)
    assert "--pooler-config" not in decode
    assert worker_arg_parser("prefill", default_port=1).parse_args(["--model", "m"]).pooler_config is None
    for parser, argv in ((launcher.build_parser(), ["up"]), (worker_arg_parser("prefill", default_port=1), ["--model", "m"])):
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--pooler-config", '{"pooling_type": "MAX"}'])
        assert "pooling_type must be one of LAST, MEAN, CLS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        worker_arg_parser("decode", default_port=1).parse_args(["--model", "m", "--pooler-config", text])
