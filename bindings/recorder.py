"""`Recorder`: what DAR did, per denoising step and attention layer, for inspection and figures.

Pass a recorder to ``dar.enable(..., recorder=rec)``. After every rebalanced attention call the
binding calls `Recorder.observe`; the recorder scores the call's sampled queries itself (``m x Lk``
per head, never ``Lq x Lk``) and keeps, per batch row and reference image, on the CPU:

- ``mass_before`` / ``mass_after``: the attention the sampled queries put on each reference key
  without and with the key weights, averaged over sampled queries and heads (so a key's value is the
  mean softmax probability it receives, and an image's sum is the fraction of attention it gets);
- ``rhat`` (the min-max normalised score r̂) and ``weight`` (w),

each reshaped to the reference image's token grid. `summary` tabulates them, `plot_heatmaps` draws
them over the reference images. `call_counts` says how many attention calls of the enabled models
were rebalanced and how many ran unchanged, by reason (a binding reports those through `passed`).
Recording is an inspection path: it synchronises with the device.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import warnings
from typing import Callable, Sequence

import torch

from dar.call import DARCall, make_call
from dar.config import DARConfig
from dar.scoring import key_statistics

@dataclasses.dataclass(frozen=True)
class RefImageStats:
    """Statistics of one reference image in one row of one call; maps are (h, w) float32 CPU tensors."""

    shape: tuple[int, int]
    mass_before: torch.Tensor
    mass_after: torch.Tensor
    rhat: torch.Tensor
    weight: torch.Tensor

    @property
    def total_before(self) -> float:
        """Fraction of the sampled queries' attention that goes to this image, without DAR."""
        return float(self.mass_before.sum())

    @property
    def total_after(self) -> float:
        """The same with the key weights applied."""
        return float(self.mass_after.sum())


@dataclasses.dataclass(frozen=True)
class RecordEntry:
    """One batch row of one observed attention call.

    ``row`` numbers the rows observed at this (step, layer) in observation order: with a pipeline that
    runs the conditional and unconditional CFG passes as two calls (Qwen-Image-Edit) row 0 is the
    conditional pass and row 1 the unconditional one; with batched CFG they are the batch rows.
    ``call`` is the index of the call at this (step, layer) and ``batch_row`` the row inside it.
    """

    step: int
    layer: int
    layer_name: str
    timestep: float | None
    row: int
    call: int
    batch_row: int
    gamma: float
    num_samples: int
    refs: tuple[RefImageStats, ...]
    shapes_guessed: bool

    def _ref_keys(self, name: str) -> torch.Tensor:
        return torch.cat([getattr(r, name).reshape(-1) for r in self.refs]) if self.refs else torch.zeros(0)

    @property
    def mean_weight(self) -> float:
        w = self._ref_keys("weight")
        return float(w.mean()) if w.numel() else 1.0

    @property
    def frac_boosted(self) -> float:
        w = self._ref_keys("weight")
        return float((w > 1.0).float().mean()) if w.numel() else 0.0

    @property
    def frac_suppressed(self) -> float:
        w = self._ref_keys("weight")
        return float((w < 1.0).float().mean()) if w.numel() else 0.0

    def as_dict(self) -> dict:
        """Scalar view of the entry (one row of `Recorder.records`)."""
        return {
            "step": self.step, "layer": self.layer, "layer_name": self.layer_name, "timestep": self.timestep,
            "row": self.row, "call": self.call, "batch_row": self.batch_row, "gamma": self.gamma,
            "num_samples": self.num_samples, "mean_w": self.mean_weight, "frac_boosted": self.frac_boosted,
            "frac_suppressed": self.frac_suppressed,
            "mass_before": tuple(r.total_before for r in self.refs),
            "mass_after": tuple(r.total_after for r in self.refs),
        }


