"""Teachers are weights only: `dynamic`, `fixed`, `ema` and `model` each give a scoring view (`modes`)."""
