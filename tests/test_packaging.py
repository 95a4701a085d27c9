"""The packaging in pyproject.toml: the required dependencies are importable and installed at the versions it asks,
the library and the shipped toy models load without the extras, and the wheel carries every file of the toy models."""

from __future__ import annotations

import glob
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffusers_goca"
# Distribution name → the module it installs, where the two differ.
IMPORT_NAMES = {"pillow": "PIL"}
# The extras' packages that our code could import directly; a load of the library or the toy models imports none.
EXTRA_MODULES = {"open_clip", "cleanfid", "gradio", "matplotlib", "torchmetrics"}
# The package data folders of diffusers_goca.toyworld: the two toy models and the toy classifier.
TOY_DATA_DIRS = ("model", "dit_model", "classifier")


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _requirement(spec: str):
    from packaging.requirements import Requirement

    return Requirement(spec)


def _data_files(package_dir: Path) -> set[str]:
    """The files under the toy data folders, relative to `package_dir`, as a wheel would name them."""
    out = set()
    for sub in TOY_DATA_DIRS:
        for path in (package_dir / sub).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and not path.name.startswith("."):
                out.add(path.relative_to(package_dir).as_posix())
    return out


def test_required_dependencies_are_installed_and_importable():
    deps = _pyproject()["project"]["dependencies"]
    assert deps, "pyproject.toml lists no dependencies"
    for spec in deps:
        req = _requirement(spec)
        version = importlib.metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} does not satisfy {spec}"
        importlib.import_module(IMPORT_NAMES.get(req.name.lower(), req.name.replace("-", "_")))


def test_extras_are_not_required_dependencies():
    project = _pyproject()["project"]
    required = {_requirement(s).name.lower() for s in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert {"toy", "bench", "test", "app"} <= set(extras)
    for name in ("open-clip-torch", "clean-fid", "gradio", "matplotlib", "torchmetrics", "pytest"):
        assert name not in required, f"{name} is a required dependency; it belongs to an extra"
    assert "open-clip-torch" in {_requirement(s).name for s in extras["toy"]}
    assert "open-clip-torch" in {_requirement(s).name for s in extras["test"]}


def test_console_script_names_a_callable():
    target = _pyproject()["project"]["scripts"]["goca"]
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_library_and_toy_models_load_without_the_extras():
    """A fresh interpreter imports the package, loads both shipped toy models (their folders carry their tokenizers)
    and segments a scene; none of the extras' modules is imported on the way."""
    code = (
        "import json, sys\n"
        "import diffusers_goca as goca\n"
        "from diffusers_goca.toyworld import TOY_DIT_MODEL_DIR, load_toy_pipeline, make_scene\n"
        "pipe = goca.from_pipe(load_toy_pipeline())\n"
        "labels = pipe.segment(make_scene(1).image, ['grass']).labels\n"
        "load_toy_pipeline(TOY_DIT_MODEL_DIR)\n"
        f"extras = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(EXTRA_MODULES)!r})\n"
        "print(json.dumps({'shape': list(labels.shape), 'extras': extras}))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["shape"]) == 2
    assert out["extras"] == [], f"loading the library imported modules of the extras: {out['extras']}"


def test_clip_tokenizer_without_open_clip_names_the_extra(monkeypatch):
    from diffusers_goca import clip_bpe

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "open_clip" else find_spec(name, *a, **k)
    )
    with pytest.raises(ImportError, match=r"diffusers-goca\[toy\]"):
        clip_bpe.default_bpe_path()


def test_toy_model_folders_carry_their_tokenizers():
    """Loading the shipped toy models builds no tokenizer: each folder that model_index.json names has its files."""
    toyworld = PACKAGE / "toyworld"
    for sub in ("model", "dit_model"):
        index = json.loads((toyworld / sub / "model_index.json").read_text())
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, list) or entry == [None, None]:
                continue
            files = list((toyworld / sub / name).glob("*"))
            assert files, f"{sub}/{name} is empty"
            if name.startswith("tokenizer"):
                assert (toyworld / sub / name / "tokenizer.json").exists(), f"{sub}/{name} has no tokenizer.json"


def test_package_data_globs_cover_the_toy_model_files():
    """pyproject's package-data globs, expanded as setuptools does, match every file of the toy data folders."""
    setuptools_cfg = _pyproject()["tool"]["setuptools"]
    patterns = setuptools_cfg["package-data"]["diffusers_goca.toyworld"]
    package_dir = PACKAGE / "toyworld"
    listed = set()
    for pattern in patterns:
        for path in glob.glob(str(package_dir / pattern), recursive=True):
            if os.path.isfile(path):
                listed.add(Path(path).relative_to(package_dir).as_posix())
    wanted = _data_files(package_dir)
    assert wanted, "no toy model files found"
    assert not wanted - listed, f"not in package data: {sorted(wanted - listed)}"


def test_every_module_is_in_a_package():
    """The package finder takes only folders with an __init__.py (namespaces = false): every .py file must be in one."""
    assert _pyproject()["tool"]["setuptools"]["packages"]["find"].get("namespaces") is False
    for path in PACKAGE.rglob("*.py"):
        for parent in path.relative_to(PACKAGE).parents:
            assert (PACKAGE / parent / "__init__.py").exists(), f"{path} is outside a package (no __init__.py)"


@pytest.mark.slow
def test_built_wheel_holds_the_package_and_the_toy_models(tmp_path):
    """`pip wheel` (no build isolation, so offline) of a copy of the sources: every module and every toy model file
    is in the wheel, with the license and the console script."""
    setuptools = pytest.importorskip("setuptools")
    from packaging.version import Version

    if Version(setuptools.__version__) < Version("77"):
        pytest.skip(f"setuptools {setuptools.__version__} < 77 (the build-system requirement)")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    shutil.copytree(PACKAGE, src / "diffusers_goca", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(src),
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (wheel,) = tmp_path.glob("diffusers_goca-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert not modules - names, f"modules missing from the wheel: {sorted(modules - names)}"
    data = {f"diffusers_goca/toyworld/{f}" for f in _data_files(PACKAGE / "toyworld")}
    assert not data - names, f"toy model files missing from the wheel: {sorted(data - names)}"
    dist_info = {n.split("/", 1)[0] for n in names if ".dist-info/" in n}.pop()
    assert f"{dist_info}/licenses/LICENSE" in names
    assert "goca = diffusers_goca.cli:main" in zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