@dataclasses.dataclass(frozen=True)
class CallCounts:
    """Attention calls of the enabled models since the recorder was created or cleared.

    ``rebalanced``: calls that ran DAR; ``passed``: calls that ran unchanged; ``reasons``: how many
    calls passed for each reason (e.g. "layer not selected", "reference self-attention of the
    KV-cache extract pass"). Every call is counted, whatever the recorder's steps / layers filters.
    """

    rebalanced: int
    passed: int
    reasons: dict

    def __str__(self) -> str:
        lines = [f"{self.rebalanced} attention calls rebalanced, {self.passed} passed through"]
        lines += [f"  {n:>6}  {reason}" for reason, n in sorted(self.reasons.items(), key=lambda x: -x[1])]
        return "\n".join(lines)


def _selector(name: str, sel) -> Callable[[int], bool]:
    """None -> everything; an int, an iterable of ints, or a predicate over the index."""
    if sel is None:
        return lambda i: True
    if callable(sel):
        return sel
    if isinstance(sel, bool):
        raise TypeError(f"{name} must be None, an int, a collection of ints or a callable, got a bool")
    if isinstance(sel, int):
        return lambda i: i == sel
    try:
        chosen = frozenset(int(i) for i in sel)
    except TypeError:
        raise TypeError(f"{name} must be None, an int, a collection of ints or a callable, got {sel!r}") from None
    return lambda i: i in chosen


def near_square_shape(n: int) -> tuple[int, int]:
    """(h, w) with h * w == n and h the largest divisor of n not above sqrt(n)."""
    h = int(math.isqrt(n))
    while n % h:
        h -= 1
    return h, n // h


