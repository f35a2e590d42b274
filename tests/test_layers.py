"""The package's architecture, checked: the import-linter contracts of pyproject.toml (layers, errors a leaf),
no import cycle, no rtda import hidden inside a function, and a training core that names no method."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import grimp
import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rtda"
#: the methods: what the core (and every command but the method-specific rtda-translate) must not know by name
METHOD_MODULES = {"rtda.adaptation.adversarial", "rtda.adaptation.advent", "rtda.adaptation.cyclegan",
                  "rtda.adaptation.dacs", "rtda.adaptation.fda"}
METHOD_WORDS = ("cyclegan", "fda", "dacs", "advent", "adversarial", "minent", "g_s2t", "has_segmenter", "run_summary")
#: the training core and the commands that serve every method alike
CORE = ["rtda/adaptation/base.py", "rtda/adaptation/segmentation.py", "rtda/adaptation/segmenter.py",
        "rtda/pipelines/train.py", "rtda/pipelines/evaluate.py", *sorted(str(p.relative_to(ROOT)) for p in (PACKAGE / "run").glob("*.py")),
        *sorted(str(p.relative_to(ROOT)) for p in (PACKAGE / "bench").glob("*.py"))]


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("rtda", cache_dir=None)


def test_the_import_linter_contracts_of_pyproject_hold():
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_the_import_graph_has_no_cycle(graph):
    """Every import counts, wherever it sits in a module (grimp reads function-level imports too)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(imported) == 1:
                cycles.append(path[path.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = 2

    for module in sorted(graph.modules):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_rtda_import_sits_inside_a_function():
    """Imports of rtda's own modules are at the top of each module, where the layering can be read."""
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    names = [sub.module or ""] if isinstance(sub, ast.ImportFrom) else \
                        [a.name for a in sub.names] if isinstance(sub, ast.Import) else []
                    if any(n == "rtda" or n.startswith("rtda.") for n in names):
                        hidden.append(f"{path.relative_to(ROOT)}:{sub.lineno}")
    assert hidden == []


def _code_words(path: Path) -> set[str]:
    """The names and string literals of a module's code, without comments and docstrings (what it does, not
    what it explains), lower-cased."""
    source = path.read_text()
    doc_lines = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            doc_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    words = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NAME, tokenize.STRING) and tok.start[0] not in doc_lines:
            words.add(tok.string.lower())
    return words


@pytest.mark.parametrize("module", CORE)
def test_the_core_names_no_method(module, graph):
    """What train / eval / bench / results / checkpoints need from a method comes from its declared interface
    (rtda.adaptation.base.TrainingModule), never from its module, its name or its keys."""
    dotted = module.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    assert graph.find_modules_directly_imported_by(dotted) & METHOD_MODULES == set()
    words = _code_words(ROOT / module)
    assert [w for w in words for m in METHOD_WORDS if m in w] == []


@pytest.mark.parametrize("module, name", [
    ("rtda.adaptation.fda", "fda_source_to_target"), ("rtda.adaptation.fda", "charbonnier_entropy"),
    ("rtda.adaptation.advent", "self_information"), ("rtda.adaptation.advent", "entropy_loss"),
    ("rtda.adaptation.pseudo_labels", "fda_pseudo_labels"), ("rtda.metrics", "SegmentationMetrics"),
    ("rtda.data.labels", "label_ids_to_train_ids"), ("rtda.data.gta5", "GTA5"), ("rtda.data.cityscapes", "Cityscapes"),
    ("rtda.models.discriminator", "FCDiscriminator"),
])
def test_the_contract_names_keep_their_import_paths(module, name):
    """DESIGN.md's Python names import from where it says, whichever module now defines them."""
    imported = __import__(module, fromlist=[name])
    assert callable(getattr(imported, name))
    assert name in getattr(imported, "__all__", [name]) or getattr(imported, name).__module__ == module
