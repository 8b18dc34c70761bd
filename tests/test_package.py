"""wsi as an HPC site installs it: a wheel built from this checkout, installed into a fresh virtualenv, with
its defaults and its workflow inside the package.

The virtualenv sees the test environment's packages (``--system-site-packages``) and the wheel goes in with
``--no-deps --no-index``, so nothing is downloaded; the installed ``wsi`` must shadow the one under test (an
editable install or ``PYTHONPATH``), which the test checks before trusting what it runs.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from wsi.store import SlideStore, is_complete, store_path

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_LINKS = REPO / "wsi" / "workflow"


def workflow_links() -> list[Path]:
    """The symlinks under wsi/workflow, each to a top-level file or folder of the checkout."""
    return [p for p in WORKFLOW_LINKS.rglob("*") if p.is_symlink()]


def workflow_files() -> dict[str, Path]:
    """Every file the workflow needs, by its path inside the package: what wsi/workflow/* link to."""
    files = {}
    for link in workflow_links():
        paths = [link] if link.is_file() else [p for p in link.rglob("*") if p.is_file()]
        for path in paths:
            if "__pycache__" not in path.parts:
                files[f"wsi/workflow/{path.relative_to(WORKFLOW_LINKS).as_posix()}"] = path
    return files


def run(cmd: list, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout, built offline from a copy of what the build reads (so the checkout gets
    no build/ or egg-info)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "package.json", "package-lock.json", "README.md"):
        shutil.copy2(REPO / name, src)
    shutil.copytree(REPO / "wsi", src / "wsi", symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "vendor"))
    for link in workflow_links():  # the top-level files and folders the package's workflow links point to
        target = link.resolve()
        (src / target.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if target.is_dir() else shutil.copy2
        copy(target, src / target.relative_to(REPO))
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation", "--quiet",
         "--wheel-dir", dist, src], dict(os.environ), src)
    (path,) = dist.glob("wsi-*.whl")
    return path


def test_wheel_holds_the_workflow_and_its_defaults(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        expected = workflow_files()
        assert {"wsi/workflow/Snakefile", "wsi/workflow/configs/default.yaml",
                "wsi/workflow/configs/schema.yaml"} <= set(expected)
        missing = sorted(set(expected) - names)
        assert not missing, f"the wheel lacks {missing}: add them to [tool.setuptools.package-data]"
        for name, path in expected.items():  # real files with the checkout's contents, not links
            assert whl.read(name) == path.read_bytes(), name


def test_wheel_holds_the_viewer_and_openseadragon_from_npm(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
    for name in ("slide.html", "slide.js", "cohort.html", "cohort.js", "viewer.css", "vendor/openseadragon/"
                 "openseadragon.min.js", "vendor/openseadragon/LICENSE.txt",
                 "vendor/openseadragon/images/home_rest.png"):
        assert f"wsi/viewer/static/{name}" in names, name


@pytest.mark.slow
def test_installed_wheel_tiles_a_slide_and_runs_its_workflow(wheel, make_slide, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], dict(os.environ),
        tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel], env, tmp_path)

    module = run([python, "-c", "import wsi; print(wsi.__file__)"], env, tmp_path).stdout.strip()
    assert Path(module).is_relative_to(venv), f"the test imported {module}, not the installed wheel"
    snakefile = Path(run(["wsi", "workflow"], env, tmp_path).stdout.strip())
    assert snakefile.is_relative_to(venv) and snakefile.is_file()
    assert (snakefile.parent / "configs" / "demo.yaml").is_file()

    slide = make_slide("package.svs", width=1536, height=1024, mpp=0.5, seed=3, tumour_tiles=1)
    out = tmp_path / "out"
    run(["wsi", "tile", slide.path, "--out", out, "--no-progress"], env, tmp_path)
    assert is_complete(store_path(out, "package"))
    store = SlideStore.open(store_path(out, "package"))
    assert store.n_tiles > 0

    # the installed workflow runs its tile rule (configfile, schema, rule modules and profile from the package)
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "package.svs").symlink_to(slide.path)
    run([python, "-m", "snakemake", "-s", snakefile, "--cores", "1", "--config", f"slides_dir={slides}",
         f"out_dir={tmp_path / 'wf_out'}", "mode=features", "--", tmp_path / "wf_out/status/tile/batch-00000.json"],
        env, tmp_path)
    assert SlideStore.open(store_path(tmp_path / "wf_out", "package")).n_tiles == store.n_tiles
