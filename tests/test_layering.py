"""No import runs back up: the layers of src/prelort (docs/design.md section 6), checked on the import statements.

Every module under src/prelort is parsed with ``ast``; every ``import``/``from ... import`` of a prelort module
counts, also one inside a function or under ``TYPE_CHECKING`` (a lazy import upward is still an import upward).
"""

from __future__ import annotations

import ast
import fnmatch
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from prelort.config import Config

SRC = Path(__file__).resolve().parents[1] / "src"

# the layers from the bottom up, as module-name patterns
ALGORITHMS = ["prelort.methods", "prelort.methods.*", "prelort.rank_geometry", "prelort.factor_sums", "prelort.secure_sums",
              "prelort.privacy", "prelort.accounting", "prelort.updates"]
FLOWER_APPS = ["prelort.flower.serverapp", "prelort.flower.clientapp", "prelort.flower.launch"]
TOP = ["prelort.runner", "prelort.cli", "prelort.__main__"]
ROUND_LOOP = ["prelort.federation"]
ENGINES = ["prelort.engines", "prelort.engines.*"]
FLOWER = ["prelort.flower", "prelort.flower.*"]

# (modules, patterns they must not import, why); a pattern "!x" leaves the modules x out
RULES: list[tuple[list[str], list[str], str]] = [
    (ALGORITHMS, ["prelort.protocol", "prelort.client", "prelort.train", "prelort.recipe", *ROUND_LOOP, *ENGINES,
                  *FLOWER, *TOP], "the algorithms are functions on tensors and know no round, engine or run"),
    (["prelort.protocol"], ["prelort.client", "prelort.train", "prelort.recipe", "prelort.rundir", "prelort.report*",
                            "prelort.evaluate", "prelort.models", "prelort.data*", *ROUND_LOOP, *ENGINES, *FLOWER,
                            *TOP], "the protocol stands on the algorithms alone: engines and the round loop import it"),
    (["prelort.client", "prelort.train"], ["prelort.recipe", *ROUND_LOOP, *ENGINES, *FLOWER, *TOP],
     "the client side of a round is shared by every engine and speaks only the protocol"),
    (ENGINES, ["prelort.recipe", *ROUND_LOOP, *FLOWER_APPS, *TOP],
     "an engine carries messages: it imports the protocol, not the round loop or the run"),
    (ROUND_LOOP, ["prelort.client", "prelort.recipe", *ENGINES, *FLOWER, *TOP],
     "the round loop is the same for every engine"),
    (["prelort.recipe"], ["prelort.client", *ROUND_LOOP, *ENGINES, *FLOWER, *TOP],
     "the model/data recipe is what the runner and every ClientApp build on"),
    (["prelort.flower.records", "prelort.flower.secagg", "prelort.flower.certs"],
     ["prelort.recipe", *ROUND_LOOP, *ENGINES, *FLOWER_APPS, *TOP],
     "Flower's message codecs sit below the engines that use them"),
    (["prelort.flower.clientapp"], [*ROUND_LOOP, *ENGINES, "prelort.flower.serverapp", "prelort.flower.launch", *TOP],
     "a ClientApp trains from the recipe and the client side, never from the server's run"),
    (["prelort.metrics*"], ["prelort", "prelort.*", "!prelort.metrics*"], "a metric needs no other prelort module"),
    (["prelort", "prelort.*", "!prelort.__main__"], ["prelort.cli"], "only `python -m prelort` imports the command line"),
]

def _module_name(path: Path) -> tuple[str, list[str]]:
    """``(dotted name, package parts)`` of a file under src/."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), parts
    return ".".join(parts), parts[:-1]


def import_graph() -> dict[str, set[str]]:
    """Every prelort module -> the prelort modules it imports (``from pkg import mod`` counts as pkg.mod)."""
    files = {_module_name(p)[0]: p for p in sorted((SRC / "prelort").rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        _, package = _module_name(path)
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    imported.add(sub if sub in files else module)
        graph[name] = {m for m in imported if m == "prelort" or m.startswith("prelort.")} - {name}
    return graph


def _matches(module: str, patterns: list[str]) -> bool:
    """Whether a pattern matches ``module`` and no ``!pattern`` excludes it."""
    if any(fnmatch.fnmatchcase(module, p[1:]) for p in patterns if p.startswith("!")):
        return False
    return any(fnmatch.fnmatchcase(module, p) for p in patterns if not p.startswith("!"))


def violations() -> list[tuple[str, str, str]]:
    """``(importer, imported, why)`` for every import a rule forbids."""
    out = []
    for importer, imported in sorted(import_graph().items()):
        for who, banned, why in RULES:
            if not _matches(importer, who):
                continue
            out += [(importer, m, why) for m in sorted(imported) if _matches(m, banned)]
    return sorted(set(out))


def test_the_graph_sees_the_imports_the_layers_are_made_of():
    graph = import_graph()
    assert "prelort.protocol" in graph["prelort.federation"]
    assert "prelort.protocol" in graph["prelort.engines.inprocess"]
    assert "prelort.flower.records" in graph["prelort.engines.flower"]  # `from ..flower import records`
    assert "prelort.recipe" in graph["prelort.flower.clientapp"]  # an import inside a function counts
    assert "prelort.recipe" in graph["prelort.runner"]
    assert "prelort.adapters" in graph["prelort.train"]  # `from prelort import adapters`


def test_no_import_runs_back_up():
    found = [f"{a} imports {b}: {why}" for a, b, why in violations()]
    assert not found, "upward imports:\n" + "\n".join(found)


def test_engine_modules_are_named_after_the_config_values():
    """``engine: X`` runs on prelort.engines.<X without -sim>, a module whose engine class has ``execute``."""
    values = typing.get_args(Config.model_fields["engine"].annotation)
    assert set(values) == {"inprocess", "flower-sim", "flower"}
    graph = import_graph()
    for value in values:
        module = "prelort.engines." + value.removesuffix("-sim")
        assert module in graph, f"engine {value!r} has no module {module}"
        tree = ast.parse((SRC / Path(*module.split("."))).with_suffix(".py").read_text())
        executes = [c.name for c in tree.body if isinstance(c, ast.ClassDef)
                    and any(isinstance(f, ast.FunctionDef) and f.name == "execute" for f in c.body)]
        assert executes, f"{module} defines no engine (a class with execute)"


def test_the_inprocess_path_never_imports_flwr():
    pytest.importorskip("flwr")  # where flwr is absent it cannot be imported anyway
    code = ("import sys; import prelort.runner, prelort.engines, prelort.engines.inprocess, prelort.engines.flower, "
            "prelort.protocol, prelort.recipe; print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300,
                         env=env)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
