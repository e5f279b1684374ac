"""Training data for the two networks: photographs, super-resolution pairs, inpainting masks.

Value ranges: photographs and super-resolution tensors are RGB in [0, 1]. The inpainting network
ends in Tanh, so its target and the image part of its input are in [-1, 1]; masks are 1 = hole.
"""

import torch


def inpaint_input(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inpainting network's input [image·(1−mask), mask] with the image scaled to [-1, 1].

    image: (B, 3, H, W) in [0, 1]; mask: (B, 1, H, W), 1 = hole -> (B, 4, H, W).
    """
    return torch.cat([(image * 2 - 1) * (1 - mask), mask], dim=1)


def inpaint_blend(pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep the known pixels and take the network's prediction in the hole.

    pred: (B, 3, H, W) network output in [-1, 1]; image: (B, 3, H, W) in [0, 1]; mask: (B, 1, H, W)
    -> (B, 3, H, W) in [0, 1], ``mask·pred + (1−mask)·image``.
    """
    pred01 = (pred.clamp(-1, 1) + 1) / 2
    return mask * pred01 + (1 - mask) * image
