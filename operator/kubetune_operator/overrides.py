"""``--set FIELD.PATH=VALUE`` overrides of a manifest, as ``helm --set`` does (pure)."""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any

import yaml

_SEGMENT = re.compile(r"^([^.\[\]]+)((?:\[\d+\])*)$")


class OverrideError(ValueError):
    """An override is not ``path=value`` or its path does not fit the manifest."""


def _segments(path: str) -> list[str | int]:
    out: list[str | int] = []
    for part in path.split("."):
        match = _SEGMENT.match(part)
        if not match:
            raise OverrideError(f"{path}: invalid path segment {part!r}")
        out.append(match.group(1))
        out += [int(i) for i in re.findall(r"\[(\d+)\]", match.group(2))]
    return out


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``doc`` with each ``a.b[0].c=value`` applied; values are parsed as YAML.

    ``spec.training.maxSteps=20`` sets an integer, ``spec.output.merge=true`` a boolean,
    ``spec.training.learningRate='1e-4'`` (quoted) a string; ``key=null`` removes the field.
    Missing maps are created; list indexes must exist.

    Raises:
        OverrideError: malformed override or a path through a non-container value.
    """
    result = copy.deepcopy(doc)
    for override in overrides:
        path, sep, raw = override.partition("=")
        if not sep or not path:
            raise OverrideError(f"{override!r}: expected FIELD.PATH=VALUE")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise OverrideError(f"{path}: invalid value {raw!r}: {exc}") from None
        segments = _segments(path)
        node: Any = result
        for here, nxt in itertools.pairwise(segments):
            if isinstance(here, int):
                if not isinstance(node, list) or here >= len(node):
                    raise OverrideError(f"{path}: index {here} does not exist")
                node = node[here]
                continue
            if not isinstance(node, dict):
                raise OverrideError(f"{path}: {here!r} is inside a non-mapping value")
            if value is None and here not in node:
                break  # removing a field under a missing parent: nothing to do
            node = node.setdefault(here, [] if isinstance(nxt, int) else {})
        else:
            _assign(node, segments[-1], value, path)

    return result


def _assign(node: Any, last: str | int, value: Any, path: str) -> None:
    """Set (or, for None, remove) ``last`` in ``node``."""
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise OverrideError(f"{path}: index {last} does not exist")
        node[last] = value
    elif not isinstance(node, dict):
        raise OverrideError(f"{path}: {last!r} is inside a non-mapping value")
    elif value is None:
        node.pop(last, None)
    else:
        node[last] = value
