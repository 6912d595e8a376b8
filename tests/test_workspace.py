"""The shape of the workspace: one version, one namespace, dependencies that point one way, fluxion usable alone."""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ROOT / "packages"
MEMBERS = ("fluxion", "foundationals", "adapters", "training", "converters")

# Which siblings each member may import: fluxion <- foundationals <- adapters <- training; converters beside them.
ALLOWED_SIBLINGS: dict[str, set[str]] = {
    "fluxion": set(),
    "foundationals": {"fluxion"},
    "adapters": {"fluxion", "foundationals"},
    "training": {"fluxion", "foundationals", "adapters"},
    "converters": {"fluxion", "foundationals", "adapters"},
}
# The references our tests compare with: never a runtime dependency (converters may import them lazily, for their
# optional check against the reference).
REFERENCE_LIBRARIES = {
    "diffusers",
    "transformers",
    "peft",
    "segment_anything",
    "segment_anything_hq",
    "torchvision",
    "timm",
}
# numpy only because safetensors needs it to save tensors (`safetensors.torch.save_file` imports it).
FLUXION_REQUIREMENTS = {"torch", "safetensors", "numpy"}


def _pyproject(member: str) -> dict[str, Any]:
    return tomllib.loads((PACKAGES / member / "pyproject.toml").read_text())


def _requirements(project: dict[str, Any]) -> list[Requirement]:
    """Every requirement of a `[project]` table, optional ones included."""
    lines: list[str] = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        lines.extend(extra)
    return [Requirement(line) for line in lines]


def _member_of(distribution: str) -> str | None:
    name = distribution.lower().replace("_", "-")
    return name.removeprefix("refiners-") if name.startswith("refiners-") else None


def _sources(member: str) -> list[Path]:
    return sorted((PACKAGES / member / "src").rglob("*.py"))


def _version() -> str:
    return _pyproject("fluxion")["project"]["version"]


def test_members_are_the_five_packages() -> None:
    found = {path.parent.name for path in PACKAGES.glob("*/pyproject.toml")}
    assert found == set(MEMBERS)
    for member in MEMBERS:
        assert _pyproject(member)["project"]["name"] == f"refiners-{member}"


def test_one_version_and_exact_sibling_pins() -> None:
    versions = {member: _pyproject(member)["project"]["version"] for member in MEMBERS}
    assert len(set(versions.values())) == 1, f"the five members must share one version, got {versions}"
    version = _version()
    for member in MEMBERS:
        for requirement in _requirements(_pyproject(member)["project"]):
            if _member_of(requirement.name) is not None:
                assert str(requirement.specifier) == f"=={version}", (
                    f"refiners-{member} must pin {requirement.name} exactly (=={version}), got {requirement}"
                )


def test_lock_file_agrees() -> None:
    # `uv sync --locked` (CI) fails on any stale lock; this names the version and edge that drifted.
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked = {package["name"]: package for package in lock["package"]}
    version = _version()
    for member in MEMBERS:
        package = locked[f"refiners-{member}"]
        assert package["version"] == version
        assert package["source"] == {"editable": f"packages/{member}"}
        project = _pyproject(member)["project"]
        declared = {Requirement(line).name for line in project.get("dependencies", [])}
        assert {dependency["name"] for dependency in package.get("dependencies", [])} == declared
        for extra, lines in project.get("optional-dependencies", {}).items():
            locked_extra = package.get("optional-dependencies", {}).get(extra, [])
            assert {dependency["name"] for dependency in locked_extra} == {Requirement(line).name for line in lines}


def test_fluxion_depends_only_on_torch_safetensors_and_numpy() -> None:
    project = _pyproject("fluxion")["project"]
    assert {Requirement(line).name for line in project["dependencies"]} == FLUXION_REQUIREMENTS


