"""Every `Example:` of the model zoo's docstrings runs (modules, classes, functions and methods)."""

import importlib
import inspect
import pkgutil
import re
import textwrap
from types import ModuleType
from typing import Any

import pytest

import refiners.foundationals

EXAMPLE = re.compile(r"Example:\n\s*```py\n(.*?)```", flags=re.DOTALL)


def _documented(module: ModuleType) -> list[tuple[str, Any]]:
    objects: list[tuple[str, Any]] = [(module.__name__, module)]
    for name, member in vars(module).items():
        if getattr(member, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(member) or inspect.isfunction(member):
            objects.append((f"{module.__name__}.{name}", member))
        if inspect.isclass(member):
            for attribute, value in vars(member).items():
                if inspect.isfunction(value) or isinstance(value, classmethod | property):
                    objects.append((f"{module.__name__}.{name}.{attribute}", value))
    return objects


def _examples() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for info in pkgutil.walk_packages(refiners.foundationals.__path__, "refiners.foundationals."):
        module = importlib.import_module(info.name)
        for name, documented in _documented(module):
            doc = inspect.getdoc(documented.__func__ if isinstance(documented, classmethod) else documented) or ""
            found += [(name, textwrap.dedent(code)) for code in EXAMPLE.findall(doc)]
    return found


EXAMPLES = _examples()


def test_there_are_examples() -> None:
    names = {name for name, _ in EXAMPLES}
    assert "refiners.foundationals.latent_diffusion.stable_diffusion_xl.unet.SDXLUNet" in names
    assert "refiners.foundationals.latent_diffusion.stable_diffusion_1.presets" in names


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_docstring_example(name: str, code: str) -> None:
    exec(compile(code, f"<{name} example>", "exec"), {"__name__": "example"})
