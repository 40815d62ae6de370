"""The paper's studies: study specs (experiments/configs/*.json), methods, cells, planning, the runner, the
inventory, tables, plots, report."""

__all__ = ["cells", "datasets", "inventory", "methods", "planning", "plots", "report", "runner", "spec", "tables"]
