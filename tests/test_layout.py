"""The package's layout: the library (layers, kernels, interop, streaming, long sequences, models,
serialization...) never imports its applications (lstm.train, lstm.explain, lstm.commands, the
CLI), and nothing outside lstm.kernels reaches a kernel module except through lstm.kernels'
public names."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import lstm
import lstm.kernels

PACKAGE = pathlib.Path(lstm.__file__).parent
APPLICATIONS = ("lstm.train", "lstm.explain", "lstm.commands", "lstm.cli")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_application(module: str) -> bool:
    return any(module == app or module.startswith(app + ".") for app in APPLICATIONS)


SOURCES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
LIBRARY = sorted(name for name in SOURCES if not _is_application(name))


def _imports(module: str):
    """(line, imported module, imported name or None) of every import in the module's file,
    function-level ones included, relative ones resolved."""
    path = SOURCES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                yield node.lineno, base, alias.name


def test_the_library_imports_no_application_module():
    found = [f"{module}:{line} imports {target}{'.' + name if name else ''}"
             for module in LIBRARY for line, target, name in _imports(module)
             if _is_application(target) or (name and _is_application(f"{target}.{name}"))]
    assert not found, found


def test_importing_the_library_loads_no_application_module():
    # a fresh process: this one has imported whatever other tests imported
    code = (f"import importlib, json, sys\nfor name in {LIBRARY!r}:\n    importlib.import_module(name)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.startswith('lstm'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(LIBRARY) <= set(loaded)
    assert not [m for m in loaded if _is_application(m)]


def test_kernel_modules_are_reached_only_through_the_public_names():
    public = set(lstm.kernels.__all__)
    found = []
    for module, path in SOURCES.items():
        if module == "lstm.kernels" or module.startswith("lstm.kernels."):
            continue
        for line, target, name in _imports(module):
            if target.startswith("lstm.kernels.") or (target == "lstm.kernels" and name not in public):
                found.append(f"{module}:{line} imports {target}{'.' + name if name else ''}")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "kernels"
                    and node.attr not in public):
                found.append(f"{module}:{node.lineno} uses kernels.{node.attr}")
    assert not found, found
