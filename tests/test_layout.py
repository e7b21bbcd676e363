"""The package's layering, read from its source with ``ast``: every import, at module level or inside a function,
is an edge; the graph must have no cycle, the ground floor must import nothing above it, and nothing inside the
package may import the package facade (``pneumotriage/__init__.py``) or the command line."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pneumotriage"
#: Modules every layer may use; they import only each other.
GROUND = {
    "pneumotriage.version",
    "pneumotriage.errors",
    "pneumotriage.io",
    "pneumotriage.runtime",
    "pneumotriage.outlayout",
}
#: The top: the facade and the command line, which nothing in the package imports (``__main__`` runs the CLI).
TOP = {"pneumotriage", "pneumotriage.cli"}
#: The layers, lowest first, as README's "How the code is laid out" lists them; a name ending in "." stands for
#: a package and all its modules. A module may import from its own layer and those before it.
LAYERS = [
    ["version", "errors", "io", "runtime", "outlayout", "distributed", "normalisations", "native"],
    ["dicom.", "rle", "inputcheck"],
    ["labels", "metrics"],
    ["folds"],
    ["losses", "postprocess"],
    ["plots"],
    ["datasets", "synth.", "pipelines"],
    ["weights."],
    ["models."],
    ["scan."],
    ["train.", "tune.", "evaluate.", "imports.", "deploy"],
    ["submit", "demo", "listen."],
    ["cli."],
    ["", "__main__"],
]


def layer_of(module: str) -> int:
    name = module.removeprefix("pneumotriage").removeprefix(".")
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if name == entry or (entry.endswith(".") and (name == entry[:-1] or name.startswith(entry))):
                return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to README's layout")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from a.b import c`` counts ``a.b.c`` where that is a
    module, else ``a.b``). A module inside a package imports its package's ``__init__`` only when it names it."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in modules else base)
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    # The walk sees imports at module level, inside functions and relative ones.
    assert {"pneumotriage.models", "pneumotriage.scan.engine"} <= graph["pneumotriage.scan.torchrun"]
    assert "pneumotriage.models.spec" in graph["pneumotriage.models.ensemble"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_ground_floor_imports_nothing_above_it() -> None:
    graph = import_graph()
    assert GROUND <= set(graph)
    upward = {m: sorted(graph[m] - GROUND) for m in GROUND if graph[m] - GROUND}
    assert not upward, upward


def test_nothing_in_the_package_imports_the_facade_or_the_cli() -> None:
    graph = import_graph()
    offenders = {
        m: sorted(graph[m] & TOP) for m in graph if m not in TOP | {"pneumotriage.__main__"} and graph[m] & TOP
    }
    assert not offenders, offenders


def test_every_import_points_down_the_layers() -> None:
    graph = import_graph()
    upward = {m: sorted(i for i in imported if layer_of(i) > layer_of(m)) for m, imported in graph.items()}
    upward = {m: found for m, found in upward.items() if found}
    assert not upward, upward


def test_the_layers_are_those_the_readme_lists() -> None:
    """Every top-level module and package of the layer list has its line in README's layout section."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## How the code is laid out") :].split("\n## ")[0]
    for layer in LAYERS:
        for entry in layer:
            if entry and entry != "__main__":
                assert (entry[:-1] + "/" if entry.endswith(".") else entry + ".py") in layout, entry


def test_the_scan_is_used_through_its_public_surface() -> None:
    """Outside ``pneumotriage/scan/`` (the package and the benchmarks), the scan is imported from
    ``pneumotriage.scan`` alone, and only names its ``__all__`` lists: its modules' own names stay free to change."""
    import pneumotriage.scan

    public = set(pneumotriage.scan.__all__)
    assert all(hasattr(pneumotriage.scan, name) for name in public)
    wrong = []
    for root in (PACKAGE, PACKAGE.parent / "benchmarks"):
        for path in root.rglob("*.py"):
            if PACKAGE / "scan" in path.parents:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pneumotriage.scan"):
                    if node.module != "pneumotriage.scan":
                        wrong.append(f"{path.name}:{node.lineno} imports from {node.module}")
                    wrong += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names if a.name not in public]
                elif isinstance(node, ast.Import):
                    wrong += [
                        f"{path.name}:{node.lineno} imports {a.name}"
                        for a in node.names
                        if a.name.startswith("pneumotriage.scan.")
                    ]
    assert not wrong, "the scan's own modules used from outside (name it in scan/__init__.py): " + "; ".join(wrong)


