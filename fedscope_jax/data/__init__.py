"""Data layer: readers of real formats, the canonical Arrow dataset, synthetic data, client partitions.

Modules (import them directly): canonical (the Arrow dataset), formats (readers, `prepare`), batching (padded
per-step batches), partition (clients), synth (synthetic datasets)."""

__all__ = ["batching", "canonical", "formats", "partition", "synth"]
