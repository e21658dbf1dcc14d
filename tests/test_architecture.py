"""The package's shape, checked from its source with `ast`: no import cycles, no import against the
layer order, no reaching into another module's private names, every choice list defined once, modules
and functions of a readable size, and docs/architecture.md's import graph equal to the code's.

Modules are named by their dotted path inside `softprompt` (`inference.bank`, `tasks.metrics.squad`); a
package's `__init__.py` goes by the package's name (`tasks.metrics`), the root one by `__init__`.

After moving code between modules, regenerate the doc's edge list with
`python tests/test_architecture.py --print-edges` and paste it between the `imports:begin/end` markers.
"""

from __future__ import annotations

import ast
import sys
import typing
from enum import Enum
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "softprompt"
DOC = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- imports:begin -->", "<!-- imports:end -->"

# (user module, owner module, name): private names another module may use. Empty, and it stays so.
ALLOWED_PRIVATE: set[tuple[str, str, str]] = set()

# The rank of each top-level layer: a module imports only its own layer or layers of lower rank. Two
# layers of one rank (training, serving) are siblings and import neither each other. The root modules
# `errors` and `__init__` form the bottom layer; `cli` and `__main__` the top one.
LAYERS: dict[str, int] = {
    "errors": 0,
    "__init__": 0,
    "config": 1,
    "runtime": 2,
    "io": 3,
    "data": 4,
    "tasks": 5,
    "modeling": 6,
    "inference": 7,
    "training": 8,
    "serving": 8,
    "commands": 9,
    "cli": 10,
    "__main__": 10,
}

# Imports against the layer order today (`user -> target`), each with why it is still there; the
# helper that moves the code deletes its entry, and a stale entry fails
# `test_every_layer_allowance_is_still_needed`, so the list only shrinks.
ALLOWED_LAYER_IMPORTS: dict[str, str] = {}

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 120

# Modules over MAX_MODULE_LINES today, each with why it still is. Other helpers are splitting them; the
# integrator deletes an entry when its module is split, and an entry whose module is no longer too
# long fails `test_every_size_allowance_is_still_needed`, so the list only shrinks.
ALLOWED_LONG_MODULES: dict[str, str] = {}

# Functions over MAX_FUNCTION_LINES today (`module:qualified.name`), with why, shrinking like the above.
ALLOWED_LONG_FUNCTIONS: dict[str, str] = {}


def module_name(path: Path) -> str:
    """The dotted name of a source file inside the package (`inference/bank.py` -> `inference.bank`)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, str]:
    """Every module of the package by dotted name, its source text."""
    return {module_name(p): p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}


def modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name (`inference.bank`, `tasks.metrics`, `__main__`), parsed."""
    return {name: ast.parse(text, name) for name, text in sources().items()}


def is_package(name: str, names: set[str]) -> bool:
    """Whether `name` is a package (an `__init__.py`): the root, or a module others live under."""
    return name in ("", "__init__") or any(other.startswith(name + ".") for other in names)


def _resolve(dotted: str, names: set[str]) -> str | None:
    """The package module a dotted path inside `softprompt` names: itself, else its longest known prefix
    (`tasks.metrics.squad_scores`, a function, -> `tasks.metrics`)."""
    parts = dotted.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in names:
            return candidate
        parts.pop()
    return None


def _base(node: ast.ImportFrom, user: str, names: set[str]) -> str | None:
    """The dotted path inside `softprompt` that an `from X import ...` reads from, "" for the root."""
    module = node.module or ""
    if node.level:  # relative to the user's package
        package = user.split(".") if is_package(user, names) else user.split(".")[:-1]
        if user == "__init__":
            package = []
        package = package[: len(package) - (node.level - 1)]
        return ".".join([*package, *([module] if module else [])])
    if module == "softprompt":
        return ""
    if module.startswith("softprompt."):
        return module[len("softprompt.") :]
    return None


def _imported_module(node: ast.ImportFrom, alias: ast.alias, user: str, names: set[str]) -> str | None:
    """The package module an `from ... import alias` brings in: the submodule `alias` when there is one,
    else the module it reads `alias` from."""
    base = _base(node, user, names)
    if base is None:
        return None
    sub = f"{base}.{alias.name}" if base else alias.name
    if sub in names:
        return sub
    return _resolve(base, names) if base else "__init__"


