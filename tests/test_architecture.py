"""The import rule: data flows one way, and so do imports between the package's rooms.

    policies ← models ← {stream, evaluation, training} ← demo ← cli (and loop, the loop demo)
    training → evaluation (the promotion gate)      stream, training → schemas (the Kafka contract)
    schemas → policies, models (the policy store's records, the verdict's ``JudgedBy`` and turns)
    evaluation → schemas (``schemas.jsonl``, the one JSON Lines reader)
    demo → every room below it; only cli and loop import demo    bench → anything; nothing imports bench

Importing a room registers nothing (the demo evaluation sets are registered by the command).

Every import statement is checked — module level and inside functions, ``import x`` and ``from x
import y``, relative imports, and ``importlib.import_module("rsafe.…")`` with a literal name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("policies", "schemas", "models", "stream", "evaluation", "training", "demo", "infra", "bench")

#: room → the rooms it may import (itself always allowed).
ALLOWED: dict[str, set[str]] = {
    "policies": set(),
    "schemas": {"policies", "models"},  # the contract's records reuse the policy store's and the verdict's
    "infra": set(),
    "models": {"policies"},
    "evaluation": {"policies", "models", "schemas"},  # schemas.jsonl: the one JSON Lines reader
    "stream": {"policies", "models", "schemas"},
    "training": {"policies", "models", "schemas", "evaluation"},
    "demo": {"policies", "schemas", "models", "stream", "evaluation", "training"},  # the toy model and its scenario
    "cli": {"policies", "schemas", "models", "stream", "evaluation", "training", "demo", "infra", "loop"},
    "loop": {"policies", "schemas", "models", "stream", "evaluation", "training", "demo"},  # wires both sides
    "bench": {"policies", "schemas", "models", "stream", "evaluation", "training", "demo", "infra", "cli", "loop",
              "package"},  # benchmark scripts: they measure everything, nothing imports them
    "package": set(),  # rsafe/__init__.py
}


def room_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] in ROOMS:
        return rel.parts[0]
    return {"cli.py": "cli", "loop.py": "loop", "__init__.py": "package"}[rel.name]


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = ["rsafe", *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) of every rsafe import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out += [(node.lineno, f"{mod}.{a.name}" if not node.module and node.level else mod) for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return [(line, m) for line, m in out if m == "rsafe" or m.startswith("rsafe.")]


def target_room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] in ROOMS:
        return parts[1]
    if parts[1] in ("cli", "loop"):
        return parts[1]
    return "package"


def sources() -> list[Path]:
    files = [ROOT / "cli.py", ROOT / "loop.py", ROOT / "__init__.py"]
    for room in ROOMS:
        files += sorted((ROOT / room).rglob("*.py"))
    return files


def test_every_import_follows_the_allowed_edges():
    violations = []
    for path in sources():
        src = room_of(path)
        for line, module in imported(path):
            dst = target_room(module)
            if dst != src and dst not in ALLOWED[src]:
                violations.append(f"{path.relative_to(ROOT)}:{line}: {src} imports {module} ({dst})")
    assert not violations, "imports against the architecture:\n" + "\n".join(violations)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    code = ("import os\n"
            "def f():\n    from rsafe.stream.config import load_config\n"
            "    import importlib\n    importlib.import_module('rsafe.demo.build')\n"
            "from ..evaluation import runner\n")
    tree_path = tmp_path / "models" / "probe.py"
    tree_path.parent.mkdir()
    tree_path.write_text(code)
    found = {m for _, m in imported(tree_path, tmp_path)}
    assert found == {"rsafe.stream.config", "rsafe.demo.build", "rsafe.evaluation"}
    assert {target_room(m) for m in found} == {"stream", "demo", "evaluation"}


def test_only_the_command_and_the_loop_import_the_demo_and_nothing_imports_bench():
    assert {room for room, allowed in ALLOWED.items() if "demo" in allowed} == {"cli", "loop", "bench"}
    assert not [room for room, allowed in ALLOWED.items() if "bench" in allowed]
    assert (ROOT / "demo" / "__init__.py").is_file() and list((ROOT / "bench").glob("*.py"))  # both are checked


def test_importing_the_rooms_registers_no_benchmark():
    """The demo evaluation sets are registered by the command (``rsafe.demo.cli``), not on import."""
    code = ("import rsafe.training, rsafe.training.cli, rsafe.demo, rsafe.demo.drift, rsafe.demo.benchmarks\n"
            "from rsafe.evaluation.benchmarks import BENCHMARKS\n"
            "print(sorted(n for n in BENCHMARKS if n.startswith('demo')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
