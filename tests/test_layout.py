"""The package's layout: no import cycle among its modules, no private name imported across modules, the tests'
helpers in `diffusers_goca.testing`, one loader, loads and segmentations that print no warning of ours, and the
renamed S-CFG classes with their deprecated aliases."""

from __future__ import annotations

import ast
import contextlib
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import diffusers_goca

PACKAGE = Path(diffusers_goca.__file__).parent
NAME = "diffusers_goca"


# -- the package's modules, read with ast ------------------------------------------------------------------------------
def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every .py file of the package (a package is its __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([NAME, *parts])] = path
    return out


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The module an `ImportFrom` names, made absolute (relative to `module`'s package)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(tree: ast.AST, top_level_only: bool):
    """The Import / ImportFrom nodes of a module: all of them, or only those run when the module is imported (not
    inside a function, and not under `if TYPE_CHECKING:`)."""
    todo = list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if top_level_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def _targets(module: str, node) -> list[str]:
    """The package modules an import statement in `module` loads (itself named; its parent packages, already being
    imported when a submodule runs, are not edges). `from pkg import name` loads `pkg.name` where that is a module,
    else `pkg` (its __init__)."""
    out = []
    if isinstance(node, ast.Import):
        out = [a.name for a in node.names]
    else:
        source = _absolute(module, node)
        for a in node.names:
            out.append(f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source)
    return [t for t in out if t in MODULES and t != module]


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports at its top level (relative or absolute `diffusers_goca` imports)."""
    return {
        m: {t for node in _imports(ast.parse(p.read_text(encoding="utf-8")), True) for t in _targets(m, node)}
        for m, p in MODULES.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first = last), or None: depth-first search with colours."""
    colour = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done
    path: list[str] = []

    def visit(node):
        colour[node], _ = 1, path.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == 1:
                return path[path.index(nxt) :] + [nxt]
            if colour[nxt] == 0:
                found = visit(nxt)
                if found:
                    return found
        colour[node], _ = 2, path.pop()
        return None

    for start in sorted(graph):
        if colour[start] == 0:
            found = visit(start)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_reads_relative_and_absolute_imports():
    graph = import_graph()
    assert f"{NAME}.mixin" in graph[f"{NAME}.scfg"]  # from .mixin import GoCAMixin
    assert f"{NAME}.functional.maps" in graph[f"{NAME}.step_results"]  # from .functional.maps import ...
    assert f"{NAME}.loading" in graph[f"{NAME}.cli"]


def test_no_import_cycle_among_the_package_modules():
    """The module-level imports of the package (relative ones, and absolute `diffusers_goca...` ones) form no cycle:
    every module can be imported first, on its own."""
    cycle = find_cycle(import_graph())
    assert cycle is None, " → ".join(cycle)


def test_no_private_name_is_imported_across_modules():
    """No module imports a `_private` name (dunders aside) from another module of the package, anywhere in it
    (also inside functions): `from .x import _name`, `from diffusers_goca.x import _name`. A private module
    imported by its own package (`functional._frobenius_triton` by `functional.frobenius_kernel`) is not a name."""
    found = []
    for module, path in MODULES.items():
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")), False):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _absolute(module, node)
            if not (source == NAME or source.startswith(NAME + ".")):
                continue
            for alias in node.names:
                name = alias.name
                if name.startswith("_") and not name.startswith("__") and f"{source}.{name}" not in MODULES:
                    where = str(path.relative_to(PACKAGE))
                    found.append(f"{where}:{node.lineno} from {source} import {name}")
    assert not found, "\n".join(found)


def _cycles_through_deferred_imports() -> list[list[str]]:
    """The cycles of the graph of every import (also those inside functions), as strongly connected components."""
    graph = {
        m: {t for node in _imports(ast.parse(p.read_text(encoding="utf-8")), False) for t in _targets(m, node)}
        for m, p in MODULES.items()
    }
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_no_cycle_even_through_deferred_imports():
    """Also the imports inside functions form no cycle (the command line, the benchmarks and the toy world load
    through `loading`, which imports none of them)."""
    assert _cycles_through_deferred_imports() == []


@pytest.mark.slow
def test_every_module_imports_first_on_its_own():
    """Each module imported first, in a fresh interpreter (what a cycle at import time breaks)."""
    skip = {f"{NAME}.__main__", f"{NAME}.functional._frobenius_triton"}  # runs the command line; needs triton
    names = [m for m in MODULES if m not in skip]
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for key in [k for k in sys.modules if k == 'diffusers_goca' or k.startswith('diffusers_goca.')]:\n"
        "        del sys.modules[key]\n"
        "    importlib.import_module(name)\n"
    )
    run = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# -- the test helpers ----------------------------------------------------------------------------------------------------
