"""The Python examples of the README and of docs/ run as written, in order, in one namespace (on CPU
the Triton kernels run in the interpreter that conftest switches on). The examples that use spandrel
(the published architectures) run where it is installed: `make test` runs this file in .venv-models too."""

import glob
import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The pages whose examples run, in the order they run: later examples use names earlier ones define
# (torch and attnsr from the README's first block).
PAGES = ("README.md", "docs/layers.md", "docs/kernels.md")


def python_blocks(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_every_page_with_python_examples_is_run():
    pages = ["README.md", *(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    with_examples = sorted(page for page in pages if python_blocks(page))
    assert with_examples == sorted(PAGES), f"pages with python examples {with_examples}; PAGES runs {PAGES}"


def test_readme_python_examples_run():
    blocks = [(page, i, code) for page in PAGES for i, code in enumerate(python_blocks(page))]
    counts = {page: sum(1 for p, _, _ in blocks if p == page) for page in PAGES}
    assert len(blocks) >= 6 and all(counts.values()), f"python blocks per page: {counts}"
    namespace = {}
    have_spandrel = importlib.util.find_spec("spandrel") is not None
    for page, i, code in blocks:
        if "spandrel" in code and not have_spandrel:
            continue
        exec(compile(code, f"{page} python block {i + 1}", "exec"), namespace)
    if have_spandrel:
        assert namespace["sr"].shape == (1, 3, 32, 32)
        swapped = namespace["swinir"].attnsr_swapped
        assert ("layers.0.residual_group.blocks.0", "SwinTransformerBlock", "SwinBlock") in swapped
    assert namespace["y"].shape == (2, 64, 16, 16)
    assert namespace["out"].shape == (2, 256, 60)
    assert [(name, new) for name, _, new in namespace["model"].attnsr_swapped] == [("1", "ChannelAttention")]
    for name in ("flash_attention", "image_attention", "window_attention", "channel_gate", "spatial_gate", "cbam_gate",
                 "layer_fusion"):
        assert callable(namespace[name]), name