def weighted_sampled_mass(call: DARCall, weights: torch.Tensor | None) -> torch.Tensor:
    """(B, Lk) float32: attention of the call's sampled queries per key, summed over samples and heads.

    ``weights`` (B, Lk) are applied as the config's mode does (``key_scale``: logits times w;
    ``prob_scale``: plus ln w); None gives the plain attention. Sizes are ``B x Hq x m x Lk``.
    """
    q, k = call.q, call.k
    b, hq, _, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    rows = call.plan.tensors(q.device).samples.long()
    valid = rows >= 0
    rows = rows.clamp(min=0)
    m = rows.shape[1]
    qs = q.gather(2, rows[:, None, :, None].expand(b, hq, m, d)).float()
    qs = qs.reshape(b, hk, call.groups_per_kv * m, d)
    logits = torch.matmul(qs, k.float().transpose(-1, -2)).reshape(b, hq, m, lk) * call.scale
    if weights is not None:
        w = weights.to(device=q.device, dtype=torch.float32)[:, None, None, :]
        logits = logits * w if call.cfg.mode == "key_scale" else logits + torch.log(w)
    bias = call.mask.rows_bias(rows, hq)
    if bias is not None:
        logits = logits + bias
    # Rows with no allowed key carry no attention (as SDPA outputs zeros for them).
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(logits - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return (p * valid[:, None, :, None]).sum(dim=(1, 2))


class Recorder:
    """Collects DAR statistics per (step, layer) while a model runs with ``dar.enable(..., recorder=...)``.

    Args:
        steps, layers: which denoising steps / attention layers to keep (None = all; an int, a
            collection of ints or a predicate). Per-key maps take ``4 x (reference tokens) x 4`` bytes
            per row, step and layer, so restrict these for long runs of large models.
    """

    def __init__(self, steps=None, layers=None):
        self._keep_step = _selector("steps", steps)
        self._keep_layer = _selector("layers", layers)
        self._entries: dict[tuple[int, int], list[RecordEntry]] = {}
        self._calls: dict[tuple[int, int], int] = {}
        self._rebalanced = 0
        self._passed: collections.Counter = collections.Counter()
        self._warned_shapes = False

    # ------------------------------------------------------------------ collection

    # Recording copies to the CPU; under torch.compile it runs eagerly instead of being traced.
    @torch.compiler.disable
    def observe(self, *, layer: int, layer_name: str, step: int, timestep: float | None, q: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, layout, config: DARConfig, attn_mask: torch.Tensor | None,
                scale: float, weights: torch.Tensor | None, output: torch.Tensor | None,
                is_causal: bool = False) -> None:
        """Record one rebalanced attention call (called by the binding; q/k/v in SDPA layout).

        ``weights`` are the key weights the call applied (B, Lk); when None they are recomputed here.
        ``v`` and ``output`` are accepted for the binding's convenience and not stored. ``is_causal``
        is the call's SDPA flag (as in `dar.dar_attention`).
        """
        step, layer = int(step), int(layer)
        self._rebalanced += 1
        if not (self._keep_step(step) and self._keep_layer(layer)):
            return
        call, mass, rhat, after, w = self._statistics(q, k, layout, config, attn_mask, scale, is_causal, weights)
        rows = [(b, lay, len(call.plan.samples[b]), mass[b], after[b], rhat[b], w[b]) for b, lay in enumerate(call.layouts)]
        self._append(step, layer, layer_name, timestep, config, q.shape[1], rows)

    @torch.compiler.disable
    def observe_packed(self, *, layer: int, layer_name: str, step: int, timestep: float | None, q: torch.Tensor,
                       k: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, layouts,
                       config: DARConfig, scale: float, weights: torch.Tensor | None, causal: bool = False) -> None:
        """Record one rebalanced packed (``flash_attn_varlen_func``) call: ``q (total_q, Hq, D)``,
        ``k (total_k, Hk, D)``, one layout per sequence, ``weights (total_k,)`` or None. Sequence ``n``
        is ``batch_row`` n of the call; ``causal`` is flash-attn's bottom-right rule."""
        from dar.varlen.reference import bottom_right_causal

        step, layer = int(step), int(layer)
        self._rebalanced += 1
        if not (self._keep_step(step) and self._keep_layer(layer)):
            return
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        rows = []
        for n, lay in enumerate(layouts):
            q0, q1, k0, k1 = cq[n], cq[n + 1], ck[n], ck[n + 1]
            if q1 == q0 or k1 == k0:
                continue
            qn, kn = q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None]
            mask = bottom_right_causal(q1 - q0, k1 - k0, q.device) if causal else None
            wn = weights[k0:k1][None] if weights is not None else None
            call, mass, rhat, after, w = self._statistics(qn, kn, lay, config, mask, scale, False, wn)
            rows.append((n, lay, len(call.plan.samples[0]), mass[0], after[0], rhat[0], w[0]))
        self._append(step, layer, layer_name, timestep, config, q.shape[1], rows)

    @staticmethod
    def _statistics(q, k, layout, config, attn_mask, scale, is_causal, weights):
        """The call and its per-key mass before / after, r̂ and w, on the CPU."""
        with torch.no_grad():
            call = make_call(q, k, None, layout, config, attn_mask, scale, bool(is_causal))
            stats = key_statistics(call)
            w = stats.weight if weights is None else weights.detach().to(device=q.device, dtype=torch.float32)
            if tuple(w.shape) != (q.shape[0], k.shape[2]):
                raise ValueError(f"weights must have shape (B, Lk) = {(q.shape[0], k.shape[2])}, got {tuple(w.shape)}")
            after = weighted_sampled_mass(call, w)
        return call, stats.mass.cpu(), stats.rhat.cpu(), after.cpu(), w.cpu()

    def _append(self, step, layer, layer_name, timestep, config, hq, rows) -> None:
        """One `RecordEntry` per row ``(batch_row, layout, samples, mass, after, rhat, w)`` of one call."""
        key = (step, layer)
        call_idx = self._calls.get(key, 0)
        self._calls[key] = call_idx + 1
        entries = self._entries.setdefault(key, [])
        for b, lay, n, mass, after, rhat, w in rows:
            if n == 0 or not lay.ref:
                continue  # no sampled query or no reference image: nothing to show for this row
            norm = 1.0 / (n * hq)
            shapes, guessed = self._shapes(lay)
            refs = []
            for (s, e), hw in zip(lay.ref, shapes):
                refs.append(RefImageStats(
                    shape=hw,
                    mass_before=(mass[s:e] * norm).reshape(hw).clone(),
                    mass_after=(after[s:e] * norm).reshape(hw).clone(),
                    rhat=rhat[s:e].reshape(hw).clone(),
                    weight=w[s:e].reshape(hw).clone(),
                ))
            entries.append(RecordEntry(
                step=step, layer=layer, layer_name=str(layer_name),
                timestep=None if timestep is None else float(timestep), row=len(entries), call=call_idx,
                batch_row=b, gamma=float(config.gamma if config is not None else DARConfig().gamma),
                num_samples=n, refs=tuple(refs), shapes_guessed=guessed,
            ))

    def passed(self, *, layer: int, layer_name: str, step: int, reason: str) -> None:
        """Count one attention call of an enabled model that ran unchanged (called by the binding)."""
        self._passed[str(reason)] += 1

    def call_counts(self) -> CallCounts:
        """How many attention calls were rebalanced and how many passed through, and why."""
        return CallCounts(self._rebalanced, sum(self._passed.values()), dict(self._passed))

    def _shapes(self, lay) -> tuple[tuple[tuple[int, int], ...], bool]:
        if lay.image_shapes is not None:
            return lay.image_shapes, False
        if not self._warned_shapes:
            self._warned_shapes = True
            warnings.warn("dar.Recorder: the TokenLayout carries no image_shapes; reference maps use a near-square "
                          "token grid, which may not match the images' aspect ratio", stacklevel=3)
        return tuple(near_square_shape(e - s) for s, e in lay.ref), True

    def clear(self) -> None:
        """Forget everything recorded (e.g. between two pipeline runs: steps restart at 0)."""
        self._entries.clear()
        self._calls.clear()
        self._rebalanced = 0
        self._passed.clear()

    # ------------------------------------------------------------------ access

    def __repr__(self) -> str:
        return f"dar.Recorder({len(self)} entries, steps {self.steps}, layers {self.layers})"

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    @property
    def entries(self) -> list[RecordEntry]:
        """All entries ordered by step, layer and row."""
        return [e for key in sorted(self._entries) for e in self._entries[key]]

    @property
    def steps(self) -> list[int]:
        return sorted({s for s, _ in self._entries})

    @property
    def layers(self) -> list[int]:
        return sorted({lay for _, lay in self._entries})

    def rows(self, step: int, layer: int) -> list[RecordEntry]:
        """The entries of one (step, layer), by row."""
        return list(self._entries.get((int(step), int(layer)), ()))

    def get(self, step: int, layer: int, row: int = 0) -> RecordEntry:
        found = self._entries.get((int(step), int(layer)), ())
        if not 0 <= row < len(found):
            raise KeyError(f"no entry for step={step}, layer={layer}, row={row} (recorded rows: {len(found)})")
        return found[row]

    def select(self, steps=None, layers=None, rows=None) -> list[RecordEntry]:
        """Entries whose step, layer and row match the selectors (None = all)."""
        ks, kl, kr = _selector("steps", steps), _selector("layers", layers), _selector("rows", rows)
        return [e for e in self.entries if ks(e.step) and kl(e.layer) and kr(e.row)]

    # ------------------------------------------------------------------ reports

    def records(self, steps=None, layers=None, rows=None) -> list[dict]:
        """One dict of scalars per entry (see `RecordEntry.as_dict`)."""
        return [e.as_dict() for e in self.select(steps, layers, rows)]

    def summary(self, steps=None, layers=None, rows=None, group_by: str | None = None) -> str:
        """A text table per step/layer/row: mean w, % keys boosted / suppressed, mass per reference image.

        ``group_by="layer"`` or ``"step"`` averages the entries of each layer (or step) instead.
        Mass columns read ``before->after``: the share of the sampled queries' attention that lands on
        each reference image without and with DAR.
        """
        if group_by not in (None, "layer", "step"):
            raise ValueError(f"group_by must be None, 'layer' or 'step', got {group_by!r}")
        recs = self.records(steps, layers, rows)
        if not recs:
            counts = self.call_counts()
            return f"(dar.Recorder: nothing recorded; {counts})" if counts.rebalanced or counts.passed \
                else "(dar.Recorder: nothing recorded)"
        if group_by is not None:
            recs = _aggregate(recs, group_by)
        nref = max(len(r["mass_before"]) for r in recs)
        head = ["step", "layer", "row"] if group_by is None else [group_by, "n"]
        head += ["mean_w", "boost%", "supp%"] + [f"ref{i} mass" for i in range(nref)]
        lines = []
        for r in recs:
            cells = ([str(r["step"]), str(r["layer"]), str(r["row"])] if group_by is None
                     else [str(r[group_by]), str(r["n"])])
            cells += [f"{r['mean_w']:.4f}", f"{100 * r['frac_boosted']:.1f}", f"{100 * r['frac_suppressed']:.1f}"]
            for i in range(nref):
                if i < len(r["mass_before"]):
                    cells.append(f"{r['mass_before'][i]:.4f}->{r['mass_after'][i]:.4f}")
                else:
                    cells.append("-")
            lines.append(cells)
        widths = [max(len(h), *(len(c[j]) for c in lines)) for j, h in enumerate(head)]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*c) for c in lines]
        return "\n".join(out)

    def reference_maps(self, step=None, layers=None, row: int = 0) -> list[dict]:
        """Per reference image, maps averaged over the selected entries (the data behind `plot_heatmaps`).

        Returns one dict per reference image with ``before``, ``after``, ``rhat``, ``weight`` (mean
        maps), ``boosted`` / ``suppressed`` (fraction of entries in which each key was boosted /
        damped), ``mass_before`` / ``mass_after`` (mean share of attention) and ``shape``.
        """
        chosen = self.select(step, layers, row)
        if not chosen:
            raise ValueError(f"dar.Recorder has no entry for step={step!r}, layers={layers!r}, row={row!r} "
                             f"(recorded steps {self.steps}, layers {self.layers})")
        nref = len(chosen[0].refs)
        shapes = [r.shape for r in chosen[0].refs]
        if any([r.shape for r in e.refs] != shapes for e in chosen):
            raise ValueError("the selected entries have different reference images or token grids; "
                             "select one pipeline run (use Recorder.clear between runs)")
        out = []
        for i in range(nref):
            stack = {name: torch.stack([getattr(e.refs[i], name) for e in chosen])
                     for name in ("mass_before", "mass_after", "rhat", "weight")}
            out.append({
                "shape": shapes[i],
                "before": stack["mass_before"].mean(0), "after": stack["mass_after"].mean(0),
                "rhat": torch.nan_to_num(stack["rhat"], nan=0.0).mean(0), "weight": stack["weight"].mean(0),
                "boosted": (stack["weight"] > 1.0).float().mean(0),
                "suppressed": (stack["weight"] < 1.0).float().mean(0),
                "mass_before": float(stack["mass_before"].sum(dim=(1, 2)).mean()),
                "mass_after": float(stack["mass_after"].sum(dim=(1, 2)).mean()),
            })
        return out

    def plot_heatmaps(self, images: Sequence, path, step=None, layers=None, row: int = 0,
                      title: str | None = None, min_share: float = 0.5):
        """Write a PNG: per reference image, the image, its original and its rebalanced attention.

        ``images``: the reference images (PIL images or HxW(x3) arrays) in reference order. ``step`` /
        ``layers``: which entries to average (None = all recorded). Keys that DAR boosted in at least
        ``min_share`` of the averaged entries are outlined in solid lime and hatched, suppressed ones
        outlined in dashed cyan and dotted (with a single step and layer the marks are exactly DAR's weights).
        The last column is the relative change of each key's attention. Returns the path.
        """
        if not 0.0 < float(min_share) <= 1.0:
            raise ValueError(f"min_share must be in (0, 1], got {min_share!r}")
        maps = self.reference_maps(step, layers, row)
        if len(images) != len(maps):
            raise ValueError(f"images has {len(images)} entries but the recording has {len(maps)} reference images")
        chosen = self.select(step, layers, row)
        if title is None:
            steps = sorted({e.step for e in chosen})
            lays = sorted({e.layer for e in chosen})
            what = f"{_span('step', steps)}, {_span('layer', lays)}, row {row}"
            if len(chosen) > 1:
                what = f"mean over {what}"
            title = f"DAR attention on the reference images (gamma={chosen[0].gamma:g}): {what}"
        guessed = any(e.shapes_guessed for e in chosen)
        return _draw_heatmaps(images, maps, path, title, guessed, float(min_share), len(chosen))


