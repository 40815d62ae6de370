"""Evaluation: ranking metrics (metrics) and the leave-one-out protocol with baselines (protocol)."""

__all__ = ["metrics", "protocol"]
