"""Offline data tools, run as `python -m jaxperf.tools.<name>`."""
