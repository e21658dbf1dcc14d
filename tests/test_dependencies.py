"""Every third-party import of the package is declared in pyproject.toml.

A development machine keeps what was installed by hand; a user's fresh virtualenv does not. This reads
the imports of `src/softprompt` (top-level and lazy ones inside functions), maps each to the
distribution that provides it with `importlib.metadata.packages_distributions()`, and fails on any
import that `[project] dependencies` does not declare.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "softprompt"


def _normalise(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalise(re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0])


def declared(pyproject: Path) -> tuple[set[str], dict[str, set[str]]]:
    """The distributions `[project] dependencies` names, and each optional extra's."""
    project = tomllib.loads(pyproject.read_text())["project"]
    core = {_requirement_name(r) for r in project.get("dependencies", [])}
    extras = {
        extra: {_requirement_name(r) for r in reqs}
        for extra, reqs in project.get("optional-dependencies", {}).items()
    }
    return core, extras


def third_party_imports(package: Path) -> dict[str, tuple[str, bool]]:
    """Top-level module name -> (first place it is imported, whether any import of it is at module level)."""
    found: dict[str, tuple[str, bool]] = {}
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        module_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "softprompt":
                    continue
                where = f"{path.relative_to(package.parent.parent)}:{node.lineno}"
                at_top = id(node) in module_level
                if top not in found:
                    found[top] = (where, at_top)
                elif at_top:
                    found[top] = (found[top][0], True)
    return found


@functools.cache
def _installed() -> dict[str, list[str]]:
    return packages_distributions()


def _distributions(module: str) -> set[str]:
    """The distributions providing `module`; for one not installed here, a distribution of its own name."""
    return {_normalise(d) for d in _installed().get(module, [])} or {_normalise(module)}


def undeclared(pyproject: Path, package: Path) -> list[str]:
    """One line per import that pyproject.toml does not declare (empty when all is well)."""
    core, extras = declared(pyproject)
    problems = []
    for module, (where, at_top) in sorted(third_party_imports(package).items()):
        dists = _distributions(module)
        if dists & core:
            continue
        elif not at_top and any(dists & names for extra, names in extras.items() if extra != "dev"):
            continue  # an optional integration imported lazily, declared in its own extra (e.g. wandb)
        else:
            problems.append(
                f"{module} ({where}) comes from {sorted(dists)}, which [project] dependencies lacks"
            )
    return problems


def test_every_import_is_declared():
    assert undeclared(REPO / "pyproject.toml", PACKAGE) == []


def test_the_check_catches_a_missing_declaration(tmp_path):
    """Deleting a used dependency (tyro, the CLI's parser) from pyproject.toml makes the check fail."""
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^\s*"tyro[^"]*",\s*$', text, flags=re.M), "tyro is no longer declared as expected"
    (tmp_path / "pyproject.toml").write_text(re.sub(r'^\s*"tyro[^"]*",\s*\n', "", text, flags=re.M))
    problems = undeclared(tmp_path / "pyproject.toml", PACKAGE)
    assert len(problems) == 1 and problems[0].startswith("tyro ("), problems


def test_the_check_sees_lazy_imports(tmp_path):
    package = tmp_path / "softprompt"
    package.mkdir()
    (package / "m.py").write_text("def f():\n    import tyro.conf\n    from yaml import safe_load\n")
    assert set(third_party_imports(package)) == {"tyro", "yaml"}
    assert third_party_imports(package)["tyro"][1] is False


@pytest.mark.parametrize("extra", ["dev"])
def test_the_readme_installs_what_the_tests_import(extra):
    """The README's test command installs `.[EXTRA]`: the test suite's own imports must come from it."""
    core, extras = declared(REPO / "pyproject.toml")
    available = core | extras[extra]
    missing = []
    for module, (where, _) in sorted(third_party_imports(REPO / "tests").items()):
        if any((REPO / "tests").rglob(f"{module}.py")):
            continue  # the tests' own helper modules
        if not _distributions(module) & available:
            missing.append(f"{module} ({where})")
    assert missing == []


def test_every_subpackage_is_packaged():
    """pyproject.toml lists the packages by hand (the presets map configs/ in): a layer missing there
    would be missing from a wheel while an editable install still finds it."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert len(found) > 10
    assert found - listed == set()
