"""Every function of ``ddpm_lightning/cli`` reads on one screen: at most 60 lines (a unit that does five things is
five functions: plan / generate / score / report)."""

from __future__ import annotations

import ast
from pathlib import Path

import ddpm_lightning.cli

MAX_LINES = 60


def long_functions(folder: Path, limit: int = MAX_LINES) -> dict[str, int]:
    """``file.py::function`` -> its line count (decorators excluded, docstring included) for those over ``limit``."""
    found = {}
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found[f"{path.name}::{node.name}"] = lines
    return found


def test_every_cli_function_is_at_most_60_lines():
    assert long_functions(Path(ddpm_lightning.cli.__file__).parent) == {}


def test_the_size_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "long.py").write_text(f"def short():\n    return 1\n\n\nclass A:\n    def long(self):\n{body}\n")
    assert long_functions(tmp_path) == {"long.py::long": MAX_LINES + 1}
