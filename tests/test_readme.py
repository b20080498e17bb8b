"""The README's Python example runs and shows what the README says it shows."""

import ast
import re

from tests.conftest import REPO


def test_readme_python_example_outputs_match(monkeypatch):
    monkeypatch.chdir(REPO)
    text = (REPO / "README.md").read_text(encoding="utf-8")
    source = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    lines = source.splitlines()
    namespace: dict = {}
    checked = 0
    for node in ast.parse(source).body:
        code = ast.get_source_segment(source, node)
        last = lines[node.end_lineno - 1]
        inline = last.partition("  # ")[2]
        following = lines[node.end_lineno] if node.end_lineno < len(lines) else ""
        expected = inline or (following[2:] if following.startswith("# ") else "")
        if isinstance(node, ast.Expr) and expected.startswith(("(", "'")):
            assert repr(eval(code, namespace)) == expected, code
            checked += 1
        else:
            exec(code, namespace)
    assert checked >= 3