def _span(name: str, values: list[int]) -> str:
    if len(values) == 1:
        return f"{name} {values[0]}"
    if values == list(range(values[0], values[-1] + 1)):
        return f"{name}s {values[0]}-{values[-1]}"
    return f"{len(values)} {name}s"


def _aggregate(recs: list[dict], by: str) -> list[dict]:
    groups: dict[int, list[dict]] = {}
    for r in recs:
        groups.setdefault(r[by], []).append(r)
    out = []
    for key in sorted(groups):
        g = groups[key]
        nref = max(len(r["mass_before"]) for r in g)

        def mean_mass(name, i):
            vals = [r[name][i] for r in g if i < len(r[name])]
            return sum(vals) / len(vals)

        out.append({
            by: key, "n": len(g),
            **{f: sum(r[f] for r in g) / len(g) for f in ("mean_w", "frac_boosted", "frac_suppressed")},
            "mass_before": tuple(mean_mass("mass_before", i) for i in range(nref)),
            "mass_after": tuple(mean_mass("mass_after", i) for i in range(nref)),
        })
    return out


# ---------------------------------------------------------------------- drawing

BOOST_COLOR = "#39ff14"  # lime: stands out on the inferno colormap and on most photos
SUPPRESS_COLOR = "#00e5ff"  # cyan


