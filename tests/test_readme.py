"""The README's Python examples run as written, in order, in one namespace (on CPU the Triton
kernels run in the interpreter that conftest switches on). The examples that use spandrel (the
published architectures) run where it is installed: `make test` runs this file in .venv-models too."""

import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_examples_run():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) >= 4, f"found {len(blocks)} python blocks in README.md"
    namespace = {}
    have_spandrel = importlib.util.find_spec("spandrel") is not None
    for i, code in enumerate(blocks):
        if "spandrel" in code and not have_spandrel:
            continue
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
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
