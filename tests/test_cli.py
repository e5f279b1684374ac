"""The `attnsr` command end to end on tiny images and tiny networks, including every bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import error_line

from attnsr import cli
from attnsr.checkpoint import build_model, load_checkpoint, save_checkpoint
from attnsr.images import InputError, atomic_write, read_image, write_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBCOMMANDS = ("train", "upscale", "inpaint", "check", "demo", "bench")


def _image(path, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    write_image(torch.rand(3, h, w, generator=g), path)
    return str(path)


def _sr_checkpoint(path, scale=2):
    torch.manual_seed(0)
    model = build_model({"name": "AttentionSRNet",
                         "kwargs": {"num_channels": 3, "num_features": 4, "num_blocks": 1, "scale": scale}})
    save_checkpoint(path, model=model, step=0)
    return str(path)


def _inpaint_checkpoint(path):
    torch.manual_seed(0)
    model = build_model({"name": "ImageInpaintingModel", "kwargs": {"in_channels": 4, "out_channels": 3, "heads": 1}})
    save_checkpoint(path, model=model, step=0)
    return str(path)


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "attnsr", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    for name in SUBCOMMANDS:
        assert f"    {name} " in out.stdout, (name, out.stdout)


def test_console_script_is_declared():
    setup = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    assert '"attnsr=attnsr.cli:main"' in setup


def test_upscale_end_to_end(tmp_path, capsys):
    img = _image(tmp_path / "in.png", 14, 20)
    ckpt = _sr_checkpoint(tmp_path / "sr.pt")
    out = tmp_path / "out.png"
    assert cli.main(["upscale", img, "-o", str(out), "--checkpoint", ckpt, "--backend", "torch"]) == 0
    assert read_image(out).shape == (3, 28, 40)
    tiled = tmp_path / "tiled.jpg"
    assert cli.main(["upscale", img, "-o", str(tiled), "--checkpoint", ckpt, "--tile", "12", "--overlap", "4"]) == 0
    assert read_image(tiled).shape == (3, 28, 40)
    assert "wrote" in capsys.readouterr().out


def test_inpaint_end_to_end_keeps_known_pixels(tmp_path):
    img = _image(tmp_path / "in.png", 18, 22)
    mask = torch.zeros(1, 18, 22)
    mask[:, 4:9, 6:15] = 1
    write_image(mask, tmp_path / "mask.png")
    out = tmp_path / "out.png"
    ckpt = _inpaint_checkpoint(tmp_path / "inpaint.pt")
    rc = cli.main(["inpaint", img, "--mask", str(tmp_path / "mask.png"), "-o", str(out), "--checkpoint", ckpt,
                   "--backend", "torch"])
    assert rc == 0
    got, original = read_image(out), read_image(img)
    assert got.shape == original.shape
    known = mask.expand_as(got) == 0
    assert torch.equal(got[known], original[known])  # PNG round trip of the same uint8 values


def test_train_then_upscale(tmp_path):
    out = tmp_path / "run"
    rc = cli.main(["train", "sr", "--out", str(out), "--steps", "3", "--batch-size", "2", "--patch", "8",
                   "--features", "4", "--blocks", "1", "--val-size", "32", "--val-every", "3", "--ckpt-every", "3",
                   "--backend", "torch", "--no-progress"])
    assert rc == 0
    ckpt = load_checkpoint(out / "last.pt", task="sr", scale=2)
    assert ckpt["step"] == 3
    img = _image(tmp_path / "in.png", 10, 12)
    assert cli.main(["upscale", img, "-o", str(tmp_path / "up.png"), "--checkpoint", str(out / "last.pt")]) == 0
    assert read_image(tmp_path / "up.png").shape == (3, 20, 24)


def test_check_prints_parity_table(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    for op in ("image_attention", "flash_attention", "channel_gate", "spatial_gate", "cbam_gate", "layer_fusion"):
        assert op in out
    assert "all within bounds" in out


def test_bench_passes_its_options_to_the_report(tmp_path, capsys):
    """`attnsr bench --suite ... --quick` (options first) reaches benchmarks.report untouched; a spent
    budget records the cases without timing them."""
    out = tmp_path / "rows.json"
    assert cli.main(["bench", "--suite", "gating", "--quick", "--no-memory", "--budget-s", "0",
                     "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["suite"] == "gating" and r["status"].startswith("skipped: the run's time budget")
                        for r in rows)
    assert "rows written to" in capsys.readouterr().out


# ---- bad input: one line of error, exit status 2, no output file ----------------------------------------------


def test_missing_image(tmp_path, capsys):
    ckpt = _sr_checkpoint(tmp_path / "sr.pt")
    out = tmp_path / "out.png"
    assert cli.main(["upscale", str(tmp_path / "nope.png"), "-o", str(out), "--checkpoint", ckpt]) == 2
    assert "nope.png does not exist" in error_line(capsys)
    assert not out.exists()


def test_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    ckpt = _sr_checkpoint(tmp_path / "sr.pt")
    assert cli.main(["upscale", str(bad), "-o", str(tmp_path / "out.png"), "--checkpoint", ckpt]) == 2
    assert "cannot read image" in error_line(capsys)
    assert not (tmp_path / "out.png").exists()


def test_mask_of_wrong_size(tmp_path, capsys):
    img = _image(tmp_path / "in.png", 16, 16)
    write_image(torch.ones(1, 8, 16), tmp_path / "mask.png")
    ckpt = _inpaint_checkpoint(tmp_path / "inpaint.pt")
    rc = cli.main(["inpaint", img, "--mask", str(tmp_path / "mask.png"), "-o", str(tmp_path / "o.png"),
                   "--checkpoint", ckpt])
    assert rc == 2
    line = error_line(capsys)
    assert "16×8" in line and "16×16" in line
    assert not (tmp_path / "o.png").exists()


def test_checkpoint_of_the_wrong_network(tmp_path, capsys):
    img = _image(tmp_path / "in.png", 8, 8)
    ckpt = _inpaint_checkpoint(tmp_path / "inpaint.pt")
    assert cli.main(["upscale", img, "-o", str(tmp_path / "o.png"), "--checkpoint", ckpt]) == 2
    assert "expected a super-resolution network" in error_line(capsys)


def test_checkpoint_of_the_wrong_scale(tmp_path, capsys):
    img = _image(tmp_path / "in.png", 8, 8)
    ckpt = _sr_checkpoint(tmp_path / "sr.pt", scale=2)
    assert cli.main(["upscale", img, "-o", str(tmp_path / "o.png"), "--checkpoint", ckpt, "--scale", "4"]) == 2
    assert "×2" in error_line(capsys)


def test_not_a_checkpoint(tmp_path, capsys):
    img = _image(tmp_path / "in.png", 8, 8)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 64)
    assert cli.main(["upscale", img, "-o", str(tmp_path / "o.png"), "--checkpoint", str(junk)]) == 2
    assert "cannot read checkpoint" in error_line(capsys)
    assert cli.main(["upscale", img, "-o", str(tmp_path / "o.png"), "--checkpoint", str(tmp_path / "no.pt")]) == 2
    assert "does not exist" in error_line(capsys)


def test_bad_output_path(tmp_path, capsys):
    img = _image(tmp_path / "in.png", 8, 8)
    ckpt = _sr_checkpoint(tmp_path / "sr.pt")
    assert cli.main(["upscale", img, "-o", str(tmp_path / "missing" / "o.png"), "--checkpoint", ckpt]) == 2
    assert "does not exist" in error_line(capsys)
    assert cli.main(["upscale", img, "-o", str(tmp_path / "o.bmp"), "--checkpoint", ckpt]) == 2
    assert ".png" in error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path, capsys):
    img = _image(tmp_path / "in.png", 8, 8)
    ckpt = _sr_checkpoint(tmp_path / "sr.pt")
    assert cli.main(["upscale", img, "-o", str(tmp_path / "o.png"), "--checkpoint", ckpt, "--device", "cuda"]) == 2
    assert "no CUDA device" in error_line(capsys)


def test_train_bad_config_is_one_line(tmp_path, capsys):
    rc = cli.main(["train", "inpaint", "--out", str(tmp_path), "--patch", "30", "--steps", "1", "--no-progress"])
    assert rc == 2
    assert "30" in error_line(capsys)


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    with pytest.raises(InputError):
        write_image(torch.rand(3, 4, 4), tmp_path / "image.tiff")


def test_written_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_image(torch.rand(3, 4, 4), tmp_path / "a.png")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o644


def test_upscale_and_inpaint_run_on_cuda_by_default_when_it_is_there(tmp_path, monkeypatch):
    """`--device` defaults to CUDA when available, as its help says (the network is loaded on the
    CPU and moved by inference): what reaches infer.upscale / infer.inpaint, with CUDA faked present."""
    from attnsr import infer

    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(infer, "upscale", lambda model, image, **kw: seen.append(kw["device"]) or image)
    monkeypatch.setattr(infer, "inpaint", lambda model, image, mask, **kw: seen.append(kw["device"]) or image)
    img = _image(tmp_path / "in.png", 8, 8)
    write_image(torch.zeros(1, 8, 8), tmp_path / "mask.png")
    out = str(tmp_path / "out.png")
    assert cli.main(["upscale", img, "-o", out, "--checkpoint", _sr_checkpoint(tmp_path / "sr.pt")]) == 0
    assert cli.main(["inpaint", img, "--mask", str(tmp_path / "mask.png"), "-o", out,
                     "--checkpoint", _inpaint_checkpoint(tmp_path / "inpaint.pt")]) == 0
    assert cli.main(["upscale", img, "-o", out, "--checkpoint", str(tmp_path / "sr.pt"), "--device", "cpu"]) == 0
    assert seen == ["cuda", "cuda", "cpu"]
