"""The distribution ships every package: a wheel lists its packages explicitly (package-dir maps
adapters/ and viewer/ under attnformat), so a new subpackage must be added there too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import numpy as np
import pytest

import attnformat

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {"attnformat": ROOT / "attnformat", **{name: ROOT / path for name, path in config["package-dir"].items()}}
    found = set()
    for package, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            found.add(".".join((package, *relative)))
    assert found == listed


def test_schemas_are_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-data"]["attnformat.schemas"] == ["*.json"]
    assert sorted(p.name for p in (ROOT / "spec" / "schemas").glob("*.json")) == [
        "root-attributes.schema.json", "site-attributes.schema.json", "variable-attributes.schema.json"]


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(names) -> dict:
    from packaging.requirements import Requirement

    return {Requirement(text).name.lower(): Requirement(text) for text in names}


def test_extras_tensorstore_optional_s3fs_remote_moto_dev():
    project = _project()
    extras = project["optional-dependencies"]
    assert "tensorstore" not in _requirements(project["dependencies"])
    assert "tensorstore" in _requirements(extras["fast"])
    assert "s3fs" in _requirements(extras["remote"])
    assert {"fast", "remote", "torch", "hf", "pyg"} <= set(extras["all"][0].split("[")[1].rstrip("]").split(","))
    dev = _requirements(extras["dev"])
    assert "server" in dev["moto"].extras and {"pytest", "pytest-xdist", "netcdf4"} <= set(dev)
    assert (ROOT / "constraints.txt").read_text().count("torch==2.13.0") == 1


def test_numcodecs_floor_refuses_pickle_itself():
    import pickle

    import numcodecs
    from numcodecs.errors import UnsafeDecodeError

    specifier = _requirements(_project()["dependencies"])["numcodecs"].specifier
    # The releases that carry the refusal (GHSA-jqc8-qjfv-5m6r) and the ones that do not.
    assert all(specifier.contains(v) for v in ("0.16.6", "0.17.1", "0.18.0"))
    assert not any(specifier.contains(v) for v in ("0.15.1", "0.16.5", "0.17.0"))
    assert specifier.contains(numcodecs.__version__)
    with pytest.raises(UnsafeDecodeError):  # the installed release refuses by itself
        numcodecs.Pickle().decode(pickle.dumps(np.arange(3), protocol=4))


def _checkout_copy(destination: Path) -> Path:
    """The files a wheel is built from, copied so that building leaves the checkout untouched."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, destination / name)
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for folder in {"attnformat", *config["package-dir"].values()}:
        shutil.copytree(ROOT / folder, destination / folder, ignore=ignore)
    return destination


def test_wheel_install_works_with_the_checkout_as_working_directory(tmp_path):
    """`python -m attnformat` from the checkout finds the checkout's attnformat/ first (the working
    directory leads sys.path), which lacks viewer/, adapters/ and the schemas; every command must
    still work. The wheel also works on its own, with the moved command modules in it."""
    (tmp_path / "source").mkdir()
    source = _checkout_copy(tmp_path / "source")
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], check=True, capture_output=True, timeout=120)
    (wheel,) = wheels.glob("attnformat-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=120)
    # -S: no site-packages, hence none of the development install's .pth hooks; the dependencies
    # come from the environment's site-packages, after the wheel on the path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]]),
           "MPLBACKEND": "Agg"}
    example = attnformat.example_path("dense")

    def run(*argv, cwd=ROOT):
        result = subprocess.run([sys.executable, "-S", *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
        assert result.returncode == 0, (argv, result.stderr[-3000:])
        assert "Traceback" not in result.stderr
        return result.stdout

    version = f"attnformat {attnformat.__version__} (format {attnformat.FORMAT_VERSION})"
    assert run("-m", "attnformat", "--version").strip() == version
    assert f"{example}: conforms" in run("-m", "attnformat", "validate", str(example))
    assert "encoder/self" in run("-m", "attnformat", "info", str(example))
    assert "heatmap" in run("-m", "attnformat", "plot", "--help")
    # Elsewhere the wheel alone answers, moved command modules and schemas included.
    where = run("-c", "import attnformat, attnformat.viewer.cli, attnformat.adapters.cli, attnformat.cli.core; "
                      "from importlib import resources; print(attnformat.__file__); "
                      "print(resources.files('attnformat.schemas').joinpath('root-attributes.schema.json').is_file()); "
                      "print(resources.files('attnformat.viewer.explorer').joinpath('static/core.js').is_file())",
                cwd=tmp_path)
    # The explorer's page is assembled from its static files at run time: they must be in the wheel.
    assert where.split() == [str(target / "attnformat" / "__init__.py"), "True", "True"]
    script = target / "bin" / "attnformat"
    assert f"{example}: conforms" in run(str(script), "validate", str(example))
