"""The package layout stays a stack: no import cycles between modules, and the specific upward
imports issue 11 removed do not come back."""

import ast
import pathlib

import mixq

ROOT = pathlib.Path(mixq.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _imports() -> dict[str, set[str]]:
    """module -> the mixq modules it imports anywhere (top level or inside functions)."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    head = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(head + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges[m] |= {t for t in targets if t in mods and t != m}
    return edges


def test_no_import_cycles_except_the_backend_registry():
    edges = _imports()
    # A package that loads its plugins, which register with it, is the one allowed loop.
    registry = {("mixq.backends", f"mixq.backends.{b}") for b in ("reference", "cpu", "triton")}
    cycles = []
    for a, outs in edges.items():
        for b in outs:
            if a in edges.get(b, set()) and (a, b) not in registry and (b, a) not in registry and a < b:
                cycles.append((a, b))
    assert cycles == []

    def reaches(src: str, dst: str, seen: set) -> bool:
        if src == dst:
            return True
        seen.add(src)
        return any(reaches(n, dst, seen) for n in edges[src] if n not in seen and (src, n) not in registry)

    longer = [(a, b) for a in edges for b in edges[a] if (a, b) not in registry and reaches(b, a, set())]
    assert longer == []


def test_the_removed_upward_imports_stay_removed():
    edges = _imports()
    assert "mixq.cli" not in edges["mixq.demo"]
    assert "mixq.eval.coco_sam" not in edges["mixq.models.sam"]
    assert "mixq.quantize" not in edges["mixq.checkpoint"] | edges["mixq.scores.inventory"] | edges["mixq.models.base"]
    assert "mixq.quantize" not in edges["mixq.scores.perturb"]
