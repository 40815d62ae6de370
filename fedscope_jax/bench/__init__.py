"""Benchmarks, side by side in one run: the vectorized engine against the sequential reference (`engine`), a
sweep as one program against its configurations one by one (`sweep`). Above `train` in the layers."""

__all__ = ["engine", "sweep"]