def _as_rgb(img):
    """A reference image as an HxWx3 float array in [0, 1] (PIL image, numpy array or CHW/HWC tensor)."""
    import numpy as np

    if isinstance(img, torch.Tensor):
        arr = img.detach().float().cpu()
        if arr.dim() == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.permute(1, 2, 0)
        arr = arr.numpy()
    elif hasattr(img, "convert"):  # PIL
        arr = np.asarray(img.convert("RGB"))
    else:
        arr = np.asarray(img)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be PIL images or HxW / HxWx3 arrays, got an array of shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3].astype(np.float32)
    if arr.max() > 1.0:
        arr = arr / 255.0
    return arr.clip(0.0, 1.0)


def _outline(ax, mask, extent, color, hatch, linestyle):
    """Hatch and outline the token cells where ``mask`` (h, w bool) holds, aligned to cell edges."""
    import numpy as np

    if not mask.any():
        return
    h, w = mask.shape
    f = max(1, 64 // max(h, w))  # upsample so contour lines follow the token cell borders
    up = np.kron(mask.astype(np.float32), np.ones((f, f), dtype=np.float32))
    up = np.pad(up, 1)  # closed contours at the image border
    width, height = extent[1], extent[2]
    xs = (np.arange(up.shape[1]) - 1 + 0.5) * width / (w * f)
    ys = (np.arange(up.shape[0]) - 1 + 0.5) * height / (h * f)
    import matplotlib

    if hatch:
        with matplotlib.rc_context({"hatch.color": color, "hatch.linewidth": 1.0}):
            ax.contourf(xs, ys, up, levels=[0.5, 2.0], colors="none", hatches=[hatch])
    ax.contour(xs, ys, up, levels=[0.5], colors=[color], linewidths=1.6, linestyles=linestyle)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)


