"""The semantics of one DAR call: the definition against the float64 oracle, argument validation, sampling and
the plan, non-finite input, torch.compile."""
