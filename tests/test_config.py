"""Render configs: the shipped presets load; bad files fail with the key and the file named."""

from pathlib import Path

import pytest

from wt_datagen.pipeline.config import ConfigError, RenderConfig, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "render_configs"


@pytest.mark.parametrize("name", ["objects", "scenes", "debug"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.name == name
    assert config_from_dict(cfg.to_dict()) == cfg  # the manifest's copy reads back the same


def test_objects_preset_is_the_default():
    assert load_config(CONFIGS / "objects.yaml") == RenderConfig(name="objects")


def test_scenes_preset_places_cameras_at_metric_scale():
    cfg = load_config(CONFIGS / "scenes.yaml")
    assert cfg.cameras.mode == "scene" and not cfg.assets.normalise


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, key",
    [
        ("viewz: 3\n", "'viewz'"),
        ("cameras:\n  fov: [30, 40]\n", "'cameras.fov'"),
        ("views: ten\n", "'views'"),
        ("views: 2.5\n", "'views'"),
        ("layers: true\n", "'layers'"),
        ("cameras:\n  fov_deg: [30]\n", "'cameras.fov_deg'"),
        ("cameras:\n  fov_deg: [30, abc]\n", "'cameras.fov_deg'"),
        ("cameras:\n  mode: sphere\n", "'cameras.mode'"),
        ("cameras: 3\n", "'cameras'"),
        ("image:\n  background: [0, 0]\n", "'image.background'"),
        ("assets:\n  normalise: 1\n", "'assets.normalise'"),
        ("cameras:\n  fov_deg: [30, 200]\n", "'cameras.fov_deg'"),
        ("cameras:\n  radius: [3, 2]\n", "'cameras.radius'"),
        ("cameras:\n  elevation_deg: [-90, 10]\n", "'cameras.elevation_deg'"),
        ("resolution: 0\n", "'resolution'"),
        ("shards:\n  max_samples: 0\n", "'shards.max_samples'"),
        ("encoding:\n  npz_level: 4\n", "'encoding.npz_level'"),
        ("sequences:\n  query_every: -1\n", "'sequences.query_every'"),
        ("sequences:\n  dynamic_rtol: 0\n", "'sequences.dynamic_rtol'"),
        ("sequences:\n  scene_flow: 1\n", "'sequences.scene_flow'"),
    ],
)
def test_bad_key_or_type_names_key_and_file(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert key in msg and str(path) in msg and "\n" not in msg


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "views: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_yaml_tags_are_not_constructed(tmp_path):
    # safe_load refuses python object tags instead of running them
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "views: !!python/object/apply:os.system ['true']\n"))


def test_overrides_win_and_none_is_ignored(tmp_path):
    path = _write(tmp_path, "views: 3\nlayers: 5\n")
    cfg = load_config(path, {"views": 7, "layers": None, "seed": 4})
    assert (cfg.views, cfg.layers, cfg.seed) == (7, 5, 4)
    assert cfg.name == "cfg"  # from the file name
    with pytest.raises(ConfigError, match="'views'"):
        load_config(path, {"views": 0})


def test_hash_covers_what_changes_samples_but_not_workers(tmp_path):
    path = _write(tmp_path, "views: 3\n")
    base = load_config(path)
    assert load_config(path, {"workers": 4}).hash == base.hash
    assert load_config(path, {"views": 4}).hash != base.hash
    assert load_config(_write(tmp_path, "views: 3\ncameras:\n  radius: [2, 3]\n")).hash != base.hash
