"""The wheel installs nothing but ``attnsr`` at the top of site-packages, beside a package that owns
a top-level ``kernels`` (Hugging Face's ``kernels`` has that import name), and works from there.

The source tree is copied aside (a stale ``build/`` folder in the checkout cannot leak into the
wheel), built with ``pip wheel --no-build-isolation`` (no download), and installed with
``--no-deps`` into a fresh virtual environment whose only other packages are a stand-in owner of
``kernels`` and, through a path file, the dependencies of this environment (torch, triton, ...).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import numpy
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_IN_COPY = {".git", ".venv", "build", "demo-output", "__pycache__", ".pytest_cache", ".benchmarks", "results",
                "docs"}


# what the fresh environments see: no PYTHONPATH (a source tree on it would look like an installed attnsr to
# pip and to Python) and no interpreter switch (the commands decide, as they do for a user)
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}


def _run(args, cwd, timeout=300, env=CLEAN_ENV):
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{' '.join(map(str, args))} exited {out.returncode}:\n{out.stdout[-2000:]}\n" \
                                f"{out.stderr[-3000:]}"
    return out.stdout


def _wheel(src, dest) -> str:
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
          str(dest), str(src)], cwd=src)
    (path,) = [p for p in dest.iterdir() if p.suffix == ".whl"]
    return str(path)


def _top_level(wheel: str) -> set:
    with zipfile.ZipFile(wheel) as z:
        return {name.split("/")[0] for name in z.namelist()}


def _fresh_venv(path, dependencies) -> tuple:
    """A new virtual environment that sees this environment's ``dependencies`` (modules) after its own
    packages, through a path file; returns its python and its site-packages folder."""
    _run([sys.executable, "-m", "venv", str(path)], cwd=path.parent, timeout=120)
    python = str(path / "bin" / "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=path.parent).strip()
    folders = sorted({os.path.dirname(os.path.dirname(m.__file__)) for m in dependencies})
    with open(os.path.join(site, "zz-test-deps.pth"), "w") as f:
        f.write("\n".join(folders) + "\n")
    return python, site


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "attnsr-src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=lambda d, names: [n for n in names if n in SKIP_IN_COPY
                                                                         or n.endswith(".egg-info")])
    attnsr_wheel = _wheel(src, tmp / "dist")

    standin = tmp / "standin"  # what Hugging Face's `kernels` looks like to the file system
    (standin / "kernels").mkdir(parents=True)
    (standin / "kernels" / "__init__.py").write_text('OWNER = "stand-in"\n\n\ndef get_kernel(name):\n    return name\n')
    (standin / "kernels" / "utils.py").write_text("HUB = True\n")
    (standin / "setup.py").write_text(textwrap.dedent("""\
        from setuptools import setup
        setup(name="kernels-standin", version="1.0", packages=["kernels"])
    """))
    standin_wheel = _wheel(standin, tmp / "standin-dist")
    return tmp, attnsr_wheel, standin_wheel


def test_wheel_holds_only_attnsr(wheels):
    _, wheel, _ = wheels
    top = _top_level(wheel)
    assert {t for t in top if not t.endswith(".dist-info")} == {"attnsr"}, f"top-level names in the wheel: {top}"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    for module in ("__init__", "attention", "channel_gate", "spatial_gate", "cbam", "layer_fusion", "reference"):
        assert f"attnsr/kernels/{module}.py" in names, f"attnsr/kernels/{module}.py missing from the wheel"
    assert not any(n.startswith("benchmarks/") or "/benchmarks/" in n for n in names)


def test_installs_beside_a_top_level_kernels_package_and_both_import(wheels):
    tmp, attnsr_wheel, standin_wheel = wheels
    python, site = _fresh_venv(tmp / "fresh", (torch, numpy))
    pip = [python, "-m", "pip", "install", "--no-deps", "--no-index", "-q"]
    _run([*pip, standin_wheel], cwd=tmp)  # the stand-in first: attnsr's install must not touch its files
    _run([*pip, attnsr_wheel], cwd=tmp)

    assert sorted(os.listdir(os.path.join(site, "kernels"))) in (["__init__.py", "utils.py"],
                                                                  ["__init__.py", "__pycache__", "utils.py"])
    probe = textwrap.dedent("""\
        import json, kernels, attnsr, attnsr.kernels
        from attnsr.kernels import flash_attention, image_attention, channel_gate, spatial_gate, cbam_gate
        print(json.dumps({"standin": kernels.OWNER, "hub": kernels.get_kernel("x"),
                          "attnsr_kernels": attnsr.kernels.__file__, "attnsr": attnsr.__file__,
                          "ops": [f.__name__ for f in (flash_attention, image_attention, channel_gate)]}))
    """)
    got = json.loads(_run([python, "-c", probe], cwd=tmp).strip().splitlines()[-1])
    assert got["standin"] == "stand-in" and got["hub"] == "x"
    assert got["attnsr_kernels"] == os.path.join(site, "attnsr", "kernels", "__init__.py")
    assert got["attnsr"].startswith(site), f"attnsr imported from {got['attnsr']}, not the fresh environment"

    # the commands of an installed wheel, run outside any checkout
    check = _run([python, "-m", "attnsr", "check", "--device", "cpu"], cwd=tmp, env=CLEAN_ENV, timeout=600)
    assert "all within bounds" in check
    bench = subprocess.run([python, "-m", "attnsr", "bench"], cwd=tmp, env=CLEAN_ENV, capture_output=True, text=True,
                           timeout=120)
    assert bench.returncode == 2 and bench.stdout == ""
    assert bench.stderr.count("\n") == 1 and "benchmarks/" in bench.stderr and "checkout" in bench.stderr, bench.stderr

    # each uninstall leaves the other package whole
    _run([python, "-m", "pip", "uninstall", "-y", "-q", "attnsr"], cwd=tmp)
    assert _run([python, "-c", "import kernels; print(kernels.OWNER)"], cwd=tmp).strip() == "stand-in"
    _run([*pip, attnsr_wheel], cwd=tmp)
    _run([python, "-m", "pip", "uninstall", "-y", "-q", "kernels-standin"], cwd=tmp)
    out = _run([python, "-c", "import attnsr.kernels, importlib.util; print(importlib.util.find_spec('kernels'))"],
               cwd=tmp)
    assert out.strip() == "None"


def test_demo_runs_from_the_installed_wheel(wheels):
    """`attnsr demo` needs nothing from the source tree (its benchmark table uses attnsr.timing)."""
    tmp, attnsr_wheel, _ = wheels
    import PIL
    import skimage
    import tqdm

    python, _ = _fresh_venv(tmp / "fresh-demo", (torch, numpy, PIL, skimage, tqdm))
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", attnsr_wheel], cwd=tmp)
    out = subprocess.run([python, "-m", "attnsr", "demo", "--steps", "2", "--out", str(tmp / "demo"), "--device",
                          "cpu"], cwd=tmp, env=CLEAN_ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode in (0, 1), out.stderr[-3000:]  # 1: two steps do not beat bicubic
    assert "all within bounds" in out.stdout and "time ÷ naive" in out.stdout and "attnsr is" in out.stdout
    assert "\r" not in out.stderr


def test_the_source_tree_never_imports_a_top_level_kernels():
    """In a checkout `import kernels` would find the kernels/ folder and load every op a second time
    (the installed wheel has no such module): all code must import attnsr.kernels."""
    code = textwrap.dedent("""\
        import importlib, pkgutil, sys
        import attnsr, benchmarks
        for pkg in (attnsr, benchmarks):
            for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                if not m.name.endswith("__main__"):
                    importlib.import_module(m.name)
        print(sorted(n for n in sys.modules if n == "kernels" or n.startswith("kernels.")))
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    assert _run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=300).strip().splitlines()[-1] == "[]"
