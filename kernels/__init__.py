"""dar.kernels: the fused Triton kernels behind ``backend="triton"`` (see docs/kernels.md).

- `dar.kernels.attention`: rebalanced flash attention forward, registered as the custom op
  ``torch.ops.dar.rebalanced_attention``.
- `dar.kernels.scoring`: sampled-query scoring -> key weights, registered as ``torch.ops.dar.key_weights``
  (dense) and ``torch.ops.dar.key_weights_varlen`` (packed sequences); its tables in `scoring_autotune`.
- `dar.kernels.autotune`: the per-GPU autotuning tables.
- `dar.kernels.features`: what the installed Triton offers (probed once at import; Triton >= 3.2).
- `dar.kernels.shared`: constants and the K' helper shared with the host code (torch only).
- `dar.kernels.aot`: ahead-of-time compilation for a GPU that need not be present, and reading
  the resulting SASS (the static report, `dar bench static`); `dar.kernels.compile_report` checks
  the autotuning tables with it.

The kernels import only torch, triton and each other, never the host code. Importing this package does
not import triton; the submodules do (and raise ImportError without it, or with a triton older than
`dar.kernels.features.MIN_TRITON`).
"""

if __name__ == "kernels":  # the checkout root is on sys.path: be the installed `kernels`, not this folder
    from dar._toplevel import defer_to_installed

    defer_to_installed(__name__, __file__)


__all__ = ["aot", "attention", "autotune", "compile_report", "features", "scoring", "scoring_autotune", "shared"]
