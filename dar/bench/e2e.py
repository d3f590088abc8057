"""End-to-end: one denoising step of a real-size diffusers transformer, DAR off and on.

The transformer is built from its published configuration with random weights (nothing is
downloaded) and called once per step exactly as its pipeline calls it. DAR is switched on through
the diffusers binding (``dar.enable``) when `dar.bindings.diffusers` can be imported; otherwise (or
with ``via="patch"``) by replacing the ``dispatch_attention_fn`` name in the model's module with a
function that calls `dar.dar_attention` on the joint attention. Which of the two ran is recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import sys
from typing import Callable

import torch

import dar

from . import env
from .impls import IMPLS, Unavailable
from .timing import measure

DEFAULT_BACKENDS = ("triton", "torch", "flex")


@dataclasses.dataclass(frozen=True)
class Tokens:
    batch: int
    text: int
    grid: int  # side of each image's token grid (64 at 1024^2)
    refs: int

    @property
    def image(self) -> int:
        return self.grid * self.grid

    @property
    def seq(self) -> int:
        return self.text + self.image * (1 + self.refs)

    def layout(self) -> dar.TokenLayout:
        start = self.text + self.image
        ref = [(start + i * self.image, start + (i + 1) * self.image) for i in range(self.refs)]
        return dar.TokenLayout(ref=ref, gen=[(self.text, start)], image_shapes=[(self.grid, self.grid)] * self.refs)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    cls_name: str  # attribute of diffusers
    full: dict  # constructor kwargs of the published configuration (defaults spelled out)
    quick: dict  # a tiny configuration for the CPU smoke run
    tokens_full: Tokens
    tokens_quick: Tokens
    inputs: Callable  # (config, tokens, device, dtype) -> forward kwargs


def _qwen_inputs(cfg: dict, t: Tokens, device, dtype) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    return {
        "hidden_states": torch.randn(t.batch, t.image * (1 + t.refs), cfg["in_channels"], generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(t.batch, t.text, cfg["joint_attention_dim"], generator=g).to(device, dtype),
        "timestep": torch.full((t.batch,), 0.5, device=device, dtype=dtype),
        "img_shapes": [[(1, t.grid, t.grid)] * (1 + t.refs)] * t.batch,
        "return_dict": False,
    }


def _flux2_inputs(cfg: dict, t: Tokens, device, dtype) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    # Position ids as the FLUX.2 pipeline builds them: (T, H, W, L); the generated image has T = 0,
    # reference i has T = 10 + 10 i; text tokens count along L.
    hh, ww = torch.meshgrid(torch.arange(t.grid), torch.arange(t.grid), indexing="ij")
    grid = torch.stack([hh.flatten(), ww.flatten()], dim=-1)
    blocks = []
    for i in range(1 + t.refs):
        tcol = torch.full((t.image, 1), 0 if i == 0 else 10 + 10 * (i - 1))
        blocks.append(torch.cat([tcol, grid, torch.zeros(t.image, 1, dtype=grid.dtype)], dim=-1))
    img_ids = torch.cat(blocks)[None].expand(t.batch, -1, -1).to(device)
    txt_ids = torch.zeros(t.batch, t.text, 4, dtype=torch.long)
    txt_ids[..., 3] = torch.arange(t.text)
    kw = {
        "hidden_states": torch.randn(t.batch, t.image * (1 + t.refs), cfg["in_channels"], generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(t.batch, t.text, cfg["joint_attention_dim"], generator=g).to(device, dtype),
        "timestep": torch.full((t.batch,), 0.5, device=device, dtype=dtype),
        "img_ids": img_ids, "txt_ids": txt_ids.to(device), "return_dict": False,
    }
    if cfg.get("guidance_embeds", True):
        kw["guidance"] = torch.full((t.batch,), 4.0, device=device, dtype=dtype)
    return kw


MODELS = {
    "qwen-image-edit": ModelSpec(
        "qwen-image-edit",
        "QwenImageTransformer2DModel, published config (60 layers, 24 heads x 128, joint_attention_dim 3584), "
        "random weights, bf16; 1024^2 output with 3 references (4096 tokens each), 200 text tokens, CFG batch 2",
        "QwenImageTransformer2DModel",
        full=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
        quick=dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=32,
                   num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(8, 12, 12)),
        tokens_full=Tokens(batch=2, text=200, grid=64, refs=3),  # 64x64 = 4096 tokens per 1024^2 image
        tokens_quick=Tokens(batch=2, text=4, grid=4, refs=3),
        inputs=_qwen_inputs,
    ),
    "flux2": ModelSpec(
        "flux2",
        "Flux2Transformer2DModel, diffusers defaults = FLUX.2 [dev] (8 double + 48 single blocks, 48 heads x 128, "
        "joint_attention_dim 15360), random weights, bf16; 1024^2 output with 4 references, 512 text tokens, batch 1",
        "Flux2Transformer2DModel",
        full=dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                  num_attention_heads=48, joint_attention_dim=15360, axes_dims_rope=(32, 32, 32, 32)),
        quick=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
                   num_attention_heads=2, joint_attention_dim=64, timestep_guidance_channels=32,
                   axes_dims_rope=(8, 8, 8, 8)),
        tokens_full=Tokens(batch=1, text=512, grid=64, refs=4),
        tokens_quick=Tokens(batch=1, text=4, grid=4, refs=3),
        inputs=_flux2_inputs,
    ),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _build(spec: ModelSpec, config: dict, device, dtype) -> torch.nn.Module:
    import diffusers

    cls = getattr(diffusers, spec.cls_name)
    prev = torch.get_default_dtype()
    # Parameters are created directly in the target dtype on the target device: the 20-30B
    # parameter models do not fit in float32 on one GPU.
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False)


def binding_available() -> str | None:
    """None when the diffusers binding imports, else why not."""
    try:
        importlib.import_module("dar.bindings.diffusers")
    except ImportError as exc:
        return f"dar.bindings.diffusers cannot be imported: {exc}"
    return None


@contextlib.contextmanager
def patched_dispatch(model, layout, seq: int, cfg, backend: str, counter: list):
    """Route the model's joint attention (sequence length ``seq``) through `dar.dar_attention`."""
    mod = sys.modules[type(model).__module__]
    original = mod.dispatch_attention_fn

    def dar_dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False, attention_kwargs=None, **kw):
        if query.shape[1] != seq or key.shape[1] != seq or dropout_p or is_causal:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa, attention_kwargs=attention_kwargs, **kw)
        counter[0] += 1
        # diffusers passes (B, L, H, D); dar takes SDPA's (B, H, L, D) and accepts the strided view.
        out = dar.dar_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), layout, cfg,
                                attn_mask=attn_mask, scale=scale, backend=backend)
        return out.transpose(1, 2)

    mod.dispatch_attention_fn = dar_dispatch
    try:
        yield
    finally:
        mod.dispatch_attention_fn = original


