"""Config files, --set overrides and the errors they raise."""

from __future__ import annotations

import pytest

from dspark_jax.config import (Config, ConfigError, DraftConfig, LlamaArch, ServeConfig, TargetConfig, apply_overrides,
                               load_config, override, resolve_config_path)


def test_bare_name_resolves_against_configs_dir():
    path = resolve_config_path("smollm2_dspark.py")
    assert path.parent.name == "configs" and path.is_file()
    cfg = load_config("smollm2_dspark.py")
    assert isinstance(cfg, Config) and cfg.target.source == "smollm2-135m-instruct"


def test_unknown_config_lists_known_ones():
    with pytest.raises(ConfigError, match="smollm2_dspark.py"):
        resolve_config_path("nope.py")


def test_overrides_parse_by_annotation():
    cfg = load_config("smollm2_dspark.py", ["serve.max_batch=8", "serve.temperature=0.7", "serve.chat=false",
                                            "draft.kind=dspark", "draft.target_layer_ids=1,9,17",
                                            "spec.scheduler=causal"])
    assert cfg.serve.max_batch == 8 and cfg.serve.temperature == 0.7 and cfg.serve.chat is False
    assert cfg.draft.kind == "dspark" and cfg.draft.target_layer_ids == (1, 9, 17)
    assert cfg.spec.scheduler == "causal"


def test_nested_arch_override_and_optional():
    cfg = Config(target=TargetConfig(arch=LlamaArch()))
    cfg = override(cfg, "target.arch.num_layers=4")
    assert cfg.target.arch.num_layers == 4
    assert override(cfg, "target.arch.rope_scaling=none").target.arch.rope_scaling is None


@pytest.mark.parametrize("assignment, message", [
    ("serve.max_btch=8", r"--set: ServeConfig has no field 'max_btch'; fields: \[.*'max_batch'"),
    ("spec.scheduler=greedy", r"SpecConfig.scheduler = 'greedy'; expected one of \['fixed', 'threshold', 'causal', 'async'\]"),
    ("serve.top_p=1.5", r"ServeConfig.top_p = 1.5; expected in \(0, 1\]"),
    ("serve.max_batch=many", r"ServeConfig.max_batch = 'many'; expected an integer"),
    ("serve.chat=maybe", r"expected true or false"),
    ("serve.page_size=12", r"ServeConfig.page_size = 12; expected a power of two"),
    ("draft.kind=medusa", r"expected one of \['none', 'ngram', 'dspark', 'dflash', 'eagle3'\]"),
    ("nofield", r"expected FIELD=VALUE"),
])
def test_bad_overrides_name_field_and_choices(assignment, message):
    cfg = load_config("smollm2_dspark.py")
    with pytest.raises(ConfigError, match=message):
        override(cfg, assignment)


def test_constructor_validation():
    with pytest.raises(ConfigError, match="LlamaArch.num_kv_heads = 4; expected a divisor of num_heads=6"):
        LlamaArch(num_heads=6, num_kv_heads=4)
    with pytest.raises(ConfigError, match="`source` .* or `arch`"):
        TargetConfig()
    with pytest.raises(ConfigError, match="DraftConfig.block_size = 0; expected 1..32"):
        DraftConfig(block_size=0)
    with pytest.raises(ConfigError, match="ServeConfig.temperature = -1"):
        ServeConfig(temperature=-1.0)


def test_config_file_without_config(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="must define a top-level `config`"):
        load_config(path)


@pytest.mark.parametrize("name, billions", [("qwen3_4b.py", 4.02), ("qwen3_8b.py", 8.19), ("qwen3_14b.py", 14.77)])
def test_qwen3_configs_have_the_published_sizes(name, billions):
    import numpy as np
    from flax import nnx

    from dspark_jax.models import abstract_target

    cfg = load_config(name)
    model = abstract_target(cfg.target.arch)
    total = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert total / 1e9 == pytest.approx(billions, rel=0.005)
    assert max(cfg.draft.target_layer_ids) < cfg.target.arch.num_layers - 1


def test_every_config_file_loads():
    from dspark_jax.config import CONFIG_DIR

    names = sorted(p.name for p in CONFIG_DIR.glob("*.py"))
    assert "smollm2_dspark.py" in names
    for name in names:
        assert isinstance(load_config(name), Config)


def test_overrides_that_must_agree_apply_together():
    cfg = Config(target=TargetConfig(arch=LlamaArch(num_heads=8, num_kv_heads=8)))
    cfg = apply_overrides(cfg, ["target.arch.num_heads=4", "target.arch.num_kv_heads=2"])
    assert (cfg.target.arch.num_heads, cfg.target.arch.num_kv_heads) == (4, 2)
