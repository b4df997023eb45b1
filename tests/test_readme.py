"""The README's Python examples run as written (fewer steps to stay fast)."""

import re
from pathlib import Path

import torch


def _blocks():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _run(code):
    assert "steps=50" in code
    namespace: dict = {}
    exec(compile(code.replace("steps=50", "steps=3"), "README.md", "exec"), namespace)
    return namespace


def test_readme_python_example_runs():
    rec = _run(_blocks()[0])["rec"]
    assert rec.samples.shape == (4, 1, 2, 64, 64)
    assert rec.info["nfe"] == 3


def test_readme_problem_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it simulates knee.h5 in the working directory
    ns = _run(_blocks()[1])
    problem, rec, image = ns["problem"], ns["rec"], ns["image"]
    assert problem.modality == "mri" and problem.slices == [1] and problem.channels == 2
    assert problem.meta["coil_maps_source"] == "espirit" and len(problem.measurements) == 1
    assert rec.samples.shape == (2, 1, 2, 64, 64) and rec.info["nfe"] == 3
    # back in scan units: the normaliser's scale, not the prior's range
    torch.testing.assert_close(image, rec.mean * problem.normalisers[0].scale)
