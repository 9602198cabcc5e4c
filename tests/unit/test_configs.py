"""configs/*.toml hold the built-in defaults: each file parses, names every setting, and equals
the dataclass defaults in edgemesh/config.py."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from edgemesh.config import (LaunchOptions, MeshConfig, TestbedSettings, configs_dir, from_table, load_launch_options,
                             load_mesh_config, load_testbed_settings, load_toml)
from edgemesh.errors import ConfigError

pytestmark = pytest.mark.unit

CASES = [("daemon.toml", "mesh", MeshConfig, load_mesh_config),
         ("launch.toml", "launch", LaunchOptions, load_launch_options),
         ("testbed.toml", "testbed", TestbedSettings, load_testbed_settings)]


@pytest.mark.parametrize("name,table,cls,load", CASES)
def test_each_configs_file_equals_the_built_in_defaults(name, table, cls, load) -> None:
    path = configs_dir() / name
    assert load(path) == cls()
    written = set(load_toml(path)[table])
    # Every setting is written down, except those whose default is None (TOML has no null).
    assert written == {f.name for f in fields(cls) if getattr(cls(), f.name) is not None}


def test_a_changed_value_is_read_and_mistakes_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "launch.toml"
    path.write_text('[launch]\nnodes = 2\nnames = ["a", "b"]\ntimeout = 7\n')
    assert load_launch_options(path) == LaunchOptions(nodes=2, names=("a", "b"), timeout=7.0)
    with pytest.raises(ConfigError, match=r"\[launch\] nodes must be a int"):
        from_table(LaunchOptions, {"nodes": "2"}, "launch", "x.toml")
    with pytest.raises(ConfigError, match="unknown key 'speed'"):
        from_table(TestbedSettings, {"speed": 1}, "testbed", "x.toml")
    with pytest.raises(ConfigError, match=r"\[mesh\] mdns must be a bool"):
        MeshConfig.from_mapping({"mdns": 1}, "x.toml")
