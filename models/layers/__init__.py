"""Layers and array operations shared by the models."""

from .boxes import batched_nms
from .boxes import box_area
from .boxes import box_iou
from .boxes import nms

__all__ = ['batched_nms', 'box_area', 'box_iou', 'nms']