def test_tests_and_benchmarks_take_their_helpers_from_the_testing_module():
    """tests/conftest.py holds fixtures and hooks only: no test or benchmark imports from it (the builders and helpers
    are `diffusers_goca.testing`'s), and that module imports no extra's package when it is imported (the CLIP
    tokenizer finds open_clip's BPE file only when a builder asks for it)."""
    root = PACKAGE.parent
    found = []
    for path in sorted([*(root / "tests").glob("*.py"), *(root / "benchmarks").glob("*.py")]):
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")), False):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if "conftest" in names:
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, "imports from conftest: " + ", ".join(found)
    extras = {"open_clip", "cleanfid", "gradio", "matplotlib", "torchmetrics", "pytest", "sentencepiece"}
    tree = ast.parse(MODULES[f"{NAME}.testing"].read_text(encoding="utf-8"))
    top = {a.name.split(".")[0] for n in _imports(tree, True) if isinstance(n, ast.Import) for a in n.names}
    top |= {
        (n.module or "").split(".")[0] for n in _imports(tree, True) if isinstance(n, ast.ImportFrom) and not n.level
    }
    assert not top & extras, top & extras


# -- the loader ----------------------------------------------------------------------------------------------------------
def test_one_loader_serves_the_command_line_the_benchmarks_and_the_toy_world():
    from diffusers_goca import cli, loading
    from diffusers_goca.bench import coco30k, segmentation
    from diffusers_goca.toyworld import model

    assert cli.load_pipeline is loading.load_pipeline and cli.DTYPES is loading.DTYPES
    assert segmentation.load_pipeline is loading.load_pipeline and coco30k.load_pipeline is loading.load_pipeline
    assert model.pretrained is loading.pretrained and model.TOY_MODEL_DIR == loading.TOY_MODEL_DIR
    for module in (cli, segmentation, coco30k, model):  # no loader of their own, no dtype table of their own
        source = Path(module.__file__).read_text(encoding="utf-8")
        assert "from_pretrained(" not in source.replace("`from_pretrained(", ""), module.__name__
        assert "torch.float32 if" not in source and "else torch.float32" not in source, module.__name__


