"""The house plan, checked: imports (function-level ones too) form no circle and point the way the README says."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mae", "training", "export", "retrieval", "serving", "cli")
HEAVY = {"bentoml": "serving", "faiss": "retrieval", "onnxruntime": "export", "tensorrt": "export",
         "pymilvus": "retrieval", "milvus_lite": "retrieval"}


def _imports() -> dict[str, set[str]]:
    """module -> project modules (and heavy libraries) it imports anywhere in its body."""
    edges: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            module = f"{package}.{path.stem}"
            found = edges.setdefault(module, set())
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    if node.module in PACKAGES:  # from mae import artifact
                        found |= {f"{node.module}.{a.name}" for a in node.names}
                    else:
                        found.add(node.module)
                elif isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
    return {m: {t for t in ts if t.split(".")[0] in (*PACKAGES, *HEAVY)} for m, ts in edges.items()}


def test_no_import_circle():
    edges = _imports()
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in edges.get(module, ()):
            if target not in edges:
                continue
            assert state.get(target) != 1, "import circle: " + " -> ".join([*path, target])
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in edges:
        if module not in state:
            visit(module, [module])


def test_arrows_point_down():
    for module, targets in _imports().items():
        package = module.split(".")[0]
        for target in targets:
            top = target.split(".")[0]
            if top in HEAVY:
                assert package == HEAVY[top], f"{module} imports {top}, which belongs in {HEAVY[top]}/"
                continue
            if package == "mae":
                assert top == "mae", f"the core module {module} imports {target}"
            assert top != "cli" or package == "cli", f"{module} imports the face ({target})"
            assert top != "training" or package in ("training", "cli"), f"{module} imports {target}"
            if package == "export":
                assert top in ("mae", "export"), f"{module} imports {target}"
            if package == "retrieval":
                assert top in ("mae", "export", "retrieval"), f"{module} imports {target}"


def test_every_command_registers_its_flags_without_heavy_imports():
    """cli.main is a dispatch table: each stage's command module adds its flags, importing the standard library and
    stdlib-only project modules alone, so that ``mae --help`` and a torch-free ``mae search`` stay instant."""
    import json
    import subprocess
    import sys

    probe = ("import json, sys, cli.main as m; p = m.build_parser(); "
             "print(json.dumps({'modules': sorted({n.split('.')[0] for n in sys.modules}), "
             "'commands': sorted(p._subparsers._group_actions[0].choices)}))")
    out = json.loads(subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                                    check=True).stdout)
    heavy = {"torch", "timm", "numpy", "PIL", "faiss", "bentoml", "onnxruntime", "tensorrt", "pymilvus"}
    assert not heavy & set(out["modules"]), f"building mae's parser imported {sorted(heavy & set(out['modules']))}"
    assert {"pretrain", "finetune", "evaluate", "export", "embed", "index", "search", "serve", "data",
            "demo"} <= set(out["commands"])


def _defined(tree: ast.AST) -> set[str]:
    """Every name a module binds: functions, classes, assignment targets (attributes included), arguments."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def test_no_module_uses_another_modules_private_names():
    """A ``_name`` belongs to the module that defines it: another module that needs it has found a missing public
    function. Checked for imports (``from m import _x``), module attributes (``m._x``) and attributes of objects
    (``obj._x`` where this module defines no ``_x`` of its own); libraries' private names are not ours to police."""

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    found = []
    for package in (*PACKAGES, "bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            own, modules = _defined(tree), {}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    ours = node.module.split(".")[0] in (*PACKAGES, "bench")
                    for a in node.names:
                        if ours and private(a.name):
                            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {a.name}")
                        modules[a.asname or a.name] = "ours" if ours and node.module in PACKAGES else "library"
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        top = a.name.split(".")[0]
                        modules[a.asname or top] = "ours" if top in (*PACKAGES, "bench") else "library"
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Attribute) and private(node.attr)):
                    continue
                base = node.value.id if isinstance(node.value, ast.Name) else None
                if base in ("self", "cls") or modules.get(base) == "library":
                    continue
                if modules.get(base) == "ours" or node.attr not in own:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "private names used outside their module:\n" + "\n".join(found)


def test_rooms_and_functions_stay_small():
    """No product module over 700 lines, no function over 80 (the house's second step, issue 18): a room that
    grows past that is doing several jobs and splits along its own dividers."""
    big = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            source = path.read_text()
            if source.count("\n") > 700:
                big.append(f"{path.relative_to(ROOT)}: {source.count(chr(10))} lines")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                    big.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}(): "
                               f"{node.end_lineno - node.lineno + 1} lines")
    assert not big, "over the size limits:\n" + "\n".join(big)
