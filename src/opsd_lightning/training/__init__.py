"""The training module (`module`), its optimizer step (`stepper`), scalar options (`settings`), recipes, and
the callbacks it runs with (benchmark evaluation, adapter saving, graceful stop, the engine's lifecycle)."""
