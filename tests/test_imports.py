"""The package's import graph, read with ``ast`` from every module (imports inside functions
included): no module imports an entry point (``epsdist/train.py``, ``infer.py``,
``segment.py``, ``evaluate.py``, ``demo.py``: they share code through library modules only),
and no module takes a private name (``_x``) from another package."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("epsdist", "epsdist_kernels")
ENTRY_POINTS = {f"epsdist.{m}" for m in ("train", "infer", "segment", "evaluate", "demo")}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py of the packages under ``root``."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def package_of(module: str, known: dict[str, Path]) -> str:
    """The package a module lives in (a package's ``__init__`` is in that package)."""
    if known.get(module, Path()).name == "__init__.py":
        return module
    return module.rpartition(".")[0]


def imports(module: str, path: Path, known: dict[str, Path]):
    """(line, imported module, name or None) for every import of ``module``; ``name`` is the
    attribute taken from the module: ``from m import name`` or ``import m as a`` ... ``a.name``."""
    tree = ast.parse(path.read_text(), str(path))
    here = module if path.name == "__init__.py" else module.rpartition(".")[0]
    aliases = {}                                   # local name -> module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None
                aliases[a.asname or a.name.partition(".")[0]] = a.name if a.asname else \
                    a.name.partition(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:                   # ``from pkg import module``
                    yield node.lineno, sub, None
                    aliases[a.asname or a.name] = sub
                else:
                    yield node.lineno, base, a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases):
            yield node.lineno, aliases[node.value.id], node.attr


def violations(root: Path = ROOT) -> list[str]:
    known = modules(root)
    found = []
    for module, path in known.items():
        where = path.relative_to(root).as_posix()
        for line, target, name in imports(module, path, known):
            if target not in known:
                continue                           # a third-party or standard module
            if target in ENTRY_POINTS and target != module:
                found.append(f"{where}:{line}: imports the entry point {target}")
            if (name is not None and name.startswith("_") and not name.startswith("__")
                    and package_of(target, known) != package_of(module, known)):
                found.append(f"{where}:{line}: takes the private {target}.{name} from another "
                             f"package")
    return found


def test_entry_points_exist():
    known = modules(ROOT)
    assert ENTRY_POINTS <= set(known), sorted(ENTRY_POINTS - set(known))


def test_no_entry_point_imports_and_no_private_names_across_packages():
    assert violations() == []


def test_the_check_sees_both_kinds(tmp_path):
    """The checker itself: an entry point imported from a function body and a private name
    taken through a module alias are both reported."""
    pkg = tmp_path / "epsdist"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "manifest.py").write_text("_SECRET = 1\n")
    for m in ("infer", "segment", "evaluate", "demo"):
        (pkg / f"{m}.py").write_text("")
    (pkg / "train.py").write_text("def f():\n    from epsdist.infer import g\n")
    (pkg / "lib.py").write_text("from .data import manifest as mf\nX = mf._SECRET\n")
    assert violations(tmp_path) == ["epsdist/lib.py:2: takes the private epsdist.data.manifest._SECRET from "
                     "another package",
                     "epsdist/train.py:2: imports the entry point epsdist.infer"]
