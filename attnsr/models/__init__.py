"""The networks of the two source documents, built from attnsr's layers."""

from attnsr.models.inpaint import ImageInpaintingModel

__all__ = ["ImageInpaintingModel"]
