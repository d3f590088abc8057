"""dar.enable under diffusers' context parallelism: a transformer forward with Ulysses, ring and both,
on gloo ranks, against the single-process DAR forward of the same model and inputs.

diffusers' ``enable_parallelism`` is called for real; only its device pick is replaced: it takes
``rank % torch.accelerator.device_count()``, and a CPU-only machine has no accelerator (the count is 0).
Everything else (the device mesh, the config's setup, the processors' parallel config, the CP
split/gather hooks, the Ulysses all-to-all and the ring loop) is diffusers' own code running over gloo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist

import dar
from dar import TokenLayout
from dar import parallel as dp
from tests.support.dist_harness import run_world

diffusers = pytest.importorskip("diffusers")
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel, OmniGenTransformer2DModel  # noqa: E402
from diffusers import QwenImageTransformer2DModel  # noqa: E402
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig  # noqa: E402

from dar.bindings.diffusers import parallel as bp  # noqa: E402

CFG = dar.DARConfig(gamma=0.5, num_samples=6, tau_high=0.6, tau_low=0.4)


def _has_unified() -> bool:
    try:
        ContextParallelConfig(ring_degree=2, ulysses_degree=2)
    except ValueError:  # diffusers 0.36 refuses Ulysses x ring ("Unified Ulysses-Ring attention ...")
        return False
    return True


UNIFIED = _has_unified()


@dataclasses.dataclass
class Case:
    model: torch.nn.Module
    kwargs: dict
    layouts: tuple  # written by hand, checked against what the binding derives
    text: int
    image: int


def _qwen(seed=0):
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=16,
                                        axes_dims_rope=(4, 6, 6)).eval().double()
    shapes = [[(1, 4, 4), (1, 4, 4), (1, 2, 4)], [(1, 4, 4), (1, 4, 6)]]
    text_mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3]).bool()  # padded text in row 1: a key-padding mask
    kwargs = dict(hidden_states=torch.randn(2, 40, 16).double(), encoder_hidden_states=torch.randn(2, 8, 16).double(),
                  encoder_hidden_states_mask=text_mask, timestep=torch.tensor([0.5, 0.5]).double(), img_shapes=shapes,
                  return_dict=False)
    if "txt_seq_lens" in inspect.signature(type(model).forward).parameters:  # diffusers < 0.37 requires it
        kwargs["txt_seq_lens"] = [8, 8]
    layouts = (TokenLayout(ref=[(24, 40), (40, 48)], gen=[(8, 24)]), TokenLayout(ref=[(24, 48)], gen=[(8, 24)]))
    return Case(model, kwargs, layouts, 8, 40)


def _flux2(seed=0):
    torch.manual_seed(seed)
    extra = {"guidance_embeds": False} if "guidance_embeds" in inspect.signature(Flux2Transformer2DModel).parameters \
        else {}  # diffusers 0.36's FLUX.2 always embeds guidance
    model = Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=4, joint_attention_dim=16,
                                    timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4),
                                    **extra).eval().double()

    def grid(t, h, w):
        return torch.tensor([[t, i, j, 0] for i in range(h) for j in range(w)])

    txt = torch.stack([torch.tensor([[0, 0, 0, n] for n in range(8)])] * 2)
    img = torch.stack([torch.cat([grid(0, 4, 4), grid(10, 4, 4), grid(20, 2, 4)]),
                       torch.cat([grid(0, 4, 4), grid(10, 4, 6)])])
    kwargs = dict(hidden_states=torch.randn(2, 40, 8).double(), encoder_hidden_states=torch.randn(2, 8, 16).double(),
                  timestep=torch.tensor([0.5, 0.5]).double(), img_ids=img, txt_ids=txt, return_dict=False)
    if not extra:
        kwargs["guidance"] = torch.tensor([1.0, 1.0]).double()
    layouts = (TokenLayout(ref=[(24, 40), (40, 48)], gen=[(8, 24)]), TokenLayout(ref=[(24, 48)], gen=[(8, 24)]))
    return Case(model, kwargs, layouts, 8, 40)


def _kontext(seed=0):
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=4, joint_attention_dim=16,
                                   pooled_projection_dim=8, axes_dims_rope=(4, 6, 6)).eval().double()

    def grid(t, h, w):
        return torch.tensor([[t, i, j] for i in range(h) for j in range(w)], dtype=torch.float64)

    kwargs = dict(hidden_states=torch.randn(2, 32, 8).double(), encoder_hidden_states=torch.randn(2, 8, 16).double(),
                  pooled_projections=torch.randn(2, 8).double(), timestep=torch.tensor([0.5, 0.5]).double(),
                  img_ids=torch.cat([grid(0, 4, 4), grid(1, 4, 4)]), txt_ids=torch.zeros(8, 3).double(),
                  return_dict=False)
    layouts = (TokenLayout(ref=[(24, 40)], gen=[(8, 24)]),) * 2
    return Case(model, kwargs, layouts, 8, 32)


FAMILIES = {"qwenimage": _qwen, "flux2": _flux2, "flux_kontext": _kontext}


@contextlib.contextmanager
def _cpu_device_pick():
    # enable_parallelism computes `rank % torch.accelerator.device_count()`; with no accelerator that is 0.
    accel = getattr(torch, "accelerator", None)
    if accel is None or accel.device_count() > 0:
        yield
        return
    with mock.patch.object(accel, "device_count", return_value=1):
        yield


def enable_cp(model, **degrees):
    with _cpu_device_pick():
        model.enable_parallelism(config=ContextParallelConfig(**degrees))


TP_CONFIG = getattr(diffusers.models._modeling_parallel, "TensorParallelConfig", None)  # diffusers >= 0.37


def enable_tp(model, degree: int):
    # diffusers' tensor parallelism names the devices it supports (not the CPU) and checks the mesh's
    # device type; its sharding itself is torch's DTensor parallelize_module, which runs on gloo.
    from diffusers.hooks import tensor_parallel

    with _cpu_device_pick(), mock.patch.object(tensor_parallel, "_SUPPORTED_TP_DEVICES", ("cpu",)):
        model.enable_parallelism(config=TP_CONFIG(tp_degree=degree))


def _forward(case, **overrides):
    with torch.no_grad():
        return case.model(**{**case.kwargs, **overrides})[0]


def _plain_forward_and_masks(case):
    """The forward without DAR, and whether its attention calls carry a mask (versions differ)."""
    proc = next(m.processor for m in case.model.modules() if getattr(m, "processor", None) is not None)
    namespace = vars(importlib.import_module(type(proc).__module__))
    inner, masks = namespace["dispatch_attention_fn"], []

    def dispatch(*args, **kwargs):
        masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None) is not None)
        return inner(*args, **kwargs)

    namespace["dispatch_attention_fn"] = dispatch
    try:
        out = _forward(case)
    finally:
        namespace["dispatch_attention_fn"] = inner
    assert len(set(masks)) == 1
    return out, masks[0]


def _mask_is_split(model) -> bool:
    """Whether diffusers' CP plan splits the text mask with the tokens (diffusers >= 0.39): each rank then
    gets its own piece of the key mask and DAR all-gathers them; diffusers 0.38 hands every rank the whole
    mask, in global order, and DAR reorders it locally (no exchange)."""
    plan = getattr(type(model), "_cp_plan", None) or {}
    return any("encoder_hidden_states_mask" in v for v in plan.values() if isinstance(v, dict))


def _check_family(family: str, degrees: dict, cfg) -> None:
    case = FAMILIES[family]()
    plain, masked = _plain_forward_and_masks(case)
    with dar.enable(case.model, cfg) as handle:
        want = _forward(case)
    assert not handle.enabled
    # DAR changes this forward: the comparison below can tell a rebalanced forward from a plain one.
    assert (want - plain).abs().max() > 1e-3, family
    if "tp" in degrees:
        enable_tp(case.model, degrees["tp"])
        # diffusers' own TP forward (no DAR) is the single-process one: the sharding really runs.
        torch.testing.assert_close(_forward(case), plain, atol=1e-10, rtol=1e-10)
    else:
        enable_cp(case.model, **degrees)
    seen = []
    with dar.enable(case.model, cfg) as handle:
        state = handle.states[0]
        original = state.intern

        def intern(derived, split=None):
            lays = dict(derived.calls).get((case.text + case.image,) * 2)
            seen.append(([(x.ref, x.gen) for x in lays], split))
            return original(derived, split)

        state.intern = intern
        with dp.count_traffic() as traffic:
            got = _forward(case)
        calls = len(handle.layer_names[0])  # every attention layer sees the joint sequence
    if "tp" in degrees:  # every rank holds every token and a slice of the heads: one all-reduce of r per call
        assert seen == [([(x.ref, x.gen) for x in case.layouts], bp._heads(dist.group.WORLD))], seen
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=lambda m: f"{family} {degrees}: {m}")
        assert traffic.calls == [("all_reduce", degrees["tp"], 2 * (case.text + case.image) * 4)] * calls
        return
    world = degrees.get("ring_degree", 1) * degrees.get("ulysses_degree", 1)
    assert seen == [([(x.ref, x.gen) for x in case.layouts], bp.Split(case.text, case.image, world))], seen
    # diffusers' ring merges the shards' outputs in float32 (ContextParallelConfig.convert_to_fp32, default
    # True); Ulysses alone stays in float64.
    tol = 1e-7 if degrees.get("ring_degree", 1) > 1 else 1e-10
    torch.testing.assert_close(got, want, atol=tol, rtol=100 * tol, msg=lambda m: f"{family} {degrees} {cfg}: {m}")
    # Exactly the collectives docs/parallel.md lists, once per rebalanced attention call.
    ring, ulysses = degrees.get("ring_degree", 1), degrees.get("ulysses_degree", 1)
    split = bp.Split(case.text, case.image, world)
    per_call = bp.dar_traffic(batch=2, heads=4, head_dim=16, dtype_bytes=8, split=split, ring=ring, ulysses=ulysses,
                              rank_slots=bp.rank_slots(case.layouts, cfg, split, ring, ulysses),
                              num_groups=1 if cfg.normalize == "joint" else 2, thresholds=cfg.thresholds,
                              masked=masked and _mask_is_split(case.model))
    assert traffic.calls == per_call * calls, (family, degrees, traffic.calls, per_call)


def _worker(rank: int, world: int, cases) -> None:
    for family, degrees, cfg in cases:
        _check_family(family, degrees, cfg)


def _cases(world: int):
    per_image = CFG.replace(normalize="per_image", mode="prob_scale", thresholds="quantile", sampling="strided")
    # Tensor parallelism: every family on 2 ranks; Qwen-Image on 4 (the spawns' time adds up on CI).
    tp = [(f, {"tp": world}, CFG if world == 2 else per_image) for f in (FAMILIES if world == 2 else ["qwenimage"])]
    tp = tp if TP_CONFIG is not None else []
    if world == 2:
        return [(f, {"ulysses_degree": 2}, CFG) for f in FAMILIES] + [(f, {"ring_degree": 2}, CFG) for f in FAMILIES] + [
            ("qwenimage", {"ring_degree": 2}, per_image), ("qwenimage", {"ulysses_degree": 2}, per_image)] + tp
    cases = [("qwenimage", {"ring_degree": 4}, CFG), ("flux2", {"ulysses_degree": 4}, per_image)] + tp
    if UNIFIED:
        cases += [("qwenimage", {"ring_degree": 2, "ulysses_degree": 2}, CFG),
                  ("flux_kontext", {"ring_degree": 2, "ulysses_degree": 2}, per_image)]
    return cases


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_forward_matches_single_process(world):
    run_world(world, _worker, _cases(world))


def test_unified_needs_a_diffusers_that_has_it():
    if UNIFIED:
        return  # exercised by the 4-rank test above
    with pytest.raises(ValueError, match="Unified Ulysses-Ring attention is not yet supported"):
        ContextParallelConfig(ring_degree=2, ulysses_degree=2)


# -- configurations DAR refuses (no process group needed: the forward pre-hook raises first) ----------

def _refused(case, config, match):
    case.model._parallel_config = config
    with dar.enable(case.model, CFG):
        with pytest.raises(ValueError, match=match):
            _forward(case)


def test_uneven_splits_are_refused():
    fields = {f.name for f in dataclasses.fields(ContextParallelConfig)}
    if "ring_anything" not in fields:
        pytest.skip(f"diffusers {diffusers.__version__} has no ring_anything / ulysses_anything")
    _refused(_qwen(), ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2, ring_anything=True)),
             "ring_anything=True")


def test_families_without_a_known_split_are_refused():
    torch.manual_seed(0)
    model = OmniGenTransformer2DModel(in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=32, num_layers=1, pad_token_id=0,
                                      vocab_size=64, rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.0] * 8},
                                      pos_embed_max_size=16, time_step_dim=16).eval()
    kwargs = dict(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([0.5]),
                  input_ids=torch.randint(1, 64, (1, 12)), input_img_latents=[torch.randn(1, 4, 8, 8)],
                  input_image_sizes={0: [[2, 18]]}, attention_mask=torch.ones(1, 29, 29),
                  position_ids=torch.arange(29)[None], return_dict=False)
    case = Case(model, kwargs, (), 0, 0)
    _refused(case, ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2)),
             "knows how diffusers splits the tokens only for")


def test_a_user_layout_on_a_known_family_uses_its_split():
    case = _qwen()
    case.model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    assert bp.forward_split(case.model, case.kwargs, "layout_fn") == bp.Split(8, 40, 2)
    case.model._parallel_config = None
    assert bp.forward_split(case.model, case.kwargs, "layout_fn") is None


def test_recorder_is_refused_under_context_parallelism():
    # The recorder check runs at the attention call; a 1-rank gloo group stands in for the CP mesh.
    case = _qwen()
    rec = dar.Recorder()
    split = bp.Split(case.text, case.image, 2)
    state = type("S", (), {"settings": type("T", (), {"recorder": rec})()})()
    active = type("A", (), {"split": split})()
    pc = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    q = torch.zeros(2, 4, split.local, 16)
    with pytest.raises(ValueError, match="recorder= is not supported under context parallelism"):
        bp.rebalance(state, None, active, q, q, q, None, None, pc)


def test_traffic_arithmetic():
    split = bp.Split(200, 4 * 4096, 8)
    calls = bp.dar_traffic(batch=2, heads=24, head_dim=128, dtype_bytes=2, split=split, ring=4, ulysses=2,
                           rank_slots=(9, 5, 0, 0), num_groups=1)
    blk = 2 * split.local
    assert calls == [("broadcast", 4, 2 * 12 * 9 * 128 * 2), ("broadcast", 4, 2 * 12 * 5 * 128 * 2),
                     ("all_gather", 4, 2 * 12 * 14 * 4), ("all_reduce", 2, 2 * blk * 4), ("all_reduce", 4, 2 * 2 * 4),
                     ("all_gather", 4, 2 * blk * 4)]
    model = bp.model_traffic(batch=2, heads=24, head_dim=128, dtype_bytes=2, seq=split.text + split.image, ring=4,
                             ulysses=2)
    local = 2 * split.local * 24 * 128 * 2
    assert model == [("all_to_all", 2, local)] * 4 + [("all_gather", 4, 2 * local)]


def test_benchmark_traffic_within_target():
    """benchmarks/parallel_traffic.py: DAR adds at most 1% to the model's own context-parallel traffic."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "parallel_traffic.py"
    spec = importlib.util.spec_from_file_location("parallel_traffic", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shape, table = bench.rows([("default", dar.DARConfig())])
    assert {(r["ranks"], r["ulysses"], r["ring"]) for r in table} >= {(2, 2, 1), (2, 1, 2), (8, 1, 8), (8, 2, 4)}
    assert max(r["fraction"] for r in table) <= 0.01