def test_one_namespace_without_init() -> None:
    # PEP 420: a `refiners/__init__.py` in one distribution would hide the four others.
    strays = [path for path in ROOT.rglob("refiners/__init__.py") if ".venv" not in path.parts]
    assert strays == []
    for member in MEMBERS:
        backend = _pyproject(member)["tool"]["uv"]["build-backend"]
        assert backend["module-name"] == f"refiners.{member}"
        assert (PACKAGES / member / "src" / "refiners" / member / "__init__.py").is_file()
    import refiners

    assert getattr(refiners, "__file__", None) is None, "refiners must be a namespace package"
    assert {Path(path) for path in refiners.__path__} == {PACKAGES / m / "src" / "refiners" for m in MEMBERS}


def _imports(tree: ast.Module) -> Iterator[tuple[str, bool]]:
    """Every absolute import of a module, with whether it runs at import time (not in a function, not typing-only)."""

    def visit(node: ast.AST, eager: bool) -> Iterator[tuple[str, bool]]:
        if isinstance(node, ast.Import):
            yield from ((alias.name, eager) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module is not None:
                yield node.module, eager
                # `from refiners import foundationals` imports refiners.foundationals.
                yield from ((f"{node.module}.{alias.name}", eager) for alias in node.names)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for statement in node.body:
                yield from visit(statement, False)
            for statement in node.orelse:
                yield from visit(statement, eager)
        else:
            lazy = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            for child in ast.iter_child_nodes(node):
                yield from visit(child, eager and not lazy)

    yield from visit(tree, True)


def _member_imports(member: str) -> Iterator[tuple[Path, str, bool]]:
    for path in _sources(member):
        for name, eager in _imports(ast.parse(path.read_text(), str(path))):
            yield path.relative_to(ROOT), name, eager


def _declared_siblings(member: str) -> set[str]:
    """The siblings a member depends on, directly or through another sibling."""
    found: set[str] = set()
    pending = [member]
    while pending:
        for requirement in _requirements(_pyproject(pending.pop())["project"]):
            sibling = _member_of(requirement.name)
            if sibling is not None and sibling not in found:
                found.add(sibling)
                pending.append(sibling)
    found.discard(member)
    return found


def _sibling_of(module: str) -> str | None:
    """The member that provides `module` (`refiners.fluxion.layers` -> `fluxion`), or None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "refiners" and len(parts) > 1 and parts[1] in MEMBERS else None


@pytest.mark.parametrize("member", MEMBERS)
def test_dependencies_point_one_way(member: str) -> None:
    assert _declared_siblings(member) <= ALLOWED_SIBLINGS[member], f"refiners-{member} declares a forbidden sibling"
    allowed = ALLOWED_SIBLINGS[member] & _declared_siblings(member)
    wrong = [
        f"{path}: imports {name}"
        for path, name, _ in _member_imports(member)
        if (sibling := _sibling_of(name)) not in (None, member) and sibling not in allowed
    ]
    assert wrong == [], f"refiners-{member} may import only {sorted(ALLOWED_SIBLINGS[member])}"


@pytest.mark.parametrize("member", MEMBERS)
def test_no_reference_library_at_runtime(member: str) -> None:
    wrong = [
        f"{path}: imports {name}" + ("" if eager else " (even lazily)")
        for path, name, eager in _member_imports(member)
        if name.split(".")[0] in REFERENCE_LIBRARIES and (eager or member != "converters")
    ]
    assert wrong == [], f"{sorted(REFERENCE_LIBRARIES)} are test references: only converters may import them, lazily"


def test_fluxion_imports_only_torch_and_safetensors_eagerly() -> None:
    # Optional extras (Pillow for the image helpers) must be imported where they are used, not at import time.
    allowed = FLUXION_REQUIREMENTS | set(sys.stdlib_module_names) | {"refiners"}
    wrong = [f"{path}: imports {name}" for path, name, eager in _member_imports("fluxion") if eager]
    wrong = [line for line in wrong if line.split(" imports ")[1].split(".")[0] not in allowed]
    assert wrong == []


FLUXION_ALONE_SCRIPT = """
import importlib.util
from pathlib import Path

import torch

import refiners.fluxion
import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.lora import SingleLoraAdapter
from refiners.fluxion.context import Contexts

# The wheel, not the workspace sources.
assert Path(refiners.fluxion.__file__).is_relative_to(Path(__import__("sys").prefix)), refiners.fluxion.__file__
for sibling in ("foundationals", "adapters", "training", "converters"):
    assert importlib.util.find_spec(f"refiners.{sibling}") is None, sibling

model = fl.Chain(fl.Linear(8, 16), fl.ReLU(), fl.Chain(fl.Linear(16, 4)))
x = torch.randn(2, 8)
before = model(x)
linear = model.layer("Chain.Linear", fl.Linear)
adapter = SingleLoraAdapter(target=linear, rank=2).inject()
assert adapter.parent is model.layer("Chain", fl.Chain)
model(x)
adapter.eject()
assert model.layer("Chain.Linear", fl.Linear) is linear
torch.testing.assert_close(model(x), before, atol=0, rtol=0)

class MyProvider(fl.Chain):
    def init_context(self) -> Contexts:
        return {"my context": {"my key": None}}

provider = MyProvider(
    fl.Chain(fl.Sum(fl.UseContext("my context", "my key"), fl.Lambda(lambda: 2)), fl.SetContext("my context", "my key")),
    fl.Chain(fl.UseContext("my context", "my key")),
)
provider.set_context("my context", {"my key": 4})
assert provider() == 6
print("fluxion alone: ok")
"""


def _run(command: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    if command[0] == "uv":
        # `uv run` tells its children which uv it is; otherwise take the one on PATH.
        uv = os.environ.get("UV") or shutil.which("uv")
        assert uv is not None, "uv is needed to build and install the wheel: `python3 -m pip install uv`"
        command = [uv, *command[1:]]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def _checked(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{' '.join(result.args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_fluxion_alone(tmp_path: Path) -> None:
    """The refiners-fluxion wheel, in a fresh venv with only its declared dependencies, works on its own."""
    # No trace of the workspace's environment: the venv must stand alone.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    _checked(_run(["uv", "build", "--package", "refiners-fluxion", "--wheel", "-o", str(tmp_path / "dist")], env))
    (wheel,) = (tmp_path / "dist").glob("refiners_fluxion-*.whl")

    # fluxion's dependencies as the lock pins them, into a new venv. torch is several GB: uv links it from its cache
    # (filled by `uv sync`), and goes online only if the cache lacks it.
    venv = tmp_path / "venv"
    sync = ["uv", "sync", "--frozen", "--package", "refiners-fluxion", "--no-dev", "--no-install-workspace"]
    sync += ["--python", sys.executable]
    venv_env = env | {"UV_PROJECT_ENVIRONMENT": str(venv)}
    if _run([*sync, "--offline"], venv_env).returncode != 0:
        _checked(_run(sync, venv_env))
    python = venv / "bin" / "python"
    _checked(_run(["uv", "pip", "install", "--python", str(python), "--offline", "--no-deps", str(wheel)], env))
    # The wheel's own metadata (its Requires-Dist) is satisfied by what is installed: nothing more was needed.
    _checked(_run(["uv", "pip", "check", "--python", str(python)], env))
    listed = _checked(_run(["uv", "pip", "list", "--python", str(python), "--format", "json"], env))
    installed = {package["name"] for package in json.loads(listed.stdout)}
    assert {name for name in installed if name.startswith("refiners")} == {"refiners-fluxion"}
    assert installed.isdisjoint({"pillow", *REFERENCE_LIBRARIES})

    script = tmp_path / "fluxion_alone.py"
    script.write_text(textwrap.dedent(FLUXION_ALONE_SCRIPT))
    # -I: no current directory or user site on sys.path, no PYTHON* variables.
    result = _checked(_run([str(python), "-I", str(script)], env, cwd=tmp_path))
    assert result.stdout.strip() == "fluxion alone: ok"
