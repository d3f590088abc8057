"""The implementations under test, discovered at run time.

Each `Impl` turns ``(q, k, v, layout, cfg)`` into a zero-argument callable, or raises `Unavailable`
with the reason it cannot run here (backend not installed, no kernel for this dtype/device, not
enough memory). Nothing is assumed about which backends exist: the triton backend and FlexAttention
are probed when the run starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

import dar
from dar.backends import get_backend
from dar.call import make_call

# Memory the naive eager implementation may use for its Lq x Lk intermediates.
EAGER_CPU_LIMIT_BYTES = 2 << 30
EAGER_GPU_FRACTION = 0.7


class Unavailable(Exception):
    """This implementation cannot run the given inputs here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    kind: str  # "dar" (computes DAR), "sdpa" (plain attention, the no-DAR ceiling), "eager" (plain, materialised)
    description: str

    def prepare(self) -> None:
        """Raise Unavailable if this implementation cannot run at all on this machine."""

    def interpreted(self, device: torch.device) -> bool:
        """True when it runs under an interpreter here (timings meaningless, calls take seconds)."""
        return False

    def context(self):
        """Context manager wrapping every call (e.g. the SDPA backend selection)."""
        return contextlib.nullcontext()

    def build(self, q, k, v, layout, cfg) -> Callable[[], torch.Tensor]:
        raise NotImplementedError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


@dataclasses.dataclass(frozen=True)
class DarImpl(Impl):
    backend: str = "torch"
    mode: str | None = None  # DARConfig.mode for this row; None: the run's configuration
    weights_only: bool = False  # time `compute_key_weights` alone (the scoring part of a DAR call)

    def config(self, cfg):
        return cfg if self.mode is None else cfg.replace(mode=self.mode)

    def prepare(self) -> None:
        if self.backend == "triton":
            if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
                # Triton reads TRITON_INTERPRET when the kernels are defined, i.e. when dar is imported.
                raise Unavailable("the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 in the environment "
                                  "before Python starts (CPU interpreter)")
        try:
            get_backend(self.backend)
        except ImportError as exc:
            raise Unavailable(f"dar backend {self.backend!r} cannot be imported: {_first_line(exc)}") from exc

    def interpreted(self, device: torch.device) -> bool:
        return self.backend == "triton" and device.type != "cuda"

    def _check_supported(self, q, k, v, layout, cfg) -> None:
        self.prepare()
        why = get_backend(self.backend).unsupported(make_call(q, k, v, layout, cfg, None, None, False))
        if why is not None:
            raise Unavailable(f"dar backend {self.backend!r} does not support these inputs: {why}")

    def build(self, q, k, v, layout, cfg):
        cfg = self.config(cfg)
        self._check_supported(q, k, v, layout, cfg)
        backend = self.backend
        if self.weights_only:
            return lambda: dar.compute_key_weights(q, k, layout, cfg, backend=backend)
        # The weights come back too (computed anyway): the correctness check reads them from this call.
        return lambda: dar.dar_attention(q, k, v, layout, cfg, backend=backend, return_weights=True)

    def outputs(self, q, k, v, layout, cfg):
        """(out, w) for the correctness check (for weights alone: (None, w))."""
        cfg = self.config(cfg)
        self._check_supported(q, k, v, layout, cfg)
        if self.weights_only:
            return None, dar.compute_key_weights(q, k, layout, cfg, backend=self.backend)
        return dar.dar_attention(q, k, v, layout, cfg, backend=self.backend, return_weights=True)


