"""No import runs back up and none goes round in a circle: the layers of src/prelort (docs/design.md section 6),
checked on the import statements.

Every module under src/prelort is parsed with ``ast``; every ``import``/``from ... import`` of a prelort module
counts, also one inside a function or under ``TYPE_CHECKING`` (a lazy import upward is still an import upward).
The engine table (:mod:`prelort.engines`) names its engines' code by module path, imported by
:func:`prelort.runner.run` when a run needs it: those references count as imports of ``prelort.runner``.

``LAYERS`` puts every module file in exactly one layer (a folder is not one layer: ``engines/__init__.py``, the
engine table, sits far below the engines in ``engines/*.py``); a module may import its own layer and the layers
below. ``RULES`` forbids imports the layer order would allow but the design does not (the protocol knows no
model or data, the client side no recipe, the round loop no engine, ...).
"""

from __future__ import annotations

import ast
import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prelort import engines
from prelort.config import Config

SRC = Path(__file__).resolve().parents[1] / "src"

# The layers from the bottom up: (name, module names or patterns). A module named exactly belongs to that layer;
# otherwise to the one layer with a pattern that matches it ("!x" leaves x out of a layer's patterns).
LAYERS: list[tuple[str, list[str]]] = [
    (
        "foundations",
        [
            "prelort.rank_geometry",
            "prelort.factor_sums",
            "prelort.robust",
            "prelort.model_names",
            "prelort.metrics",
            "prelort.metrics.*",
        ],
    ),  # pure helpers and the metric table: no other prelort import
    ("method interface", ["prelort.methods.base", "prelort.methods.toolkit"]),
    ("method registry", ["prelort.methods"]),
    ("methods", ["prelort.methods.*"]),  # one file per method
    ("engine table", ["prelort.engines"]),  # engines/__init__.py: name -> how a run on it starts
    ("config", ["prelort.config"]),  # validates method and engine against the two tables
    ("algorithms", ["prelort.updates", "prelort.secure_sums", "prelort.privacy", "prelort.accounting"]),
    (
        "model and data",
        ["prelort.models", "prelort.adapters", "prelort.export", "prelort.data", "prelort.data.*", "prelort"],
    ),  # the package itself: __version__ and load_base_model
    ("evaluation", ["prelort.evaluate", "prelort.lm_harness"]),  # lm_harness: lm-evaluation-harness on a model
    ("recipe", ["prelort.recipe"]),  # the model and data of a config, for the runner and every ClientApp
    ("protocol", ["prelort.protocol"]),
    ("client side", ["prelort.train", "prelort.client"]),
    ("device probe", ["prelort.probe"]),  # measures the recipe's model under the client's trainer, per rank
    ("flower codecs", ["prelort.flower", "prelort.flower.*"]),
    ("engines", ["prelort.engines.*"]),
    ("run directory", ["prelort.checkpoint", "prelort.rundir", "prelort.tracking"]),  # tracking mirrors metrics.jsonl
    ("round loop", ["prelort.federation"]),
    ("reports", ["prelort.report", "prelort.report.*", "prelort.check"]),
    ("launcher", ["prelort.apps.launch"]),  # starts Flower runs; the engine table hands it runner.run's
    ("runner", ["prelort.runner"]),
    ("apps", ["prelort.apps", "prelort.apps.*", "prelort.__main__"]),  # the CLI, the Flower ServerApp/ClientApp
]

# module groups the rules name
ALGORITHMS = [
    "prelort.methods",
    "prelort.methods.*",
    "prelort.rank_geometry",
    "prelort.factor_sums",
    "prelort.robust",
    "prelort.secure_sums",
    "prelort.privacy",
    "prelort.accounting",
    "prelort.updates",
]
FLOWER_APPS = ["prelort.apps.serverapp", "prelort.apps.clientapp", "prelort.apps.launch"]
TOP = ["prelort.runner", "prelort.apps.cli", "prelort.__main__"]
ROUND_LOOP = ["prelort.federation"]
ENGINE_TABLE = ["prelort.engines"]
ENGINES = ["prelort.engines.*"]
FLOWER = ["prelort.flower", "prelort.flower.*"]

