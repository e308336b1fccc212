"""Imports flow one way: record types -> models -> stages -> cli/serve (README "Layout").

Every ``embedrl`` import in ``src/embedrl`` (module top, inside functions and under ``TYPE_CHECKING`` alike) is read
with :mod:`ast`; a module may import its own component and components of a lower rank, never a higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Components from the bottom up; a component is a top-level module or subpackage of embedrl.
RANKS: list[tuple[str, ...]] = [
    ("embedrl",),  # the package root: __version__, and the loaders exported lazily through importlib
    ("embedrl.prompts",),  # every prompt and special token
    ("embedrl.config",),  # one config dataclass per stage
    ("embedrl.data",),  # record types and readers
    ("embedrl.plots",),  # curves from any run's metrics.jsonl
    ("embedrl.tcot",),  # the T-CoT grammar
    ("embedrl.evidence",),  # evidence -> pixels
    ("embedrl.losses",),
    ("embedrl.backbones",),  # Qwen-VL families, tiny checkpoints
    ("embedrl.models",),  # Embedder, Reasoner, chat, generation
    ("embedrl.rewards",),  # reward terms and the models that score them
    ("embedrl.eval",),  # metrics, caches, the evaluator, MMEB-V2, UVRB
    ("embedrl.prep", "embedrl.train", "embedrl.integrations"),  # stages and ecosystem adapters; none imports another
    ("embedrl.serve",),
    ("embedrl.world",),  # the synthetic world: only demo and cli import it
    ("embedrl.demo",),
    ("embedrl.cli",),
]
RANK = {component: rank for rank, group in enumerate(RANKS) for component in group}


def component(module: str) -> str:
    """``embedrl.eval.mmeb`` -> ``embedrl.eval``; ``embedrl`` -> ``embedrl``."""
    return ".".join(module.split(".")[:2])


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def embedrl_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every ``embedrl`` import in the file (``from embedrl import x`` names
    ``embedrl.x`` when ``x`` is a component, else ``embedrl``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "embedrl"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "embedrl":
                found += [(node.lineno, f"embedrl.{a.name}" if f"embedrl.{a.name}" in RANK else "embedrl")
                          for a in node.names]  # fmt: skip
            elif node.module.split(".")[0] == "embedrl":
                found.append((node.lineno, node.module))
    return found


def layering_violations(root: Path = SRC) -> list[str]:
    problems = []
    for path in sorted((root / "embedrl").rglob("*.py")):
        here = component(module_name(path, root))
        if here not in RANK:
            problems.append(f"{path.relative_to(root)}: component {here} has no rank in tests/test_layering.py")
            continue
        for line, target in embedrl_imports(path):
            there = component(target)
            if there not in RANK:
                problems.append(f"{path.relative_to(root)}:{line} imports {target}, which has no rank")
            elif there != here and RANK[there] >= RANK[here]:
                problems.append(f"{path.relative_to(root)}:{line} ({here}) imports {target} ({there}): not lower")
    return problems


def test_imports_flow_one_way() -> None:
    assert layering_violations() == []


def test_every_component_has_a_rank() -> None:
    on_disk = {component(module_name(p)) for p in (SRC / "embedrl").rglob("*.py")}
    assert on_disk <= set(RANK), sorted(on_disk - set(RANK))


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    """A lower layer importing a higher one (eval -> world, data -> models, prep <-> train) is reported."""
    package = tmp_path / "embedrl"
    for rel, text in {
        "__init__.py": "",
        "eval/__init__.py": "",
        "eval/bad.py": "def f():\n    from embedrl.world.generate import generate_world\n",
        "data/__init__.py": "",
        "data/bad.py": "import typing\nif typing.TYPE_CHECKING:\n    from embedrl.models import Embedder\n",
        "prep/__init__.py": "from embedrl.train import embedder\n",
        "world/__init__.py": "from embedrl.eval import bad\n",
    }.items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text(text)
    problems = layering_violations(tmp_path)
    assert len(problems) == 3, problems
    assert any("eval/bad.py:2" in p and "embedrl.world" in p for p in problems)
    assert any("data/bad.py:3" in p and "embedrl.models" in p for p in problems)
    assert any("prep/__init__.py:1" in p and "embedrl.train" in p for p in problems)


@pytest.mark.parametrize("module", ["embedrl.tcot", "embedrl.prompts", "embedrl.config"])
def test_component_of(module: str) -> None:
    assert component(module + ".x") == module