@dataclasses.dataclass(frozen=True)
class DarVarlenImpl(DarImpl):
    """DAR through the packed API (`dar.dar_attention_varlen`) on the same tokens: each batch row is one
    packed sequence. Against the dense row of the same backend it measures the varlen path's cost per token."""

    def _check_supported(self, q, k, v, layout, cfg) -> None:
        self.prepare()
        from dar.varlen import triton_unavailable

        why = triton_unavailable() if self.backend == "triton" else None
        if why is not None:
            raise Unavailable(why)

    def build(self, q, k, v, layout, cfg):
        cfg = self.config(cfg)
        self._check_supported(q, k, v, layout, cfg)
        b, _, lq, _ = q.shape
        lk = k.shape[2]
        # Packing copies once, outside the timed call: (B, H, L, D) -> (B * L, H, D).
        qp, kp, vp = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]).contiguous() for t in (q, k, v))
        cu_q = torch.arange(b + 1, device=q.device, dtype=torch.int32) * lq
        cu_k = torch.arange(b + 1, device=q.device, dtype=torch.int32) * lk
        lays = [layout] * b if not isinstance(layout, (list, tuple)) else list(layout)
        backend = self.backend

        def run():
            out, w = dar.dar_attention_varlen(qp, kp, vp, cu_q, cu_k, lq, lk, lays, cfg, backend=backend,
                                              return_weights=True)
            return out.view(b, lq, *out.shape[1:]).transpose(1, 2), w.view(b, lk)

        return run

    def outputs(self, q, k, v, layout, cfg):
        return self.build(q, k, v, layout, cfg)()


@dataclasses.dataclass(frozen=True)
class SdpaImpl(Impl):
    sdp_backend: str = "MATH"  # a member name of torch.nn.attention.SDPBackend
    devices: tuple[str, ...] = ("cuda", "cpu")

    def _backend(self):
        from torch.nn.attention import SDPBackend

        return getattr(SDPBackend, self.sdp_backend)

    def prepare(self) -> None:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
        except ImportError as exc:
            raise Unavailable(f"torch.nn.attention.sdpa_kernel is missing: {_first_line(exc)}") from exc
        if not hasattr(SDPBackend, self.sdp_backend):
            raise Unavailable(f"this torch has no SDPBackend.{self.sdp_backend}")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in self.devices:
            raise Unavailable(f"not run on {device}: {self._device_note(device)}")

    def _device_note(self, device: str) -> str:
        if self.sdp_backend == "MATH":
            return "the math backend materialises Lq x Lk; the 'eager' implementation covers that path"
        return f"SDPBackend.{self.sdp_backend} has no {device} kernel"

    def context(self):
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel([self._backend()])

    def build(self, q, k, v, layout, cfg):
        self.prepare()
        if q.device.type not in self.devices:
            raise Unavailable(f"not run on {q.device.type}: {self._device_note(q.device.type)}")
        gqa = q.shape[1] != k.shape[1]
        fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)  # noqa: E731
        try:  # SDPA raises when the selected backend has no kernel for these inputs
            with self.context():
                fn()
        except RuntimeError as exc:
            raise Unavailable(f"SDPBackend.{self.sdp_backend} rejects these inputs: {_first_line(exc)}") from exc
        return fn

    def outputs(self, q, k, v, layout, cfg):
        with self.context():
            return self.build(q, k, v, layout, cfg)(), None


@dataclasses.dataclass(frozen=True)
class FlexImpl(Impl):
    """Plain FlexAttention (no score_mod, no mask): the flex backend's ceiling. Compiled on CUDA;
    FlexAttention's eager (score-materialising) path elsewhere."""

    def prepare(self) -> None:
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except ImportError as exc:
            raise Unavailable(f"torch.nn.attention.flex_attention is missing: {_first_line(exc)}") from exc

    def build(self, q, k, v, layout, cfg):
        self.prepare()
        from torch.nn.attention.flex_attention import flex_attention

        fn = torch.compile(flex_attention) if q.device.type == "cuda" else flex_attention
        gqa = q.shape[1] != k.shape[1]

        def run():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                return fn(q, k, v, enable_gqa=gqa)

        return run

    def outputs(self, q, k, v, layout, cfg):
        return self.build(q, k, v, layout, cfg)(), None


def eager_attention(q, k, v):
    """softmax(q k^T * scale) v with the full score matrix in memory (the textbook implementation)."""
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


