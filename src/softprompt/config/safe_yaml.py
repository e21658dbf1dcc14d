"""YAML that cannot hang or exhaust memory: every YAML file softprompt reads goes through `load_yaml`.

PyYAML's safe loader runs no code, but an alias bomb (a few hundred bytes of nested `&a [*b, *b, ...]`)
builds a small shared graph whose *expansion* has billions of nodes; `dataclasses.asdict`, `repr` or
`json.dumps` of it then never finish. `load_yaml` counts the expanded nodes with a budget and refuses
the document as soon as the budget is spent, so the check itself costs at most `MAX_NODES` steps.
Deep nesting is refused the same way (and PyYAML's own recursion limit becomes the same error).
"""

from __future__ import annotations

from typing import Any

import yaml

#: The most scalars, lists and mappings a document may expand to (aliases counted as many times as used).
#: A config or task file has a few hundred; a million leaves room for anything written by hand.
MAX_NODES = 1_000_000
#: The deepest nesting of lists and mappings a document may have.
MAX_DEPTH = 100


class YamlTooLarge(ValueError):
    """The document expands past `MAX_NODES` or nests deeper than `MAX_DEPTH`; the message says which."""


def check_size(data: Any, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> None:
    """Refuse a loaded document whose expansion exceeds the bounds, in at most `max_nodes` steps.

    Raises:
        YamlTooLarge: one phrase naming the bound that was passed.
    """
    count = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > max_nodes:
            raise YamlTooLarge(
                f"it expands to more than {max_nodes:,} values (YAML aliases repeated inside aliases?)"
            )
        if depth > max_depth:
            raise YamlTooLarge(f"it nests deeper than {max_depth} levels")
        if isinstance(node, dict):
            stack.extend((k, depth + 1) for k in node)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list | tuple | set):
            stack.extend((v, depth + 1) for v in node)


def load_yaml(text: str, loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> Any:
    """`yaml.load(text, loader)` (a safe loader) whose result is bounded by `check_size`.

    Raises:
        yaml.YAMLError: the text is not YAML.
        YamlTooLarge: it is, but it expands past the bounds or nests too deeply.
    """
    try:
        data = yaml.load(text, Loader=loader)
    except RecursionError:
        raise YamlTooLarge(f"it nests deeper than {MAX_DEPTH} levels") from None
    except ValueError:  # PyYAML's int(): a literal past Python's 4,300-digit limit
        raise YamlTooLarge("it holds an integer too long to read (over 4,300 digits)") from None
    check_size(data)
    return data