def import_edges(tree: ast.Module, names: set[str], user: str = "") -> set[str]:
    """The package modules a module imports anywhere in its body (functions' lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("softprompt."):
                    target = _resolve(alias.name[len("softprompt.") :], names)
                    if target is not None:
                        found.add(target)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                target = _imported_module(node, alias, user, names)
                if target is not None:
                    found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (itself excluded)."""
    trees = modules()
    names = set(trees)
    return {name: import_edges(tree, names, name) - {name} for name, tree in trees.items()}


# Root modules that share a layer with another root module.
_SAME_LAYER = {"__init__": "errors", "__main__": "cli"}


def layer_of(name: str) -> str:
    """The top-level layer a module belongs to (`inference.bank` -> `inference`, `__main__` -> `cli`)."""
    top = name.split(".")[0]
    return _SAME_LAYER.get(top, top)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """`a -> b` for each import of a layer above `a`'s, or of a sibling layer of the same rank."""
    bad = []
    for user in sorted(graph):
        mine = layer_of(user)
        for target in sorted(graph[user]):
            theirs = layer_of(target)
            if theirs == mine:
                continue
            if LAYERS[theirs] > LAYERS[mine] or (LAYERS[theirs] == LAYERS[mine] and theirs != mine):
                bad.append(f"{user} -> {target}")
    return bad


def edge_lines(graph: dict[str, set[str]]) -> list[str]:
    """The graph as sorted `a -> b` lines (what docs/architecture.md lists)."""
    return [f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a])]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(user: str, tree: ast.Module, names: set[str]) -> set[tuple[str, str, str]]:
    """`(user, owner, name)` for each private name of another package module that `user` uses:
    `from softprompt.owner import _name`, and `owner._name` on an imported package module."""
    uses: set[tuple[str, str, str]] = set()
    bound: dict[str, str] = {}  # local name -> package module it is bound to
    dotted: dict[str, str] = {}  # `a.b.c` as written after `import softprompt.a.b.c` -> module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not alias.name.startswith("softprompt."):
                    continue
                target = _resolve(alias.name[len("softprompt.") :], names)
                if target is None:
                    continue
                if alias.asname:
                    bound[alias.asname] = target
                else:
                    dotted[f"softprompt.{target}"] = target
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                owner = _imported_module(node, alias, user, names)
                if owner is None:
                    continue
                base = _base(node, user, names)
                if owner == (f"{base}.{alias.name}" if base else alias.name):  # a module itself
                    bound[alias.asname or alias.name] = owner
                elif _private(alias.name) and owner != user:
                    uses.add((user, owner, alias.name))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _private(node.attr):
            continue
        written = ast.unparse(node.value)
        owner = bound.get(written) if isinstance(node.value, ast.Name) else dotted.get(written)
        if owner is not None and owner != user:
            uses.add((user, owner, node.attr))
    return uses


def all_private_uses() -> set[tuple[str, str, str]]:
    trees = modules()
    names = set(trees)
    return {use for name, tree in trees.items() for use in private_uses(name, tree, names)}


