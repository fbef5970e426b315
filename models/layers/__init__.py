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
from .two_stage import balanced_sample
from .two_stage import label_proposals
from .two_stage import mask_probabilities
from .two_stage import mask_targets
from .two_stage import rcnn_box_iou
from .two_stage import rcnn_decode_boxes
from .two_stage import rcnn_encode_boxes
from .two_stage import reference_cell_anchors
from .two_stage import roi_detections
from .two_stage import rpn_anchors
from .two_stage import rpn_anchors_per_level
from .two_stage import rpn_proposals
from .two_stage import rpn_targets
from .two_stage import sample_rois

__all__ = [
    'anchors_per_level', 'balanced_sample', 'batched_nms', 'box_area',
    'box_iou', 'cell_anchors', 'decode_boxes', 'encode_boxes', 'feature_sizes',
    'label_proposals', 'mask_probabilities', 'mask_targets',
    'match_anchors', 'multilevel_roi_align', 'nms',
    'rcnn_box_iou', 'rcnn_decode_boxes', 'rcnn_encode_boxes',
    'reference_cell_anchors', 'rescale_boxes', 'retinanet_anchors',
    'retinanet_postprocess', 'roi_align', 'roi_detections', 'roi_level',
    'rpn_anchors', 'rpn_anchors_per_level', 'rpn_proposals', 'rpn_targets',
    'sample_rois',
]
