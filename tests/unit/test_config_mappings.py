"""Mapping-valued config fields (``rollout.resources``): YAML and ``key={a: 1}`` overrides, typed, clear errors."""

import pytest

from torl.config import Config, ConfigError
from torl.config_load import load_config


def test_resources_default_empty_and_not_shared():
    a, b = Config(), Config()
    assert a.rollout.resources == {} and a.rollout.resources is not b.rollout.resources


def test_resources_from_yaml_and_override(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("rollout:\n  resources:\n    gpu_node: 1\n")
    cfg = load_config([str(preset)], ["rollout.resources={node_b: 0.5}"])
    assert cfg.rollout.resources == {"gpu_node": 1.0, "node_b": 0.5}  # overrides merge into the preset's mapping
    assert load_config([], ["rollout.resources="]).rollout.resources == {}


@pytest.mark.parametrize(
    "override, match",
    [("rollout.resources=3", "rollout.resources: expected a mapping"), ("rollout.resources={a: x}", "resources.a")],
)
def test_resources_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config([], [override])
