"""`make demo` runs `python -m attnsr demo`: it must work from a fresh process on this device."""

import os
import subprocess
import sys

from attnsr.images import read_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fresh_env():
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)  # the demo decides, as it does under `make demo`
    return env


def test_demo_prints_tables_and_writes_the_side_by_side(tmp_path):
    """A short run (the full one trains longer): every part runs and reports; the PNG is three panels."""
    out = subprocess.run([sys.executable, "-m", "attnsr", "demo", "--steps", "20", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=_fresh_env(), cwd=ROOT, timeout=900)
    assert out.returncode in (0, 1), out.stderr[-3000:]
    text = out.stdout
    assert "relative error vs float64 reference" in text
    assert "all within bounds" in text
    assert "naive" in text and "time ÷ naive" in text
    assert "bicubic" in text and "attnsr is" in text
    beat = "did not beat bicubic" not in text
    assert (out.returncode == 0) == beat
    png = tmp_path / "sr-demo.png"
    assert str(png) in text
    # the held-out photo (chelsea, 451×300, cropped to 450×300 for ×2) three times, two 6-px gaps,
    # and a 22-px caption strip
    assert read_image(png).shape == (3, 300 + 22, 3 * 450 + 2 * 6)


def test_importing_attnsr_does_not_import_triton():
    """TRITON_INTERPRET must be settable after `import attnsr` (it is read when triton is imported)."""
    code = "import sys, attnsr; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_fresh_env(), cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
