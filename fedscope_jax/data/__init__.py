"""Data layer: readers of real formats, the canonical Arrow dataset, synthetic data, client partitions."""
