"""The networks of the two source documents, built from attnsr's layers."""

from attnsr.models.inpaint import ImageInpaintingModel
from attnsr.models.sr import AttentionSRNet

__all__ = ["AttentionSRNet", "ImageInpaintingModel"]
