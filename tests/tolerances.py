"""Output tolerances per input dtype, in one place: (atol, rtol) against a float64 computation."""

import torch

OUTPUT_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

# Attention mass r sums probabilities over heads and samples: absolute tolerance per unit of mass.
MASS_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# Keys whose float64 r̂ lies within this margin of a threshold may legitimately round either way.
THRESHOLD_MARGIN = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def assert_close(actual, expected, dtype, what="output"):
    atol, rtol = OUTPUT_TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), torch.as_tensor(expected, dtype=torch.float64),
                               atol=atol, rtol=rtol, msg=lambda m: f"{what} ({dtype}): {m}")