def _timed(model, kwargs, device, warmup, reps) -> tuple[dict, torch.Tensor]:
    """Time denoising steps; also return the last step's output (no extra step for it)."""
    last = []

    def step():
        out = model(**kwargs)[0]
        last[:] = [out]
        return out

    with torch.no_grad():
        timing = measure(step, device, warmup, reps)
    return {"status": "ok", **timing.summary()}, last[0].float()


def _run_model(spec: ModelSpec, device, cfg, quick: bool, backends, via: str, warmup: int, reps: int) -> dict:
    config = spec.quick if quick else spec.full
    tokens = spec.tokens_quick if quick else spec.tokens_full
    dtype = torch.float32 if quick else torch.bfloat16
    rec = {"name": spec.name, "description": spec.description if not quick else
           f"tiny {spec.cls_name} for the CPU smoke run ({config}), fp32",
           "config": config, "dtype": str(dtype).removeprefix("torch."),
           "tokens": dataclasses.asdict(tokens) | {"seq": tokens.seq}, "runs": []}
    try:
        model = _build(spec, config, device, dtype)
        kwargs = spec.inputs(config, tokens, device, dtype)
    except torch.cuda.OutOfMemoryError as exc:
        return {**rec, "status": "oom", "reason": f"building the model: {str(exc).splitlines()[0]}"}
    except Exception as exc:
        return {**rec, "status": "error", "reason": f"building the model: {type(exc).__name__}: {exc}"[:500]}
    rec["parameters"] = sum(p.numel() for p in model.parameters())
    layout = tokens.layout()
    _log(f"e2e {spec.name}: {rec['parameters']:,} parameters, L={tokens.seq}, batch {tokens.batch}")
    outs = {}
    try:
        run, outs["off"] = _timed(model, kwargs, device, warmup, reps)
        rec["runs"].append({"backend": "off", "via": "diffusers default attention", **run})
    except torch.cuda.OutOfMemoryError as exc:
        return {**rec, "status": "oom", "reason": f"DAR-off step: {str(exc).splitlines()[0]}"}
    _log(f"  off      {run['median_ms']:10.2f} ms")
    for name in backends:
        row = {"backend": name, "via": via}
        impl = IMPLS[f"dar-{name}"]
        # Interpreted kernels (triton on CPU) take seconds per call: one untimed-warm-up step only.
        w_n, r_n = (0, 1) if impl.interpreted(device) else (warmup, reps)
        row["interpreted"] = impl.interpreted(device)
        try:
            impl.prepare()
            if via == "dar.enable":
                handle = dar.enable(model, cfg, backend=name)
                try:
                    run, out = _timed(model, kwargs, device, w_n, r_n)
                finally:
                    dar.disable(model)
                row["handle"] = type(handle).__name__
            else:
                counter = [0]
                with patched_dispatch(model, layout, tokens.seq, cfg, name, counter):
                    run, out = _timed(model, kwargs, device, w_n, r_n)
                row["dar_calls"] = counter[0]
                if counter[0] == 0:
                    raise RuntimeError("no attention call matched the joint sequence: DAR never ran")
            row.update(run)
            outs[name] = out
            row["finite"] = bool(torch.isfinite(out).all())
            row["max_abs_diff_vs_off"] = (out - outs["off"]).abs().max().item()
            # DAR changes the output; an identical output means it never ran.
            row["dar_changed_output"] = row["max_abs_diff_vs_off"] > 0
            _log(f"  {name:<8} {run['median_ms']:10.2f} ms")
        except Unavailable as exc:
            row.update(status="unavailable", reason=str(exc))
        except torch.cuda.OutOfMemoryError as exc:
            row.update(status="oom", reason=str(exc).splitlines()[0][:300])
        except Exception as exc:  # recorded; the other backends still run
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
        if row["status"] != "ok":
            _log(f"  {name:<8} {row['status']}: {row['reason']}")
        rec["runs"].append(row)
    off = rec["runs"][0]["median_ms"]
    for row in rec["runs"]:
        row["ratio_vs_off"] = row["median_ms"] / off if row["status"] == "ok" else None
    if "torch" in outs:
        for row in rec["runs"]:
            if row["status"] == "ok" and row["backend"] not in ("off", "torch"):
                row["max_abs_diff_vs_torch"] = (outs[row["backend"]] - outs["torch"]).abs().max().item()
    del model, kwargs, outs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {**rec, "status": "ok"}


def run(device: torch.device, cfg, *, quick: bool, models=None, backends=None, warmup: int, reps: int, mode: str,
        via: str | None = None) -> dict:
    models = list(models or MODELS)
    for m in models:
        if m not in MODELS:
            raise ValueError(f"--model {m!r} is not one of {sorted(MODELS)}")
    backends = list(backends or DEFAULT_BACKENDS)
    for b in backends:
        if f"dar-{b}" not in IMPLS:
            raise ValueError(f"--backend {b!r} is not one of {list(DEFAULT_BACKENDS)}")
    if via is None:
        why = binding_available()
        via = "dar.enable" if why is None else "patch"
    elif via not in ("dar.enable", "patch"):
        raise ValueError(f"via must be 'dar.enable' or 'patch', got {via!r}")
    result = env.header(device, "e2e", mode)
    result["config"] = {"dar": dataclasses.asdict(cfg), "warmup": warmup, "reps": reps, "via": via,
                        "binding": binding_available() or "available",
                        "timer": "cuda-event" if device.type == "cuda" else "perf_counter", "target_ratio": 1.03}
    result["models"] = [_run_model(MODELS[m], device, cfg, quick, backends, via, warmup, reps) for m in models]
    return result
