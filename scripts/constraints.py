"""Write constraints.txt: the exact versions of aiayn[dev] and everything it pulls in, as this environment holds them.

    .venv/bin/python scripts/constraints.py      (or `make constraints`)

Run it (Python 3.11+: tomllib) in a venv `make setup` built after a dependency of pyproject.toml changed; torch is
written without its build label (torch==2.13.0 matches 2.13.0+cpu and 2.13.0+cu128 alike).
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def closure(requirements: list[Requirement]) -> dict[str, str]:
    """{distribution name: installed version} of the requirements and, recursively, of theirs (markers evaluated)."""
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    stack = [(r, {""}) for r in requirements]
    while stack:
        req, extras = stack.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{req.name} is not installed here: run `make setup` first")
        pins[key[0]] = dist.version.split("+")[0]
        stack += [(Requirement(r), {"", *req.extras}) for r in dist.requires or []]
    return pins


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra if not r.startswith("aiayn")
    ]
    pins = closure([Requirement(r) for r in declared])
    path = ROOT / "constraints.txt"
    header = [line for line in path.read_text().splitlines() if line.startswith("#")] if path.exists() else []
    path.write_text("\n".join([*header, *(f"{name}=={version}" for name, version in sorted(pins.items()))]) + "\n")
    print(f"{path}: {len(pins)} pins")


if __name__ == "__main__":
    main()
