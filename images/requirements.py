"""Print the requirements of the kubetune distribution for some extras, one per line.

The image builds install the dependencies in a layer of their own, before the project's source
is copied in, so that a source change rebuilds only the small layer holding kubetune itself:

    python images/requirements.py operator > /tmp/requirements.txt
    pip install -c constraints.txt -r /tmp/requirements.txt

Only the standard library is used (it runs on the bare base image). pyproject.toml stays the
one source of the requirements; constraints.txt pins their versions.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path


def requirements(pyproject: Path, extras: Sequence[str]) -> list[str]:
    """The base dependencies followed by those of each extra, as written in ``pyproject``."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise ValueError(f"unknown extras {unknown}; pyproject.toml defines {sorted(optional)}")
    found: list[str] = list(project.get("dependencies", []))
    for extra in extras:
        found += optional[extra]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``requirements.py [--pyproject FILE] EXTRA...``; prints to stdout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "extras", nargs="*", help="extras to include, e.g. operator, or runtime,eval"
    )
    parser.add_argument(
        "--pyproject", type=Path, default=Path("pyproject.toml"), help="default: ./pyproject.toml"
    )
    args = parser.parse_args(argv)
    extras = [name for arg in args.extras for name in arg.split(",") if name]
    try:
        lines = requirements(args.pyproject, extras)
    except ValueError as exc:
        parser.error(str(exc))
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
