"""The Triton kernels themselves (attention, scoring, packed scoring) and their compiled form (static report,
targets)."""
