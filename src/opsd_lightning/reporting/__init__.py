"""The parts of `opsd-report` (cli/report.py): a multirun's jobs, their curves, the tables and the plots."""