def _draw_heatmaps(images, maps, path, title, guessed, min_share, n_avg):
    import os

    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = len(maps)
    fig = Figure(figsize=(15.5, 3.6 * n + 1.0), dpi=110)
    axes = fig.subplots(n, 4, squeeze=False)
    for i, (img, mp) in enumerate(zip(images, maps)):
        rgb = _as_rgb(img)
        hgt, wid = rgb.shape[:2]
        extent = (0, wid, hgt, 0)
        before = mp["before"].numpy()
        after = mp["after"].numpy()
        # A shared range for both panels, from the smallest to the largest value: with near-uniform
        # attention a range starting at 0 would show a flat colour.
        vmin = float(min(before.min(), after.min()))
        vmax = float(max(before.max(), after.max(), vmin + 1e-12))
        boosted = mp["boosted"].numpy() >= min_share
        suppressed = mp["suppressed"].numpy() >= min_share
        gh, gw = mp["shape"]
        ax = axes[i, 0]
        ax.imshow(rgb, extent=extent)
        ax.set_title(f"reference {i}  ({gh}x{gw} tokens)", fontsize=10)
        ax.set_ylabel(f"ref {i}", fontsize=11)
        gray = rgb.mean(axis=-1)
        for j, (name, data) in enumerate((("original attention", before), ("rebalanced attention (DAR)", after))):
            ax = axes[i, 1 + j]
            ax.imshow(gray, cmap="gray", extent=extent, vmin=0, vmax=1)
            im = ax.imshow(data, cmap="inferno", alpha=0.72, extent=extent, vmin=vmin, vmax=vmax,
                           interpolation="nearest")
            share = mp["mass_before"] if j == 0 else mp["mass_after"]
            ax.set_title(f"{name}\nshare of attention {share:.3f}", fontsize=10)
            if j == 1:
                # Suppressed keys are often the majority: a sparse dot pattern marks the inside of
                # their regions without hiding the map.
                _outline(ax, suppressed, extent, SUPPRESS_COLOR, ".", "dashed")
                _outline(ax, boosted, extent, BOOST_COLOR, "//", "solid")
                cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
                cb.set_label("mean attention per key", fontsize=8)
                cb.ax.tick_params(labelsize=7)
        ax = axes[i, 3]
        # Relative change per key, in percent; keys without attention (masked) count as unchanged.
        safe = np.where(before > 0, before, 1.0)
        diff = np.where(before > 0, (after - before) / safe * 100.0, 0.0)
        lim = float(max(np.abs(diff).max(), 1e-6))
        ax.imshow(gray, cmap="gray", extent=extent, vmin=0, vmax=1)
        im = ax.imshow(diff, cmap="RdBu_r", alpha=0.8, extent=extent, vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(f"change per key, rebalanced vs original\nshare {mp['mass_before']:.3f} -> {mp['mass_after']:.3f}",
                     fontsize=10)
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cb.set_label("% change", fontsize=8)
        cb.ax.tick_params(labelsize=7)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=12)
    handles = [Patch(facecolor="none", edgecolor=BOOST_COLOR, hatch="//", linewidth=1.6,
                     label="boosted keys (w = 1 + gamma): solid outline, hatched"),
               Patch(facecolor="none", edgecolor=SUPPRESS_COLOR, hatch=".", linewidth=1.6, linestyle="--",
                     label="suppressed keys (w = 1 - gamma): dashed outline, dotted")]
    note = "  |  token grid guessed (near-square): layout had no image_shapes" if guessed else ""
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=10, frameon=False,
               title=(f"marked where DAR set the weight in at least {min_share:.0%} of the {n_avg} averaged step/layer "
                      f"entries{note}" if n_avg > 1 else f"marks: DAR's key weights{note}"),
               title_fontsize=9)
    fig.tight_layout(rect=(0, 0.07 if n > 1 else 0.12, 1, 0.95))
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, facecolor="white")
    return path


__all__ = ["Recorder", "RecordEntry", "RefImageStats", "CallCounts", "near_square_shape", "weighted_sampled_mass"]