#: Modules allowed over :data:`MAX_LINES`, each with the reason (about its content) it is one module.
LONG_MODULES: dict[str, str] = {}
MAX_LINES = 500


def test_no_module_is_over_500_lines_without_a_reason() -> None:
    """A module a newcomer can hold: over 500 lines it is split where it has several jobs, or named in
    :data:`LONG_MODULES` with why it is one."""
    long = {
        name: count
        for name, path in _modules().items()
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES and name not in LONG_MODULES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_threshold_names_have_one_definition() -> None:
    """The thresholds are ``Thresholds.ALL``: the scan's decisions, their checks, the checkpoints' defaults, the scan
    command's options and tune's grid all follow it."""
    import inspect
    from dataclasses import fields

    from pneumotriage.cli.scan import scan
    from pneumotriage.models.spec import DEFAULT_THRESHOLDS
    from pneumotriage.postprocess import Thresholds
    from pneumotriage.scan import Decisions
    from pneumotriage.scan.options import _THRESHOLD_CHECKS
    from pneumotriage.tune import Grid

    names = set(Thresholds.ALL)
    assert names <= {f.name for f in fields(Decisions)}
    assert set(_THRESHOLD_CHECKS) == names
    assert set(DEFAULT_THRESHOLDS["classifier"]) | set(DEFAULT_THRESHOLDS["segmenter"]) <= names
    assert names <= set(inspect.signature(scan).parameters)
    assert set(Thresholds.NAMES) == {f.name for f in fields(Grid)}


def test_the_train_commands_options_are_the_training_configs_fields() -> None:
    """`train classifier|segmenter` hand every option (``dict(locals())``) to :class:`TrainConfig` by name: an
    option that is not one of its fields, or a helper variable added above that line, would fail at run time."""
    import inspect
    from dataclasses import fields

    from pneumotriage.cli.train import train_classifier, train_segmenter
    from pneumotriage.train import TrainConfig

    config = {f.name for f in fields(TrainConfig)}
    for command in (train_classifier, train_segmenter):
        options = set(inspect.signature(command).parameters) - {"resume", "progress"}
        assert options <= config, f"{command.__name__}: {sorted(options - config)} are not TrainConfig fields"


def test_progress_event_kinds_have_one_list_and_every_listener_follows_it() -> None:
    """Every progress event is made by ``progress_event`` from :data:`EVENT_KINDS`; an unknown kind is refused, and
    the training display has a handler for each kind training emits as it goes (SWA's figures are in the closing
    summary)."""
    import pytest

    from pneumotriage.cli.train import _TrainingProgress
    from pneumotriage.runtime import EVENT_KINDS, progress_event

    assert progress_event("batch", done=1) == {"event": "batch", "done": 1}
    with pytest.raises(ValueError, match="not a progress event kind"):
        progress_event("epoch-start")  # type: ignore[arg-type]
    made = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert '"event": "' not in text.replace('{"event": kind', ""), f"{path} makes an event by hand"
        made |= {node.args[0].value for node in ast.walk(ast.parse(text)) if _is_event_call(node)}
    assert made == set(EVENT_KINDS)
    training = {"weights", "data", "epoch_start", "batch", "epoch_end"}
    assert all(callable(getattr(_TrainingProgress, "_" + kind, None)) for kind in training)


def _is_event_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "progress_event"
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
    )
