"""Published super-resolution checkpoints for ``attnsr upscale``: SwinIR, HAT, RCAN, DRCT ... as
spandrel (``pip install "attnsr[models]"``) loads them, attnsr's fused layers swapped in.

spandrel recognises an architecture from a state_dict's keys and returns a descriptor: the network
(``.model``), its ``.scale``, ``.input_channels`` and ``.size_requirements`` (a minimum size, a
multiple, square or not). Calling the descriptor pads the image to those requirements, runs the
network and clamps; :class:`PublishedSR` instead runs the network alone, so that attnsr's own
padding and tiling (:func:`attnsr.infer.upscale`) take its place. A whole image is padded as
spandrel pads it, to ``pad_multiple`` (spandrel's ``multiple_of``) and ``minimum`` (reflect, bottom
and right), and the network pads the rest itself as it does under spandrel (SwinIR's reflect to its
window, ATD's mirror, OmniSR's zeros, ...), so the whole-image output is spandrel's. Tiles are
multiples of ``multiple``, the least common multiple of ``multiple_of`` and the network's window
(``window_size`` of SwinIR, HAT, DRCT ...), and start on the window grid; the image is padded to it
(reflect) when tiled. Smaller images are padded up to ``minimum`` first, as spandrel does (an axis
shorter than half the minimum is padded by replication, where spandrel reflects first).

Limits: image-to-image networks only (super-resolution, scale ≥ 1; 1× restoration networks run
too), RGB in and out; networks that need square inputs are refused.
"""

import collections
import math
import os

from torch import nn

from attnsr.images import InputError, first_line

EXTRA = 'pip install "attnsr[models]"'


def _import_spandrel(not_attnsr: str):
    try:
        import spandrel
    except ImportError as e:  # spandrel itself missing, or one of its dependencies (torchvision) broken
        state = "is not installed" if e.name == "spandrel" else f"does not import ({first_line(e)})"
        raise InputError(f"{not_attnsr}; published architectures (SwinIR, HAT, RCAN, ...) are loaded with spandrel, "
                         f"which {state}: {EXTRA}") from None
    return spandrel


class PublishedSR(nn.Module):
    """A published image-to-image network as spandrel loads it, without spandrel's padding and clamping.

    ``net`` is spandrel's module (swap attnsr's layers into it with :func:`attnsr.swap_attention`);
    ``forward`` is the architecture's own call (spandrel's ``call_fn``: most call the network on the
    image, a few take an element of its output). ``architecture``, ``scale``, ``in_channels``,
    ``pad_multiple``, ``multiple`` and ``minimum`` describe it (see the module notes).

    x: (B, C, H, W), H and W multiples of ``multiple``, at least ``minimum`` -> (B, C, scale·H, scale·W).
    """

    def __init__(self, descriptor):
        super().__init__()
        self.net = descriptor.model
        self.architecture = descriptor.architecture.name
        self.scale = int(descriptor.scale)
        self.in_channels = int(descriptor.input_channels)
        self.out_channels = int(descriptor.output_channels)
        req = descriptor.size_requirements
        window = getattr(self.net, "window_size", None)
        self.window = window if isinstance(window, int) and window > 0 else None
        self.pad_multiple = int(req.multiple_of)
        self.multiple = math.lcm(self.pad_multiple, self.window or 1)
        self.minimum = int(req.minimum)
        self._call = getattr(descriptor, "_call_fn", None) or (lambda model, x: model(x))

    def forward(self, x):
        return self._call(self.net, x)

    def extra_repr(self) -> str:
        return (f"architecture={self.architecture!r}, scale={self.scale}, in_channels={self.in_channels}, "
                f"multiple={self.multiple}, minimum={self.minimum}")


def load_published(path, *, not_attnsr: str = "") -> PublishedSR:
    """Load a published super-resolution checkpoint with spandrel; InputError where it cannot be used.

    ``not_attnsr`` is why the file is not an attnsr checkpoint (the start of each error message).
    The network is in eval mode, float32 on the CPU, its layers as published.
    """
    path = os.fspath(path)
    not_attnsr = not_attnsr or f"{path} is not an attnsr checkpoint"
    spandrel = _import_spandrel(not_attnsr)
    try:
        descriptor = spandrel.ModelLoader().load_from_file(path)
    except Exception as e:  # unknown architecture, unsupported extension, unpickling failure, bad keys
        raise InputError(f"{not_attnsr}, and spandrel cannot load it either ({type(e).__name__}: {first_line(e)}); "
                         "expected a checkpoint written by `attnsr train sr` or a super-resolution checkpoint "
                         "of an architecture spandrel supports (SwinIR, HAT, RCAN, DRCT, ...)") from None
    name = f"{descriptor.architecture.name} ({type(descriptor).__name__}, purpose {descriptor.purpose})"
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise InputError(f"{path} holds {name}, which takes more than an image; expected a super-resolution "
                         "network (image in, image out)")
    if descriptor.size_requirements.square:
        raise InputError(f"{path} holds {name}, which takes square images only; `attnsr upscale` does not pad "
                         "images to a square")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise InputError(f"{path} holds {name} with {descriptor.input_channels} input and "
                         f"{descriptor.output_channels} output channels; expected an RGB network (3 and 3)")
    return PublishedSR(descriptor).eval()


def swap_report(model: nn.Module) -> list[str]:
    """One or two lines on what :func:`attnsr.swap_attention` did to ``model``: the layers swapped,
    counted by class, and those left as they are, with why."""

    def counted(items):  # in order of first appearance
        return ", ".join(f"{n} {item}" for item, n in collections.Counter(items).items())

    swapped = getattr(model, "attnsr_swapped", [])
    left = getattr(model, "attnsr_left", [])
    lines = [f"attnsr layers swapped in: {counted(new for _, _, new in swapped)}" if swapped
             else "attnsr layers swapped in: none (no attention layer of a form attnsr fuses)"]
    if left:
        lines.append(f"left as published: {counted(f'{old} ({why})' for _, old, why in left)}")
    return lines