# (modules, patterns they must not import, why); a pattern "!x" leaves the modules x out
RULES: list[tuple[list[str], list[str], str]] = [
    (
        ALGORITHMS,
        ["prelort.protocol", "prelort.client", "prelort.train", "prelort.recipe", *ROUND_LOOP, *ENGINES, *FLOWER, *TOP],
        "the algorithms are functions on tensors and know no round, engine or run",
    ),
    (
        ENGINE_TABLE,
        ["prelort", "prelort.*"],
        "the engine table names engines by module path and imports nothing "
        "of prelort, so the config reads it before any heavy import",
    ),
    (
        ["prelort.protocol"],
        [
            "prelort.client",
            "prelort.train",
            "prelort.recipe",
            "prelort.rundir",
            "prelort.report*",
            "prelort.evaluate",
            "prelort.models",
            "prelort.data*",
            *ROUND_LOOP,
            *ENGINES,
            *FLOWER,
            *TOP,
        ],
        "the protocol stands on the algorithms alone: engines and the round loop import it",
    ),
    (
        ["prelort.client", "prelort.train"],
        ["prelort.recipe", *ROUND_LOOP, *ENGINES, *FLOWER, *TOP],
        "the client side of a round is shared by every engine and speaks only the protocol",
    ),
    (
        ENGINES,
        ["prelort.recipe", *ROUND_LOOP, *FLOWER_APPS, *TOP],
        "an engine carries messages: it imports the protocol, not the round loop or the run",
    ),
    (
        ROUND_LOOP,
        ["prelort.client", "prelort.recipe", *ENGINES, *FLOWER, *TOP],
        "the round loop is the same for every engine",
    ),
    (
        ["prelort.recipe"],
        ["prelort.client", *ROUND_LOOP, *ENGINES, *FLOWER, *TOP],
        "the model/data recipe is what the runner and every ClientApp build on",
    ),
    (
        FLOWER,
        ["prelort.recipe", "prelort.client", "prelort.train", *ROUND_LOOP, *ENGINES, *FLOWER_APPS, *TOP],
        "Flower's message codecs sit below the engines that use them",
    ),
    (
        ["prelort.apps.clientapp"],
        [*ROUND_LOOP, *ENGINES, "prelort.apps.serverapp", "prelort.apps.launch", *TOP],
        "a ClientApp trains from the recipe and the client side, never from the server's run",
    ),
    (["prelort.metrics*"], ["prelort", "prelort.*", "!prelort.metrics*"], "a metric needs no other prelort module"),
    (
        ["prelort", "prelort.*", "!prelort.__main__"],
        ["prelort.apps.cli"],
        "only `python -m prelort` imports the command line",
    ),
]


def _module_name(path: Path) -> tuple[str, list[str]]:
    """``(dotted name, package parts)`` of a file under src/."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), parts
    return ".".join(parts), parts[:-1]


def engine_table_imports() -> set[str]:
    """The modules the engine table names (``"module:attribute"``), which :func:`prelort.runner.run` imports."""
    return {ref.partition(":")[0] for spec in engines.available().values() for ref in spec.references()}


def import_graph() -> dict[str, set[str]]:
    """Every prelort module -> the prelort modules it imports (``from pkg import mod`` counts as pkg.mod), the
    engine table's references counted as imports of prelort.runner."""
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
    graph["prelort.runner"] |= engine_table_imports()
    return graph


def _matches(module: str, patterns: list[str]) -> bool:
    """Whether a pattern matches ``module`` and no ``!pattern`` excludes it."""
    if any(fnmatch.fnmatchcase(module, p[1:]) for p in patterns if p.startswith("!")):
        return False
    return any(fnmatch.fnmatchcase(module, p) for p in patterns if not p.startswith("!"))


