"""Layers and array operations shared by the models."""

from .anchors import anchors_per_level
from .anchors import cell_anchors
from .anchors import decode_boxes
from .anchors import encode_boxes
from .anchors import feature_sizes
from .anchors import match_anchors
from .anchors import retinanet_anchors
from .boxes import batched_nms
from .boxes import box_area
from .boxes import box_iou
from .boxes import nms
from .detection import rescale_boxes
from .detection import retinanet_postprocess
from .roi_align import multilevel_roi_align
from .roi_align import roi_align
from .roi_align import roi_level

__all__ = [
    'anchors_per_level', 'batched_nms', 'box_area', 'box_iou', 'cell_anchors',
    'decode_boxes', 'encode_boxes', 'feature_sizes', 'match_anchors',
    'multilevel_roi_align', 'nms', 'rescale_boxes', 'retinanet_anchors',
    'retinanet_postprocess', 'roi_align', 'roi_level',
]