@dataclasses.dataclass(frozen=True)
class EagerImpl(Impl):
    def build(self, q, k, v, layout, cfg):
        b, hq, lq, _ = q.shape
        lk = k.shape[2]
        # scores in q's dtype, their float32 softmax and its cast back: ~ (2 + 4 + 2) bytes per entry.
        need = b * hq * lq * lk * (2 * q.element_size() + 4)
        if q.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(q.device)
            limit = int(free * EAGER_GPU_FRACTION)
        else:
            limit = EAGER_CPU_LIMIT_BYTES
        if need > limit:
            raise Unavailable(f"needs ~{need / 2**30:.1f} GiB for the Lq x Lk scores, over the "
                              f"{limit / 2**30:.1f} GiB allowed here")
        return lambda: eager_attention(q, k, v)

    def outputs(self, q, k, v, layout, cfg):
        return self.build(q, k, v, layout, cfg)(), None


IMPLS: dict[str, Impl] = {
    impl.name: impl
    for impl in (
        DarImpl("dar-triton", "dar", "DAR, fused Triton kernels (backend='triton')", backend="triton"),
        DarImpl("dar-torch", "dar", "DAR, torch scoring + SDPA (backend='torch')", backend="torch"),
        DarImpl("dar-flex", "dar", "DAR, FlexAttention score_mod (backend='flex')", backend="flex"),
        SdpaImpl("sdpa-cudnn", "sdpa", "plain SDPA, cuDNN attention", sdp_backend="CUDNN_ATTENTION",
                 devices=("cuda",)),
        SdpaImpl("sdpa-flash", "sdpa", "plain SDPA, FlashAttention", sdp_backend="FLASH_ATTENTION"),
        SdpaImpl("sdpa-efficient", "sdpa", "plain SDPA, memory-efficient attention",
                 sdp_backend="EFFICIENT_ATTENTION", devices=("cuda",)),
        SdpaImpl("sdpa-math", "sdpa", "plain SDPA, math reference kernel", sdp_backend="MATH", devices=("cpu",)),
        FlexImpl("flex", "flex", "plain FlexAttention, no score_mod (compiled on CUDA)"),
        EagerImpl("eager", "eager", "plain attention, materialised softmax in eager PyTorch"),
        DarImpl("dar-weights", "dar-part", "DAR key weights alone (compute_key_weights, backend='torch')",
                backend="torch", weights_only=True),
        DarVarlenImpl("dar-varlen-triton", "dar", "DAR, packed Triton kernels (dar_attention_varlen, backend='triton')",
                      backend="triton"),
        DarVarlenImpl("dar-varlen-torch", "dar", "DAR, packed torch path (dar_attention_varlen, backend='torch')",
                      backend="torch"),
    )
}


# Run only when named with --impl (the scoring part on its own is a breakdown, not an alternative).
# The varlen rows repeat their dense counterparts on the same tokens (for the packed path's cost per token).
OPT_IN = ("dar-weights", "dar-varlen-triton", "dar-varlen-torch")


def resolve(names: list[str] | None) -> list[Impl]:
    if not names:
        return [i for i in IMPLS.values() if i.name not in OPT_IN]
    out = []
    for name in names:
        if name not in IMPLS:
            raise ValueError(f"--impl {name!r} is not one of {sorted(IMPLS)}")
        if IMPLS[name] not in out:
            out.append(IMPLS[name])
    return out


def availability(impls: list[Impl]) -> dict[str, str | None]:
    """name -> None when the implementation can run on this machine at all, else the reason."""
    out = {}
    for impl in impls:
        try:
            impl.prepare()
            out[impl.name] = None
        except Unavailable as exc:
            out[impl.name] = str(exc)
    return out


def with_modes(chosen: list[Impl], modes: list[str]) -> list[Impl]:
    """DAR implementations once per DAR mode: key_scale rows keep the plain name, other modes get
    ``<name>:<mode>`` (``dar-torch:prob_scale``); the others unchanged. Weights alone do not depend
    on the mode and run once."""
    out = []
    for impl in chosen:
        if not isinstance(impl, DarImpl) or impl.weights_only:
            out.append(impl)
            continue
        for mode in modes:
            name = impl.name if mode == "key_scale" else f"{impl.name}:{mode}"
            out.append(dataclasses.replace(impl, name=name, mode=mode,
                                           description=f"{impl.description}, {mode}"))
    return out
