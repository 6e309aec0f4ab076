"""Command-line apps and their wiring: `opsd-train`, `opsd-eval`, `opsd-report`, `opsd-export`, the pre-flight
check, and what the Hydra apps share (`app`)."""
