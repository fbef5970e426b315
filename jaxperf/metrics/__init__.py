"""Evaluation metrics of the MLPerf workloads."""

from jaxperf.metrics.auc import auc
from jaxperf.metrics.coco import coco_box_map
from jaxperf.metrics.coco import coco_segm_map
from jaxperf.metrics.coco import detections_to_coco
from jaxperf.metrics.coco import masks_to_rle
from jaxperf.metrics.coco import paste_masks
from jaxperf.metrics.segmentation import dice
from jaxperf.metrics.wer import wer
from jaxperf.metrics.wer import word_edits

__all__ = ['auc', 'coco_box_map', 'coco_segm_map', 'detections_to_coco',
           'dice', 'masks_to_rle', 'paste_masks', 'wer', 'word_edits']
