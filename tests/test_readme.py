"""The README's Python example runs as written (fewer steps to stay fast)."""

import re
from pathlib import Path


def test_readme_python_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "steps=50" in code
    namespace: dict = {}
    exec(compile(code.replace("steps=50", "steps=3"), "README.md", "exec"), namespace)
    rec = namespace["rec"]
    assert rec.samples.shape == (4, 1, 2, 64, 64)
    assert rec.info["nfe"] == 3
