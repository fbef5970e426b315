"""PyTorch versions of the MLPerf reference models (compare, parity tests)."""
