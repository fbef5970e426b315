"""Evaluation metrics of the MLPerf workloads."""

from jaxperf.metrics.segmentation import dice

__all__ = ['dice']