def long_functions(name: str, tree: ast.Module, limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """`module:qualified.name` -> lines, for each function (methods and nested ones too) over `limit`
    lines, counted from its `def` to its last line."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualified = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = (child.end_lineno or child.lineno) - child.lineno + 1
                    if lines > limit:
                        found[f"{name}:{qualified}"] = lines
                visit(child, qualified + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def long_modules(texts: dict[str, str], limit: int = MAX_MODULE_LINES) -> dict[str, int]:
    """Module -> lines, for each module over `limit` lines."""
    counts = {name: len(text.splitlines()) for name, text in texts.items()}
    return {name: n for name, n in counts.items() if n > limit}


def all_long_functions() -> dict[str, int]:
    return {key: n for name, tree in modules().items() for key, n in long_functions(name, tree).items()}


def documented_edges() -> list[str]:
    """The `a -> b` lines between the markers of docs/architecture.md."""
    text = DOC.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"{DOC} needs the {BEGIN} ... {END} block of import edges"
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{DOC} has one {BEGIN} ... {END} block"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    return [line.strip() for line in block.splitlines() if "->" in line]


# ---------------------------------------------------------------------------------------------- tests


def test_the_walk_names_every_module_by_its_dotted_path() -> None:
    names = set(modules())
    assert {"inference.bank", "training.loop", "cli", "__main__", "__init__", "errors"} <= names
    assert {"tasks", "tasks.metrics", "tasks.metrics.squad", "commands.flags"} <= names  # packages too
    assert {name.split(".")[0] for name in names} <= set(LAYERS), "a new layer needs its rank in LAYERS"


def test_the_graph_sees_every_kind_of_import() -> None:
    # The detector itself: lazy imports, relative imports and `from softprompt import module` count.
    names = {
        "__init__",
        "cli",
        "data",
        "data.records",
        "inference",
        "inference.bank",
        "modeling.model",
        "tasks",
        "tasks.metrics",
        "tasks.metrics.squad",
        "tasks.text.spec",
    }
    tree = ast.parse(
        "import softprompt.inference.bank\n"
        "from softprompt.modeling.model import PromptedT5\n"
        "def f():\n"
        "    from softprompt import data\n"
        "    from ..metrics import squad_scores\n"
        "    from ..metrics.squad import f1\n"
        "    from ...data.records import load\n"
        "    import softprompt.cli as c\n"
        "    from softprompt import __version__\n"
    )
    assert import_edges(tree, names, "tasks.text.spec") == {
        "inference.bank",
        "modeling.model",
        "data",
        "tasks.metrics",
        "tasks.metrics.squad",
        "data.records",
        "cli",
        "__init__",
    }
    # A package's `__init__` reads `.` as itself: `tasks`'s `.metrics.squad` is that module; a plain
    # module reads it as its package: `tasks.layouts`'s `.metrics` is `tasks.metrics`.
    assert import_edges(ast.parse("from .metrics.squad import f\n"), names, "tasks") == {
        "tasks.metrics.squad"
    }
    assert import_edges(ast.parse("from .metrics import f\n"), names, "tasks.layouts") == {"tasks.metrics"}
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert {"inference.bank", "commands.eval", "training.loop", "cli"} <= set(graph)  # found it
    assert find_cycles(graph) == []


def test_the_layer_detector() -> None:
    graph = {
        "io.checkpoint": {"errors", "config.choices", "io.rundir"},  # down and sideways: fine
        "io.rundir": {"modeling.model"},  # up
        "training.loop": {"serving.server", "inference.bank"},  # a sibling of the same rank
        "serving.server": {"inference.bank"},
        "cli": {"commands.flags", "training.loop"},
        "errors": {"__init__"},
        "__main__": {"cli"},
    }
    assert layer_violations(graph) == ["io.rundir -> modeling.model", "training.loop -> serving.server"]


def test_no_module_imports_a_higher_or_sibling_layer() -> None:
    assert set(layer_violations(import_graph())) - set(ALLOWED_LAYER_IMPORTS) == set()


def test_every_layer_allowance_is_still_needed() -> None:
    assert set(ALLOWED_LAYER_IMPORTS) - set(layer_violations(import_graph())) == set()


def test_the_private_name_detector() -> None:
    tree = ast.parse(
        "import softprompt.io.checkpoint as ckpt\n"
        "import softprompt.data.records\n"
        "from softprompt.tasks import metrics\n"
        "from softprompt.modeling.model import _importable, load_t5\n"
        "def f(x):\n"
        "    ckpt._fsync_tree(x); metrics._mean(x); softprompt.data.records._read(x); x._private; ckpt.__name__\n"
    )
    names = {"io.checkpoint", "data", "data.records", "tasks", "tasks.metrics", "modeling.model"}
    found = private_uses("user", tree, names)
    assert found == {
        ("user", "io.checkpoint", "_fsync_tree"),
        ("user", "tasks.metrics", "_mean"),
        ("user", "data.records", "_read"),
        ("user", "modeling.model", "_importable"),
    }
    # A module's own private names are its own.
    assert ("modeling.model", "modeling.model", "_importable") not in private_uses(
        "modeling.model", tree, names
    )


def test_no_module_uses_another_modules_private_names() -> None:
    uses = all_private_uses()
    assert uses - ALLOWED_PRIVATE == set(), "use a public name, or make the helper public in its owner"
    # An allow-list entry that is no longer needed must go, so the list only shrinks.
    assert ALLOWED_PRIVATE - uses == set()


def test_the_size_detectors() -> None:
    source = "def short():\n    return 1\n\nclass C:\n    def long(self):\n" + "        x = 1\n" * 5 + "\n"
    source += "def outer():\n    def inner():\n" + "        y = 2\n" * 5 + "    return inner\n"
    tree = ast.parse(source)
    assert long_functions("m", tree, limit=5) == {"m:C.long": 6, "m:outer": 8, "m:outer.inner": 6}
    assert long_functions("m", tree, limit=8) == {}
    assert long_modules({"a": "x\n" * 3, "b": "x\n" * 4}, limit=3) == {"b": 4}


def test_no_module_is_too_long() -> None:
    too_long = long_modules(sources())
    assert set(too_long) - set(ALLOWED_LONG_MODULES) == set(), (
        f"split these below {MAX_MODULE_LINES} lines: {too_long}"
    )


def test_no_function_is_too_long() -> None:
    too_long = all_long_functions()
    assert set(too_long) - set(ALLOWED_LONG_FUNCTIONS) == set(), (
        f"split these below {MAX_FUNCTION_LINES} lines: {too_long}"
    )


def test_every_size_allowance_is_still_needed() -> None:
    # An entry whose module or function is now short enough must go, so the allow-lists only shrink.
    assert set(ALLOWED_LONG_MODULES) - set(long_modules(sources())) == set()
    assert set(ALLOWED_LONG_FUNCTIONS) - set(all_long_functions()) == set()


def test_only_the_bank_and_the_trainer_build_a_prompted_model() -> None:
    # One owner for "a frozen model with a prompt": inference wraps the model once, in
    # bank.load_model_and_prompts, and drives every prompt through per-row prompts, so no second
    # PromptedT5 around the same frozen T5 can lose its frozen-weight state (frozen_dtype, fast_path).
    builders = {
        name
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "PromptedT5"
    }
    assert builders == {"inference.bank", "training.setup"}


def _literal_values(annotation: object) -> tuple[str, ...]:
    """The strings of the `Literal` inside an annotation (`Literal[...]`, `X | None`, `list[X]`)."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        found = _literal_values(arg)
        if found:
            return found
    return ()


def test_each_choice_list_is_defined_once_and_the_parser_offers_it() -> None:
    from softprompt.commands.flags import EvalArgs, PredictArgs, ServeArgs
    from softprompt.config import choices
    from softprompt.training.config import TrainConfig

    expected = {
        (TrainConfig, "prompt_init"): choices.PromptInit,
        (TrainConfig, "optimizer"): choices.Optimizer,
        (TrainConfig, "report_to"): choices.ReportTo,
        (TrainConfig, "punctuation"): choices.Punctuation,
        (TrainConfig, "precision"): choices.Precision,
        (TrainConfig, "attn_implementation"): choices.Attention,
        (EvalArgs, "punctuation"): choices.Punctuation,
        (EvalArgs, "precision"): choices.Precision,
        (EvalArgs, "ensemble"): choices.Ensemble,
        (PredictArgs, "punctuation"): choices.Punctuation,
        (PredictArgs, "precision"): choices.Precision,
        (ServeArgs, "precision"): choices.Precision,
        (ServeArgs, "log_level"): choices.LogLevel,
    }
    for (cls, field), enum in expected.items():
        hints = typing.get_type_hints(cls, include_extras=True)
        assert _literal_values(hints[field]) == choices.values(enum), f"{cls.__name__}.{field}"
    # Defined once: no other module declares a str Enum of choices, or an Enum named like one of them.
    enums = {
        name for name, value in vars(choices).items() if isinstance(value, type) and issubclass(value, Enum)
    }
    assert {"PromptInit", "Optimizer", "ReportTo", "Punctuation", "Precision"} <= enums
    for name, tree in modules().items():
        if name == "config.choices":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                assert node.name not in enums, (
                    f"{name} defines its own {node.name}; use softprompt.config.choices"
                )
                bases = {ast.unparse(b) for b in node.bases}
                assert not ({"str", "Enum"} <= bases), f"{name} defines the choice list {node.name}"


def test_architecture_doc_lists_the_import_graph() -> None:
    documented = documented_edges()
    actual = edge_lines(import_graph())
    missing, stale = sorted(set(actual) - set(documented)), sorted(set(documented) - set(actual))
    assert (missing, stale) == ([], []), (
        "docs/architecture.md's import edges differ from the code; regenerate them with "
        "`python tests/test_architecture.py --print-edges`"
    )
    assert len(documented) == len(set(documented))
    # The block is one fenced code block: one opening fence after BEGIN, one closing fence before END.
    text = DOC.read_text(encoding="utf-8")
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert [line.strip() for line in block.splitlines() if line.strip().startswith("```")] == [
        "```text",
        "```",
    ]
    # Every module has its paragraph in the module map.
    for name in modules():
        assert f"`{name}`" in text or f"`{name}.py`" in text, f"docs/architecture.md does not describe {name}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--print-edges"]:
        print("\n".join([BEGIN, "```text", *edge_lines(import_graph()), "```", END]))
    elif sys.argv[1:] == ["--private"]:
        print("\n".join(str(u) for u in sorted(all_private_uses())))
    else:
        sys.exit("usage: python tests/test_architecture.py --print-edges | --private")