def layers_of(module: str) -> list[int]:
    """The indices (bottom = 0) of the layers ``module`` belongs to: those that name it exactly, else those
    with a matching pattern. Exactly one for every module (test_every_module_is_in_exactly_one_layer)."""
    exact = [i for i, (_, names) in enumerate(LAYERS) if module in names]
    return exact or [i for i, (_, names) in enumerate(LAYERS) if _matches(module, names)]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``importer (layer) imports imported (higher layer)`` for every import that runs back up."""
    layer = {m: layers_of(m)[0] for m in set(graph).union(*graph.values()) if layers_of(m)}  # unplaced: skipped
    out = []
    for importer, imported in sorted(graph.items()):
        if importer in layer:
            out += [
                f"{importer} ({LAYERS[layer[importer]][0]}) imports {m} ({LAYERS[layer[m]][0]})"
                for m in sorted(imported)
                if layer.get(m, -1) > layer[importer]
            ]
    return out


def violations() -> list[tuple[str, str, str]]:
    """``(importer, imported, why)`` for every import a rule forbids."""
    out = []
    for importer, imported in sorted(import_graph().items()):
        for who, banned, why in RULES:
            if not _matches(importer, who):
                continue
            out += [(importer, m, why) for m in sorted(imported) if _matches(m, banned)]
    return sorted(set(out))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
            visit(v)
    return sorted(found)


def test_the_graph_sees_the_imports_the_layers_are_made_of():
    graph = import_graph()
    assert "prelort.protocol" in graph["prelort.federation"]
    assert "prelort.protocol" in graph["prelort.engines.inprocess"]
    assert "prelort.flower.records" in graph["prelort.engines.flower"]  # `from ..flower import records`
    assert "prelort.recipe" in graph["prelort.apps.clientapp"]  # an import inside a function counts
    assert "prelort.recipe" in graph["prelort.runner"]
    assert "prelort.adapters" in graph["prelort.recipe"]  # `from . import adapters`
    assert {"prelort.engines.inprocess", "prelort.apps.launch"} <= graph["prelort.runner"]  # the engine table's


def test_every_module_is_in_exactly_one_layer():
    graph = import_graph()
    unplaced = sorted(m for m in graph if not layers_of(m))
    assert not unplaced, "modules no layer names (add each to LAYERS): " + ", ".join(unplaced)
    doubled = {m: [LAYERS[i][0] for i in layers_of(m)] for m in graph if len(layers_of(m)) > 1}
    assert not doubled, f"modules in more than one layer: {doubled}"


def test_no_import_runs_back_up():
    found = upward_imports(import_graph())
    assert not found, "upward imports:\n" + "\n".join(found)


def test_no_import_breaks_a_rule():
    found = [f"{a} imports {b}: {why}" for a, b, why in violations()]
    assert not found, "forbidden imports:\n" + "\n".join(found)


def test_no_import_goes_round_in_a_circle():
    found = cycles(import_graph())
    assert not found, "import circles (modules that import each other, directly or through others):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_the_checks_catch_an_upward_import_and_a_circle():
    assert upward_imports({"prelort.engines": {"prelort.runner"}, "prelort.runner": {"prelort.engines"}}) == [
        "prelort.engines (engine table) imports prelort.runner (runner)"
    ]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    names = [n for n, _ in LAYERS]
    assert layers_of("prelort.apps.cli") == [names.index("apps")]
    assert layers_of("prelort.engines") == [names.index("engine table")]
    assert layers_of("prelort.engines.inprocess") == [names.index("engines")]
    assert layers_of("prelort.not_a_module_in_any_layer") == []


def test_the_engine_table_is_what_config_runner_and_privacy_read():
    """Every ``engine:`` value is an entry of the one table; each names code that exists, in its layer: an
    in-process engine (a class with ``execute``) among the engines, a launcher below the runner that calls it."""
    table = engines.available()
    assert list(table) == ["inprocess", "flower-sim", "flower"]
    assert Config.model_fields["engine"].json_schema_extra == {"choices": "registered engines"}
    names = [n for n, _ in LAYERS]
    for name, spec in table.items():
        assert Config.model_validate({"engine": name}).engine == name
        for ref in spec.references():
            module = ref.partition(":")[0]
            assert (SRC / Path(*module.split("."))).with_suffix(".py").is_file(), f"{name}: no module {module}"
        if spec.in_process:
            module = spec.build.partition(":")[0]
            assert layers_of(module) == [names.index("engines")], f"{name}: {module} is not an engine module"
            assert callable(getattr(spec.builder(), "execute", None)), f"{name}: {spec.build} has no execute"
        else:
            assert layers_of(spec.launch.partition(":")[0])[0] < names.index("runner")
            assert callable(spec.launcher())
    assert [n for n, s in table.items() if s.secure_aggregation] == ["flower-sim", "flower"]


def test_the_inprocess_path_never_imports_flwr():
    pytest.importorskip("flwr")  # where flwr is absent it cannot be imported anyway
    code = (
        "import sys; import prelort.runner, prelort.engines, prelort.engines.inprocess, prelort.engines.flower, "
        "prelort.protocol, prelort.recipe, prelort.apps, prelort.apps.launch; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300, env=env)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
