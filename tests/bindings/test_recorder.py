"""dar.Recorder: statistics against an independent float64 computation, summary and heatmap PNG."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import dar
from dar.bindings.recorder import Recorder, near_square_shape

HQ, HK, D = 4, 2, 8
TXT = 5


def _layouts():
    # Row 0: text, 4x4 generated, refs 3x4 and 2x5; row 1: a different reference set (batch rows differ).
    gen = (TXT, TXT + 16)
    row0 = dar.TokenLayout(ref=[(21, 33), (33, 43)], gen=[gen], image_shapes=[(3, 4), (2, 5)])
    row1 = dar.TokenLayout(ref=[(21, 27), (30, 39)], gen=[gen], image_shapes=[(2, 3), (3, 3)])
    return [row0, row1], 43


def _inputs(seed=0, lk=43):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, HQ, lk, D, generator=g)
    k = torch.randn(2, HK, lk, D, generator=g) * 1.7
    v = torch.randn(2, HK, lk, D, generator=g)
    # Key padding: row 1 masks two text keys and one reference key.
    mask = torch.ones(2, 1, 1, lk, dtype=torch.bool)
    mask[1, 0, 0, [0, 3, 35]] = False
    return q, k, v, mask


def _samples(gen, m_max, sampling, seed):
    p = [i for s, e in gen for i in range(s, e)]
    m = min(m_max, len(p))
    if sampling == "strided":
        pos = [math.floor((j + 0.5) * len(p) / m) for j in range(m)]
    else:
        perm = torch.randperm(len(p), generator=torch.Generator().manual_seed(seed))
        pos = sorted(perm[:m].tolist())
    return [p[i] for i in pos]


def _expected(q, k, layouts, cfg, mask, scale):
    """Per row: r, r̂, w and the rebalanced mass on every key, all float64, written from the spec."""
    q, k = q.double(), k.double()
    out = []
    for b, lay in enumerate(layouts):
        rows = _samples(lay.gen, cfg.num_samples, cfg.sampling, cfg.seed)
        allowed = mask[b, 0, 0]
        kk = k[b].repeat_interleave(HQ // HK, dim=0)  # (Hq, Lk, D)
        logits = scale * torch.einsum("hmd,hkd->hmk", q[b][:, rows], kk)
        bias = torch.where(allowed, 0.0, float("-inf")).double()
        r = torch.softmax(logits + bias, dim=-1).sum(dim=(0, 1))
        groups = [list(range(s, e)) for s, e in lay.ref]
        if cfg.normalize == "joint":
            groups = [[i for g in groups for i in g]]
        rhat = torch.full_like(r, float("nan"))
        w = torch.ones_like(r)
        for g in groups:
            g = [i for i in g if allowed[i]]
            vals = r[g]
            lo, hi = vals.min(), vals.max()
            rh = (vals - lo) / (hi - lo)
            rhat[g] = rh
            one = torch.ones_like(rh)
            w[g] = torch.where(rh >= cfg.tau_high, one * (1 + cfg.gamma),
                               torch.where(rh <= cfg.tau_low, one * (1 - cfg.gamma), one))
        if cfg.mode == "key_scale":
            logits_w = logits * w
        else:
            logits_w = logits + torch.log(w)
        after = torch.softmax(logits_w + bias, dim=-1).sum(dim=(0, 1))
        out.append(dict(r=r, rhat=rhat, w=w, after=after, m=len(rows)))
    return out


@pytest.mark.parametrize("sampling,normalize,mode", [("random", "joint", "key_scale"),
                                                     ("strided", "per_image", "prob_scale")])
@pytest.mark.parametrize("pass_weights", [False, True])
def test_observe_matches_float64(sampling, normalize, mode, pass_weights):
    layouts, lk = _layouts()
    q, k, v, mask = _inputs(lk=lk)
    cfg = dar.DARConfig(num_samples=7, gamma=0.3, tau_high=0.6, tau_low=0.35, sampling=sampling, seed=3,
                        normalize=normalize, mode=mode)
    scale = 0.4
    out, w = dar.dar_attention(q, k, v, layouts, cfg, mask, scale, backend="reference", return_weights=True)
    rec = Recorder()
    rec.observe(layer=2, layer_name="transformer_blocks.2.attn", step=1, timestep=0.75, q=q, k=k, v=v,
                layout=layouts, config=cfg, attn_mask=mask, scale=scale, weights=w if pass_weights else None,
                output=out)
    exp = _expected(q, k, layouts, cfg, mask, scale)
    assert len(rec) == 2 and rec.steps == [1] and rec.layers == [2]
    checked_w = 0
    for b, (lay, e) in enumerate(zip(layouts, exp)):
        entry = rec.get(1, 2, row=b)
        assert (entry.step, entry.layer, entry.row, entry.call, entry.batch_row) == (1, 2, b, 0, b)
        assert entry.timestep == 0.75 and entry.layer_name == "transformer_blocks.2.attn"
        assert entry.num_samples == e["m"] == 7
        norm = e["m"] * HQ
        for i, ((s, t), hw) in enumerate(zip(lay.ref, lay.image_shapes)):
            ref = entry.refs[i]
            assert ref.shape == hw and ref.mass_before.shape == hw and ref.weight.shape == hw
            # Row-major reshape of the key range onto the image's token grid.
            torch.testing.assert_close(ref.mass_before.reshape(-1).double(), e["r"][s:t] / norm, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(ref.mass_after.reshape(-1).double(), e["after"][s:t] / norm,
                                       rtol=1e-4, atol=1e-7)
            got_rhat, want_rhat = ref.rhat.reshape(-1).double(), e["rhat"][s:t]
            assert torch.equal(torch.isnan(got_rhat), torch.isnan(want_rhat))
            ok = ~torch.isnan(want_rhat)
            torch.testing.assert_close(got_rhat[ok], want_rhat[ok], rtol=0, atol=1e-4)
            # Weights are compared away from the thresholds only (hard comparisons, see TEAM notes).
            far = ok & ((want_rhat - cfg.tau_high).abs() > 1e-4) & ((want_rhat - cfg.tau_low).abs() > 1e-4)
            torch.testing.assert_close(ref.weight.reshape(-1).double()[far], e["w"][s:t][far], rtol=0, atol=1e-6)
            checked_w += int(far.sum())
            assert math.isclose(ref.total_before, float(e["r"][s:t].sum() / norm), rel_tol=1e-4)
        # The rebalancing did something on this data: some keys boosted, some damped.
        assert 0 < entry.frac_boosted < 1 and 0 < entry.frac_suppressed < 1
        all_w = torch.cat([r.weight.reshape(-1) for r in entry.refs])
        assert math.isclose(entry.mean_weight, float(all_w.mean()), rel_tol=1e-6)
    assert checked_w >= 30
    # The masked reference key of row 1 is outside R: r̂ NaN, weight 1, no mass.
    masked = rec.get(1, 2, row=1).refs[1]
    assert math.isnan(float(masked.rhat.reshape(-1)[35 - 30])) and float(masked.weight.reshape(-1)[5]) == 1.0
    assert float(masked.mass_before.reshape(-1)[5]) == 0.0


def test_gamma_zero_records_unit_weights_and_unchanged_mass():
    layouts, lk = _layouts()
    q, k, v, mask = _inputs(1, lk)
    cfg = dar.DARConfig(num_samples=5, gamma=0.0)
    rec = Recorder()
    rec.observe(layer=0, layer_name="l0", step=0, timestep=None, q=q, k=k, v=v, layout=layouts, config=cfg,
                attn_mask=mask, scale=1 / math.sqrt(D), weights=None, output=None)
    for entry in rec.entries:
        assert entry.frac_boosted == entry.frac_suppressed == 0.0 and entry.mean_weight == 1.0
        for ref in entry.refs:
            torch.testing.assert_close(ref.mass_after, ref.mass_before)


def test_causal_calls_hide_later_reference_keys():
    # The sampled queries (rows 5..20) come before every reference key (21..42): under SDPA's causal
    # rule they cannot see them, so no reference mass, a degenerate group, and unit weights.
    layouts, lk = _layouts()
    q, k, v, _ = _inputs(2, lk)
    cfg = dar.DARConfig(num_samples=6, gamma=0.3)
    rec = Recorder()
    for causal in (False, True):
        rec.observe(layer=0, layer_name="l0", step=int(causal), timestep=None, q=q, k=k, v=v, layout=layouts,
                    config=cfg, attn_mask=None, scale=0.3, weights=None, output=None, is_causal=causal)
    plain, causal = rec.get(0, 0), rec.get(1, 0)
    assert all(r.total_before > 0 for r in plain.refs) and plain.frac_boosted > 0
    assert all(r.total_before == 0 and r.total_after == 0 for r in causal.refs)
    assert causal.mean_weight == 1.0 and all(torch.isnan(r.rhat).all() for r in causal.refs)


def _observe(rec, step, layer, seed, layout=None, cfg=None):
    layouts, lk = _layouts()
    q, k, v, mask = _inputs(seed, lk)
    cfg = cfg or dar.DARConfig(num_samples=6, gamma=0.25)
    rec.observe(layer=layer, layer_name=f"blocks.{layer}", step=step, timestep=1.0 - 0.1 * step, q=q, k=k, v=v,
                layout=layouts if layout is None else layout, config=cfg, attn_mask=mask, scale=0.35,
                weights=None, output=None)


def test_rows_follow_observation_order_and_filters():
    rec = Recorder(layers=[1, 2], steps=lambda s: s < 2)
    for step in range(3):
        for layer in range(3):
            _observe(rec, step, layer, seed=10 * step + layer)
            _observe(rec, step, layer, seed=100 + 10 * step + layer)  # e.g. the unconditional CFG pass
    assert rec.steps == [0, 1] and rec.layers == [1, 2]
    rows = rec.rows(1, 2)
    assert [(e.row, e.call, e.batch_row) for e in rows] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    # Two calls with different inputs give different statistics.
    assert not torch.equal(rows[0].refs[0].mass_before, rows[2].refs[0].mass_before)
    with pytest.raises(KeyError, match="row=4"):
        rec.get(1, 2, row=4)
    assert len(rec.select(rows=0)) == 4 and len(rec.select(steps=0, layers=1)) == 4
    rec.clear()
    assert len(rec) == 0 and rec.summary() == "(dar.Recorder: nothing recorded)"
    with pytest.raises(TypeError, match="layers"):
        Recorder(layers=1.5)


def test_missing_image_shapes_warn_once_and_use_near_square_grids():
    assert near_square_shape(12) == (3, 4) and near_square_shape(13) == (1, 13) and near_square_shape(16) == (4, 4)
    lay = dar.TokenLayout(ref=[(21, 33), (33, 43)], gen=[(TXT, TXT + 16)])
    rec = Recorder()
    with pytest.warns(UserWarning, match="no image_shapes"):
        _observe(rec, 0, 0, 0, layout=lay)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _observe(rec, 1, 0, 1, layout=lay)
    entry = rec.get(0, 0)
    assert entry.shapes_guessed and [r.shape for r in entry.refs] == [(3, 4), (2, 5)]


def test_summary_and_records():
    rec = Recorder()
    for step in range(2):
        for layer in range(2):
            _observe(rec, step, layer, seed=step * 7 + layer)
    recs = rec.records()
    assert len(recs) == 8 and {"step", "layer", "row", "mean_w", "frac_boosted", "frac_suppressed",
                                "mass_before", "mass_after"} <= set(recs[0])
    table = rec.summary()
    lines = table.splitlines()
    assert lines[0].split()[:6] == ["step", "layer", "row", "mean_w", "boost%", "supp%"]
    assert len(lines) == 2 + 8
    first = recs[0]
    assert f"{first['mean_w']:.4f}" in lines[2]
    assert f"{first['mass_before'][0]:.4f}->{first['mass_after'][0]:.4f}" in lines[2]
    by_layer = rec.summary(group_by="layer").splitlines()
    assert by_layer[0].split()[:2] == ["layer", "n"] and len(by_layer) == 2 + 2
    mean_w_layer0 = sum(r["mean_w"] for r in recs if r["layer"] == 0) / 4
    assert f"{mean_w_layer0:.4f}" in by_layer[2]
    with pytest.raises(ValueError, match="group_by"):
        rec.summary(group_by="head")


def test_plot_heatmaps_writes_png(tmp_path):
    from PIL import Image

    from dar.tiny import synthetic_reference_images

    rec = Recorder()
    for step in range(2):
        _observe(rec, step, 0, seed=step)
    images = synthetic_reference_images(48)[:2]
    path = rec.plot_heatmaps(images=images, path=tmp_path / "sub" / "maps.png", step=None, layers=[0], row=0)
    data = (tmp_path / "sub" / "maps.png").read_bytes()
    assert path == str(tmp_path / "sub" / "maps.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    with Image.open(tmp_path / "sub" / "maps.png") as im:
        assert im.width > 800 and im.height > 400
    maps = rec.reference_maps(step=None, layers=[0], row=0)
    assert [m["shape"] for m in maps] == [(3, 4), (2, 5)]
    mean_before = (rec.get(0, 0).refs[0].mass_before + rec.get(1, 0).refs[0].mass_before) / 2
    torch.testing.assert_close(maps[0]["before"], mean_before)
    with pytest.raises(ValueError, match="2 reference images"):
        rec.plot_heatmaps(images=images[:1], path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="no entry"):
        rec.plot_heatmaps(images=images, path=tmp_path / "x.png", step=5)
