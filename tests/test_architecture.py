"""Architecture rules that keep the adapters thin (docs/architecture.md, "Rules").

Grep-level (AST) checks over the lb_dist package:

* no lb_dist module imports a ``_private`` name (function, class, constant) of another lb_dist module;
  package-internal modules with underscore names (``lb_dist._validation``) may be imported, and their
  public names used;
* no lb_dist module touches another lb_dist module's private attribute (``x._foo`` where ``x`` is not
  ``self``/``cls`` and ``_foo`` is an attribute or method that only another lb_dist module defines);
* an engine's private modules and names (DeepSpeed, Horovod, torch.distributed's FSDP internals) are
  imported only by the fenced vendor modules in ``lb_dist/_vendor/``.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lb_dist"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = (path, ast.parse(path.read_text(), filename=str(path)))
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_lb_dist_module(name: str) -> bool:
    return name in MODULES


def test_no_private_name_imported_across_lb_dist_modules():
    offences = []
    for module, (path, tree) in MODULES.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _resolve(module, node, is_package)
            if not (source == "lb_dist" or source.startswith("lb_dist.")):
                continue
            for alias in node.names:
                if _private(alias.name) and not _is_lb_dist_module(f"{source}.{alias.name}"):
                    offences.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: "
                                    f"from {source} import {alias.name}")
    assert not offences, "private names imported across lb_dist modules:\n" + "\n".join(offences)


def _owned_private_attributes(tree: ast.Module) -> set[str]:
    owned = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _private(node.name):
            owned.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr):
            owned.add(node.attr)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name) and _private(t.id):
                    owned.add(t.id)
    return owned


def test_no_private_attribute_of_another_lb_dist_module_touched():
    owned = {module: _owned_private_attributes(tree) for module, (_, tree) in MODULES.items()}
    offences = []
    for module, (path, tree) in MODULES.items():
        if module.startswith("lb_dist._vendor"):   # engines' attributes (Horovod's _handles) are read there
            continue
        others = set().union(*(names for m, names in owned.items() if m != module))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name) \
                    and node.value.func.id == "super":
                continue
            if node.attr in others and node.attr not in owned[module]:
                offences.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: "
                                f"{ast.unparse(node)}")
    assert not offences, "private attributes of other lb_dist modules touched:\n" + "\n".join(offences)


VENDORS = ("deepspeed", "horovod", "torch")


def test_engine_private_names_only_in_vendor_modules():
    offences = []
    for module, (path, tree) in MODULES.items():
        if module.startswith("lb_dist._vendor"):
            continue
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                if node.module.startswith(VENDORS):
                    names = [node.module + "." + a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith(VENDORS)]
            for name in names:
                if any(_private(part) for part in name.split(".")):
                    offences.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {name}")
    assert not offences, "engine internals imported outside lb_dist/_vendor/:\n" + "\n".join(offences)


def _private_attribute_reads(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) \
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)
    return names


def test_engine_private_attributes_read_only_in_vendor_modules():
    """The private attributes lb_dist/_vendor reads on DeepSpeed's and Horovod's objects
    (``optimizer._global_grad_norm``, ``_handles``...) are read nowhere else."""
    fenced = set()
    for module, (_, tree) in MODULES.items():
        if module in ("lb_dist._vendor.deepspeed", "lb_dist._vendor.horovod"):
            fenced |= _private_attribute_reads(tree)
    assert fenced, "the vendor modules read no private attribute: this test checks nothing"
    offences = []
    for module, (path, tree) in MODULES.items():
        if module.startswith("lb_dist._vendor"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in fenced \
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                offences.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not offences, "engine internals read outside lb_dist/_vendor/:\n" + "\n".join(offences)
