"""Evaluation metrics of the MLPerf workloads."""

from jaxperf.metrics.auc import auc
from jaxperf.metrics.segmentation import dice

__all__ = ['auc', 'dice']
