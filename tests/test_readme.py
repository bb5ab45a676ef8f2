"""The README's Python tour runs as written (a doc-test of its code blocks)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["x_mix"].shape == (1000, 2)
    # the mixture sampler puts about 60% of the samples on client 0's side (x < 0)
    left = float((namespace["x_mix"][:, 0] < 0).float().mean())
    assert abs(left - 0.6) < 0.05
