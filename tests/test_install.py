"""What `pip install .` gives a user (issue 19): every import declared, ranges that keep an existing torch, the exact
versions of the development setup in constraints.txt, the config files packaged, and the optional parts (submitit)
failing in one line that says what to install."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from pipeline import cli
from pipeline.config import PROJECT_ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PACKAGES = ("pipeline", "data", "modules", "conf")  # this project's own top-level modules
CODE = [p for package in ("pipeline", "data", "modules") for p in sorted((PROJECT_ROOT / package).rglob("*.py"))]


def _requirements(names: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, names) if canonicalize_name(r.name) != "aiayn"}


DISTRIBUTIONS = metadata.packages_distributions()  # top-level module -> the distributions providing it
DEFAULT = _requirements(PROJECT["dependencies"])
EXTRAS = {extra: _requirements(names) for extra, names in PROJECT["optional-dependencies"].items()}


def _imports(path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level) of every import in a file (TYPE_CHECKING blocks left out)."""
    tree = ast.parse(path.read_text())
    type_checking = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        top = node.col_offset == 0
        found += [(name.split(".")[0], top) for name in names]
    return found


def _distribution(module: str) -> str | None:
    """The installed distribution providing a top-level module; None for the standard library and this project."""
    if module in sys.stdlib_module_names or module in PACKAGES or module == "__future__":
        return None
    (dist, *_) = DISTRIBUTIONS[module]
    return canonicalize_name(dist)


def test_every_third_party_import_is_declared_and_default_ones_by_default() -> None:
    """Each module pipeline/, data/ and modules/ import is a declared dependency; one imported at module level (so
    by every command that loads the file) is a default dependency, not an extra's."""
    undeclared, only_in_an_extra = set(), set()
    for path in CODE:
        for module, top in _imports(path):
            dist = _distribution(module)
            if dist is None:
                continue
            if dist not in DEFAULT and not any(dist in extra for extra in EXTRAS.values()):
                undeclared.add(f"{dist} ({path.relative_to(PROJECT_ROOT)})")
            if top and dist not in DEFAULT:
                only_in_an_extra.add(f"{dist} ({path.relative_to(PROJECT_ROOT)})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {sorted(undeclared)}"
    assert not only_in_an_extra, f"imported at module level but only in an extra: {sorted(only_in_an_extra)}"


def test_declared_dependencies_are_used() -> None:
    """No dependency declared for nothing (rich was, once): each default one is imported somewhere, or needed by
    what the code asks of another library (the names below)."""
    imported = {_distribution(m) for path in CODE for m, _ in _imports(path)} - {None}
    needed_indirectly = {"wandb"}  # Lightning's WandbLogger (pipeline/loggers.py) imports it
    assert set(DEFAULT) - imported - needed_indirectly == set()


@pytest.mark.parametrize("torch", ["2.6.0", "2.11.0", "2.11.0+cu128", "2.13.0+cpu"])
def test_torch_is_a_range_that_keeps_an_installed_build(torch: str) -> None:
    """`pip install .` into an environment with its own torch (a cluster's CUDA build, the GPU image's 2.11) keeps
    it: the requirement admits it, so pip does not replace it."""
    assert DEFAULT["torch"].specifier.contains(Version(torch))


def test_no_exact_pins_in_pyproject_and_every_one_in_constraints() -> None:
    """Ranges in pyproject.toml; constraints.txt (make setup's `pip -c`) pins every declared package exactly, and
    its pins satisfy the ranges."""
    pins = dict(
        line.split("==")
        for line in (PROJECT_ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name, req in [*DEFAULT.items(), *(item for extra in EXTRAS.values() for item in extra.items())]:
        assert not any(spec.operator in ("==", "===") for spec in req.specifier), f"{req} is pinned in pyproject"
        assert name in pins, f"{name} has no exact version in constraints.txt"
        assert req.specifier.contains(Version(pins[name])), f"constraints.txt's {name}=={pins[name]} is not {req}"


def test_config_files_are_packaged() -> None:
    """A wheel carries conf/ and its groups beside the code (pipeline/config.py reads <install>/conf), YAML files
    included. (Checked on the configuration; a built wheel was checked by hand: 20 conf/*.yaml files.)"""
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    assert {"conf", "conf.*"} <= set(find["include"]) and find.get("namespaces", True)  # folders without __init__
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["*"] == ["*.yaml"]
    assert not [p for p in (PROJECT_ROOT / "conf").rglob("*") if p.is_file() and p.suffix != ".yaml"]


def test_submit_without_submitit_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys) -> None:
    for module in ("submitit", "submitit.slurm", "submitit.slurm.slurm"):
        monkeypatch.setitem(sys.modules, module, None)  # `import submitit` raises ImportError
    for args in (["submit", "--dry-run"], ["submit"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main([*args, "cluster=slurm", f"paths.output_dir={tmp_path}"])
        assert exit_.value.code == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert re.fullmatch(r"aiayn submit: .*submitit.* not installed: pip install 'aiayn\[dist\]'", line)
