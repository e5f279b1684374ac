"""The ``attnsr`` command (also ``python -m attnsr``): train, run and check the networks.

    attnsr train sr --out runs/sr              train the super-resolution network
    attnsr train inpaint --out runs/inpaint    train the inpainting network
    attnsr upscale IN -o OUT --checkpoint CKPT
    attnsr inpaint IN --mask MASK -o OUT --checkpoint CKPT
    attnsr check                               kernel parity table on this device
    attnsr demo                                the main job: parity, a benchmark, a short SR training
    attnsr bench                               the benchmark suites (benchmarks.report)
    attnsr tune [--quick]                      time launch settings and auto's choices on this GPU, keep them

Bad input (a missing image, a mask of the wrong size, the wrong checkpoint) prints one line
``attnsr: error: ...`` and exits with status 2. Outputs are written atomically.
"""

import argparse
import os
import sys

from attnsr.images import InputError

EXIT_INPUT_ERROR = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after each help text, except where there is no default."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "naive"),
                   help="attention implementation (default auto: on CUDA the faster of triton and torch per "
                        "layer call, as `attnsr tune` measured it on this GPU, else the shipped choice; torch "
                        "on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")


def _tile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tile", type=_positive_int, default=None,
                   help="process in overlapping tiles of this many input pixels (default: whole image). The "
                        "networks have global attention, so tiling approximates them to save memory")
    p.add_argument("--overlap", type=int, default=32, help="tile overlap in input pixels (default 32)")