def test_the_dtype_rule_is_float32_on_the_cpu():
    from diffusers_goca.loading import DTYPES, pipeline_dtype

    assert pipeline_dtype("float16", "cpu") == torch.float32 and pipeline_dtype(torch.bfloat16, "cpu") == torch.float32
    assert pipeline_dtype("fp16", "cuda") == torch.float16 and pipeline_dtype("bf16", "cuda:1") == torch.bfloat16
    assert pipeline_dtype(torch.float16, torch.device("cuda")) == torch.float16
    assert set(DTYPES.values()) == {torch.float32, torch.float16, torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be one of"):
        pipeline_dtype("half", "cuda")


def test_from_pretrained_gets_the_dtype_by_the_keyword_diffusers_reads():
    import inspect

    from diffusers import DiffusionPipeline

    from diffusers_goca.loading import dtype_keyword, dtype_kwargs

    reads_dtype = 'kwargs.pop("dtype"' in inspect.getsource(DiffusionPipeline.from_pretrained)
    assert dtype_keyword() == ("dtype" if reads_dtype else "torch_dtype")
    assert dtype_kwargs(torch.float16) == {dtype_keyword(): torch.float16} and dtype_kwargs(None) == {}


@contextlib.contextmanager
def _no_warnings_of_ours(capfd):
    """Within the block: no Python warning, no log record at WARNING or above from diffusers, transformers or this
    package, and no line on stdout / stderr that reads as a warning (diffusers logs through its own handler)."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", NAME)]
    for logger in loggers:
        logger.addHandler(handler)
    capfd.readouterr()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    out, err = capfd.readouterr()
    assert not [str(w.message) for w in caught], [f"{w.category.__name__}: {w.message}" for w in caught]
    assert not records, [r.getMessage() for r in records]
    printed = [
        line
        for line in (out + err).splitlines()
        if any(word in line for word in ("deprecated", "should be kept in float32", "Warning", "warn"))
    ]
    assert not printed, printed


def test_loading_the_toy_model_prints_no_warning(capfd):
    from diffusers_goca.loading import load_pipeline
    from diffusers_goca.toyworld import load_toy_pipeline

    with _no_warnings_of_ours(capfd):
        toy = load_toy_pipeline()
        ready = load_toy_pipeline(pipeline_class=diffusers_goca.GoCAStableDiffusionPipeline, dtype=torch.float16)
        goca = load_pipeline(None, "cpu", torch.float32)
    assert toy.unet.dtype == torch.float32 and ready.unet.dtype == torch.float16 and goca.goca_enabled


def test_a_users_own_torch_dtype_call_keeps_diffusers_warning():
    """Only our loaders avoid the deprecation; diffusers' word to a user's own `torch_dtype=` call is not silenced."""
    from diffusers import DiffusionPipeline

    from diffusers_goca.loading import TOY_MODEL_DIR, dtype_keyword

    if dtype_keyword() != "dtype":
        pytest.skip("this diffusers reads torch_dtype without a warning")
    with pytest.warns(FutureWarning, match="torch_dtype"):
        DiffusionPipeline.from_pretrained(TOY_MODEL_DIR, torch_dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_segment_prints_no_warning(dtype, capfd):
    """fp16 on the CPU upcasts the VAE for the encode (force_upcast) without diffusers' "should be kept in float32"
    line, and casts it back."""
    from diffusers_goca.toyworld import load_toy_pipeline, make_scene

    pipe = diffusers_goca.from_pipe(load_toy_pipeline(dtype=dtype))
    scene = make_scene(7)
    with _no_warnings_of_ours(capfd):
        result = pipe.segment(scene.image, scene.classes)
        both = pipe.segment(scene.image, scene.classes, method=["goca", "vanilla"])
    assert pipe.vae.dtype == dtype and result.labels.shape == scene.image.shape[:2]
    assert isinstance(both, dict) and set(both) == {"goca", "vanilla"}


def test_load_toy_pipeline_still_reads_torch_dtype():
    from diffusers_goca.toyworld import load_toy_pipeline

    assert load_toy_pipeline(torch_dtype=torch.float16).unet.dtype == torch.float16
    with pytest.raises(ValueError, match="disagree"):
        load_toy_pipeline(dtype=torch.float16, torch_dtype=torch.float32)


# -- public names ------------------------------------------------------------------------------------------------------
def test_goca_methods_and_adapter_are_public():
    from diffusers_goca.methods import METHODS, available_methods
    from diffusers_goca.toyworld import load_toy_pipeline

    pipe = load_toy_pipeline(pipeline_class=diffusers_goca.GoCAStableDiffusionPipeline)
    assert not pipe.goca_enabled  # works before enable_goca too
    assert pipe.goca_methods == available_methods(diffusers_goca.adapter_for(pipe))
    assert set(pipe.goca_methods) <= set(METHODS) and "goca" in pipe.goca_methods and "iseg" in pipe.goca_methods
    pipe.enable_goca()
    assert pipe.goca_adapter is pipe._goca.adapter


def test_capture_request_is_public_and_scfg_uses_it():
    from diffusers_goca import generation, scfg

    assert scfg.CaptureRequest is generation.CaptureRequest and generation.CaptureRequest.__doc__
    assert not hasattr(scfg, "_Request")


def test_entropy_reduced_is_a_functional():
    from diffusers_goca import functional, methods

    assert methods.entropy_reduced is functional.entropy_reduced
    a = torch.rand(6, 6).softmax(-1)
    assert torch.allclose(functional.entropy_reduced(a, methods.ISEG_ENTROPY_LAMBDA).sum(-1), torch.ones(6))


# -- the layer-weight kernel setting -------------------------------------------------------------------------------------
def test_the_layer_weight_kernel_is_an_explicit_setting(monkeypatch):
    from diffusers_goca.functional import frobenius_kernel as fk

    cpu = torch.zeros(1)
    before = fk.get_layer_weight_kernel()
    previous = diffusers_goca.set_layer_weight_kernel("auto")
    try:
        assert previous == before and fk.get_layer_weight_kernel() == "auto"
        assert not fk.kernel_enabled(cpu)  # auto: CUDA tensors only
        monkeypatch.setenv("GOCA_KERNEL", "triton")  # the environment is the initial value only, never read again
        assert fk.get_layer_weight_kernel() == "auto"
        with diffusers_goca.layer_weight_kernel("torch"):
            assert fk.get_layer_weight_kernel() == "torch" and not fk.kernel_enabled(cpu)
            with fk.layer_weight_kernel("auto"):
                assert fk.get_layer_weight_kernel() == "auto"
            assert fk.get_layer_weight_kernel() == "torch"
        assert fk.get_layer_weight_kernel() == "auto"
        with pytest.raises(ValueError, match="one of"):
            diffusers_goca.set_layer_weight_kernel("cuda")
        with pytest.raises(ValueError, match="one of"):
            with fk.layer_weight_kernel("fast"):
                pass
    finally:
        diffusers_goca.set_layer_weight_kernel(previous)
    assert fk.get_layer_weight_kernel() == before


def test_the_kernel_block_is_local_to_its_thread():
    import threading

    from diffusers_goca.functional import frobenius_kernel as fk

    seen = []
    with fk.layer_weight_kernel("auto"):
        thread = threading.Thread(target=lambda: seen.append(fk.get_layer_weight_kernel()))
        thread.start()
        thread.join()
    assert seen == [fk.get_layer_weight_kernel()]


def _fresh_kernel_module():
    """A private copy of `functional.frobenius_kernel`, executed now (as at import), apart from the package's."""
    import importlib.util

    from diffusers_goca.functional import frobenius_kernel

    spec = importlib.util.spec_from_file_location("frobenius_kernel_copy", frobenius_kernel.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_goca_kernel_from_the_environment_is_the_initial_setting(monkeypatch):
    monkeypatch.delenv("GOCA_KERNEL", raising=False)
    assert _fresh_kernel_module().get_layer_weight_kernel() == "torch"
    monkeypatch.setenv("GOCA_KERNEL", "auto")
    fk = _fresh_kernel_module()
    assert fk.get_layer_weight_kernel() == "auto"
    assert fk.set_layer_weight_kernel("torch") == "auto" and fk.get_layer_weight_kernel() == "torch"
    monkeypatch.setenv("GOCA_KERNEL", "fast")  # unknown: the import goes through, the choice is refused
    fk = _fresh_kernel_module()
    with pytest.raises(ValueError, match="GOCA_KERNEL must be one of"):
        fk.kernel_enabled(torch.zeros(1))
    fk.set_layer_weight_kernel("torch")  # an explicit setting replaces it
    assert not fk.kernel_enabled(torch.zeros(1))


# -- the S-CFG class names -----------------------------------------------------------------------------------------------
def test_ready_scfg_classes_have_the_derived_names():
    from diffusers import (
        PixArtSigmaPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    from diffusers_goca.scfg import SCFGMixin

    for base in (StableDiffusionPipeline, StableDiffusionXLPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline):
        ready = diffusers_goca.goca_class(base, SCFGMixin)
        assert ready.__name__ == f"SCFGGoCA{base.__name__}" and getattr(diffusers_goca, ready.__name__) is ready
        assert diffusers_goca.goca_class(base).__name__ == f"GoCA{base.__name__}"
    assert diffusers_goca.SCFGGoCAStableDiffusionPipeline.__name__ == "SCFGGoCAStableDiffusionPipeline"


@pytest.mark.parametrize(
    "old, new",
    [
        ("SCFGGoCAPipeline", "SCFGGoCAStableDiffusionPipeline"),
        ("SCFGGoCAXLPipeline", "SCFGGoCAStableDiffusionXLPipeline"),
    ],
)
def test_old_scfg_names_are_deprecated_aliases(old, new):
    from diffusers_goca import pipelines

    with pytest.warns(FutureWarning, match=new) as caught:
        cls = getattr(diffusers_goca, old)
    assert cls is getattr(diffusers_goca, new) and caught[0].filename == __file__  # points at the caller's line
    with pytest.warns(FutureWarning, match=new):
        assert getattr(pipelines, old) is cls
    namespace = {}
    with pytest.warns(FutureWarning):
        exec(f"from diffusers_goca import {old} as alias", namespace)
    assert namespace["alias"] is cls
    assert old not in diffusers_goca.__all__ and new in diffusers_goca.__all__
    with pytest.raises(AttributeError):
        diffusers_goca.SCFGGoCANoSuchPipeline  # noqa: B018


# -- segment's docstring ---------------------------------------------------------------------------------------------------
def test_segment_documents_every_method_and_its_return_types():
    from diffusers_goca.methods import METHODS
    from diffusers_goca.mixin import GoCAMixin

    doc = GoCAMixin.segment.__doc__
    assert all(f'"{m}"' in doc for m in METHODS), doc
    assert "dict" in doc and "dict[str, GoCASegmentation]" in str(GoCAMixin.segment.__annotations__["return"])


# -- bench/coco30k without a metric ----------------------------------------------------------------------------------------
def test_coco30k_without_metrics_says_what_was_made(tmp_path, capsys):
    from diffusers_goca.bench.coco30k import parse_args, run
    from diffusers_goca.loading import load_pipeline

    pipe = load_pipeline(None, "cpu", torch.float32, scfg=True)
    out = tmp_path / "run"
    summary = run(
        parse_args(
            [
                "--toy",
                "--no-fid",
                "--no-clip",
                "--limit",
                "2",
                "--steps",
                "1",
                "--configs",
                "cfg",
                "--scales",
                "3,5",
                "--batch",
                "2",
                "--out",
                str(out),
            ]
        ),
        pipe=pipe,
        progress=False,
    )
    text = capsys.readouterr().out
    assert [r["images"] for r in summary["rows"]] == [2, 2]
    assert "–" not in text and "4 images in all" in text and str(out / "images") in text, text
    for folder in ("cfg-w3", "cfg-w5"):
        assert str(out / "images" / folder) in text and len(list((out / "images" / folder).glob("*.png"))) == 2
    assert (out / "table.md").read_text().startswith("--no-fid and --no-clip")
