"""The paper's studies: study specs (experiments/configs/*.json), methods, cells, runner, tables, plots, report."""
