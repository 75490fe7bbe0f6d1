"""Every test says what bug it guards: a test nobody can explain is a test nobody dares to change."""

from __future__ import annotations

import ast
from pathlib import Path


def test_every_test_has_a_docstring():
    """A test without a docstring fails here, named by file and line."""
    missing = []
    for path in sorted(Path(__file__).parent.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_"):
                if not ast.get_docstring(node):
                    missing.append(f"{path.relative_to(Path(__file__).parent)}:{node.lineno} {node.name}")
    assert not missing, "tests without a docstring:\n" + "\n".join(missing)