def _train_parser(sub) -> None:
    from attnsr.train import TrainConfig

    d = TrainConfig(task="sr", out="")
    p = sub.add_parser("train", help="train the super-resolution or the inpainting network on photos",
                       formatter_class=_DefaultsFormatter,
                       description="Train AttentionSRNet (sr) or ImageInpaintingModel (inpaint). Without --data, "
                                   "trains on the photographs bundled with scikit-image. Under torchrun, trains "
                                   "data-parallel (DDP) with --batch-size per process.")
    p.add_argument("task", choices=("sr", "inpaint"))
    p.add_argument("--out", required=True, help="folder for last.pt, best.pt and metrics.jsonl")
    p.add_argument("--data", default=None,
                   help="folder of PNG/JPEG images, searched recursively (default: the photos bundled with "
                        "scikit-image)")
    p.add_argument("--val", default=d.val, help="held-out photo names, comma-separated, or a count")
    p.add_argument("--steps", type=_positive_int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="patches per step and process")
    p.add_argument("--patch", type=_positive_int, default=d.patch,
                   help="sr: low-resolution patch; inpaint: patch, a multiple of 4")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate, cosine-decayed")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--scale", type=int, default=d.scale, choices=(2, 3, 4), help="sr upscaling factor")
    p.add_argument("--features", type=_positive_int, default=d.features, help="sr: feature channels")
    p.add_argument("--blocks", type=_positive_int, default=d.blocks, help="sr: residual blocks")
    p.add_argument("--heads", type=_positive_int, default=d.heads, help="inpaint: attention heads")
    p.add_argument("--amp", default=d.amp, choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision (auto: bf16 on CUDA, off on CPU)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    p.add_argument("--val-every", type=_positive_int, default=d.val_every, help="steps between validations")
    p.add_argument("--ckpt-every", type=_positive_int, default=d.ckpt_every, help="steps between last.pt writes")
    p.add_argument("--val-size", type=_positive_int, default=d.val_size,
                   help="validation crop: sr HR bound, inpaint size")
    p.add_argument("--epoch-steps", type=_positive_int, default=d.epoch_steps, help="steps per data epoch")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds weights and data")
    p.add_argument("--resume", default=None, help="checkpoint to continue from (exactly where it stopped)")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _runtime_args(p)


def _train(args) -> int:
    from attnsr.train import TrainConfig, train

    cfg = TrainConfig(task=args.task, out=args.out, data=args.data, val=args.val, steps=args.steps,
                      batch_size=args.batch_size, patch=args.patch, lr=args.lr, weight_decay=args.weight_decay,
                      warmup=args.warmup, scale=args.scale, features=args.features, blocks=args.blocks,
                      heads=args.heads, backend=args.backend, amp=args.amp, grad_clip=args.grad_clip,
                      val_every=args.val_every, epoch_steps=args.epoch_steps,
                      ckpt_every=args.ckpt_every, val_size=args.val_size, seed=args.seed, resume=args.resume,
                      device=args.device, workers=args.workers, progress=not args.no_progress)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns the same result
        print(f"checkpoint: {result['checkpoint']}")
    return 0


def _load_network(path, task, backend):
    from attnsr.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(path, task=task)
    return ckpt, model_from_checkpoint(ckpt, backend=backend)


def _check_output(path) -> None:
    from attnsr.images import IMAGE_SUFFIXES

    if os.path.splitext(path)[1].lower() not in IMAGE_SUFFIXES:
        raise InputError(f"output {path} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"cannot write {path}: folder {folder} does not exist")


def _check_tiling(args) -> None:
    if args.overlap < 0:
        raise InputError(f"--overlap {args.overlap}: expected 0 or more pixels")
    if args.tile is not None and args.tile <= args.overlap:
        raise InputError(f"--tile {args.tile} must be larger than --overlap {args.overlap}")


def _run_device(args) -> str:
    """Where inference runs: ``--device``, else CUDA when available (as its help says), else the CPU."""
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _prepare_published(net, args) -> None:
    """Check ``--tile`` against a published network's sizes, then swap attnsr's layers into it on the
    backend that ``--backend`` resolves to on the device it will run on; print what was swapped."""
    from attnsr.infer import check_tiling
    from attnsr.published import swap_report
    from attnsr.swap import swap_attention

    if args.tile is not None:
        try:
            check_tiling(args.tile, args.overlap, net.multiple, net.minimum)
        except ValueError as e:
            raise InputError(f"--tile for {net.architecture}: {str(e).removeprefix('tiled_apply: ')}") from None
    backend = args.backend  # auto decides per layer call on a GPU; on the CPU it is the torch path
    if backend == "auto" and not _run_device(args).startswith("cuda"):
        backend = "torch"
    swap_attention(net.net, backend=backend)
    window = f", window {net.window}" if net.window else ""
    print(f"{args.checkpoint}: {net.architecture} ×{net.scale} (spandrel{window}), backend {backend}")
    for line in swap_report(net.net):
        print(f"  {line}")


def _upscale(args) -> int:
    from attnsr import infer
    from attnsr.checkpoint import NotACheckpoint
    from attnsr.images import read_image, write_image

    _check_output(args.output)
    _check_tiling(args)
    image = read_image(args.input)
    sizes = {}
    try:
        ckpt, model = _load_network(args.checkpoint, "sr", args.backend)
        scale = ckpt["model"]["kwargs"]["scale"]
    except NotACheckpoint as e:  # not attnsr's: a published architecture, through spandrel
        from attnsr.published import load_published

        model = load_published(args.checkpoint, not_attnsr=str(e))
        # a whole image padded as spandrel pads it (the network pads the rest its own way); tiles on
        # the window grid
        scale = model.scale
        sizes = {"multiple": model.multiple if args.tile else model.pad_multiple, "minimum": model.minimum}
    if args.scale is not None and args.scale != scale:
        raise InputError(f"checkpoint {args.checkpoint} upscales ×{scale}; --scale asked for ×{args.scale}")
    if sizes:
        _prepare_published(model, args)
    out = infer.upscale(model, image, scale=scale, tile=args.tile, overlap=args.overlap, device=_run_device(args),
                        **sizes)
    write_image(out, args.output)
    print(f"wrote {args.output} ({out.shape[-1]}×{out.shape[-2]}, ×{scale})")
    return 0


def _inpaint(args) -> int:
    from attnsr import infer
    from attnsr.images import read_image, read_mask, write_image

    _check_output(args.output)
    _check_tiling(args)
    image = read_image(args.input)
    mask = read_mask(args.mask, size=image.shape[-2:])
    _, model = _load_network(args.checkpoint, "inpaint", args.backend)
    out = infer.inpaint(model, image, mask, tile=args.tile, overlap=args.overlap, device=_run_device(args))
    write_image(out, args.output)
    print(f"wrote {args.output} ({out.shape[-1]}×{out.shape[-2]}, {mask.mean().item():.1%} of pixels filled)")
    return 0


def _check(args) -> int:  # main has switched to the interpreter if the kernels run on the CPU
    import torch

    from attnsr.check import print_parity

    return 1 if print_parity(torch.device(_run_device(args))) else 0


def _demo(args) -> int:
    from attnsr.demo import run_demo

    return run_demo(out=args.out, steps=args.steps, device=args.device)


def _bench(rest: list) -> int:
    try:
        from benchmarks import report
    except ImportError:
        raise InputError("the benchmarks are not installed with the package: run `attnsr bench` from a checkout of "
                         "attnsr's source repository (its benchmarks/ folder)") from None
    return report.main(rest, prog="attnsr bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnsr", description="Fused attention for image restoration: "
                                     "train and run the super-resolution and inpainting networks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)

    p = sub.add_parser("upscale", help="upscale an image with a trained or a published super-resolution checkpoint")
    p.add_argument("input", help="PNG or JPEG image")
    p.add_argument("-o", "--output", required=True, help="output .png or .jpg")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint written by `attnsr train sr`, or a published super-resolution checkpoint "
                        "(SwinIR, HAT, RCAN, DRCT, ...: any that spandrel loads; pip install \"attnsr[models]\"), "
                        "run with attnsr's fused attention layers swapped in")
    p.add_argument("--scale", type=int, default=None, help="expected factor (checked against the checkpoint)")
    _tile_args(p)
    _runtime_args(p)

    p = sub.add_parser("inpaint", help="fill the holes of an image with a trained inpainting checkpoint")
    p.add_argument("input", help="PNG or JPEG image")
    p.add_argument("--mask", required=True, help="image of the same size, white (>50%%) where pixels are missing")
    p.add_argument("-o", "--output", required=True, help="output .png or .jpg")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by `attnsr train inpaint`")
    _tile_args(p)
    _runtime_args(p)

    p = sub.add_parser("check", help="parity of every kernel against its float64 reference on this device")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")

    p = sub.add_parser("demo", help="parity table, a benchmark and a short SR training with a side-by-side PNG")
    p.add_argument("--out", default="demo-output", help="folder for the checkpoint and the PNG (default demo-output)")
    p.add_argument("--steps", type=_positive_int, default=None, help="training steps (default: the demo's budget)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")

    # listed here for --help only: main() hands everything after "bench" to benchmarks.report untouched
    sub.add_parser("bench", help="run the benchmark suites (arguments go to python -m benchmarks.report)",
                   add_help=False)
    sub.add_parser("tune", help="time the kernels' launch settings and auto's choices on this GPU and keep them "
                                "(attnsr tune --help)", add_help=False)
    return parser


COMMANDS = {"train": _train, "upscale": _upscale, "inpaint": _inpaint, "check": _check, "demo": _demo}


def _check_device(name) -> None:
    import torch

    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: expected cpu, cuda or cuda:N")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # argparse would take the report's own options for attnsr's
        try:
            return _bench(argv[1:])
        except InputError as e:
            print(f"attnsr: error: {e}", file=sys.stderr)
            return EXIT_INPUT_ERROR
    if argv[:1] == ["tune"]:
        import torch

        if not torch.cuda.is_available():
            print("attnsr: error: attnsr tune times the kernels on a GPU, and there is no CUDA device here; run it "
                  "on the machine that trains", file=sys.stderr)
            return EXIT_INPUT_ERROR
        from attnsr import tune

        return tune.main(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "backend", None) == "triton" or args.command in ("check", "demo"):
        from attnsr.check import enable_interpreter_if_no_gpu

        enable_interpreter_if_no_gpu(getattr(args, "device", None))  # before anything imports triton
    try:
        _check_device(getattr(args, "device", None))
        return COMMANDS[args.command](args)
    except InputError as e:
        print(f"attnsr: error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("attnsr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
