"""A stand-in for the parts of ComfyUI the DAR node touches, following its calling contract as read
in ComfyUI's code (and checked on the real code, docs/comfyui.md "Verification"); none of its code.

- `ModelPatcher`: ``clone()`` shares the model and deep-copies ``model_options``.
- `wrap_attn`: hands every attention call to ``transformer_options["optimized_attention_override"]
  (func, *args, **kwargs)`` when set, ``func`` being the selected attention, with
  ``_inside_attn_wrapper`` in kwargs; `attention_pytorch` takes ``(q, k, v, heads, mask, ...,
  skip_reshape, skip_output_reshape)`` and has no scale.
- `BaseModel.apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)` runs
  the ``apply_model`` wrappers found in ``transformer_options["wrappers"]`` as
  ``wrapper(executor, *args)`` and then the diffusion model.
- The diffusion models build the joint sequence as ComfyUI's do: ``[text | target | refs]`` (FLUX,
  Qwen-Image), ``[text | refs | target]`` (OmniGen2, with a refiner call over the target alone),
  each latent padded to the patch size; FLUX.2's text is padded to 512 by `Flux2.extra_conds`.
- ``contract["reference_image_num_tokens"]``: off, the pinned ComfyUI (2026-01-07); on, newer upstream, whose
  FLUX and Qwen-Image ``_forward`` put the per-reference token counts, in ``ref_latents`` order, into a copy of
  ``transformer_options`` before the blocks run (OmniGen2's does not).
"""

import copy
import functools
import math

import torch
import torch.nn.functional as F

calls = []  # (name, q, k, v, out) of every call that reached `attention_pytorch`
attention_calls = []  # (q, k, v, out) of every model attention call, as the model sees it (after any override)
selected = {}  # "func": the attention "the user selected" (ComfyUI's optimized_attention), by default pytorch
contract = {"reference_image_num_tokens": False}  # which ComfyUI the models follow (module docstring)


def wrap_attn(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        opts = kwargs.get("transformer_options")
        kwargs["_inside_attn_wrapper"] = True
        if opts is not None and "optimized_attention_override" in opts:
            out = opts["optimized_attention_override"](func, *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        attention_calls.append((args[0], args[1], args[2], out))
        return out
    return wrapper


def _pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    if not skip_reshape:
        b, n, hd = q.shape
        q, k, v = (t.view(b, -1, heads, hd // heads).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.dim() == 3:
        mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    calls.append(("attention_pytorch", q, k, v, out))
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def optimized_attention(*args, **kwargs):
    return wrap_attn(selected.get("func", _pytorch))(*args, **kwargs)


raw_attention_pytorch = _pytorch


def _patchify(x, p):
    h, w = x.shape[-2], x.shape[-1]
    x = F.pad(x, (0, (-w) % p, 0, (-h) % p))
    x = x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])  # frames into channels' neighbour
    b, c, hh, ww = x.shape
    x = x.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (hh // p) * (ww // p), c * p * p)
    return x


class _Diffusion(torch.nn.Module):
    refs_first = False
    joint_layers = 2

    def __init__(self, channels=4, text_dim=6, hidden=32, heads=4, patch_size=2):
        super().__init__()
        self.patch_size, self.heads = patch_size, heads
        self.img_in = torch.nn.LazyLinear(hidden)
        self.txt_in = torch.nn.Linear(text_dim, hidden)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(hidden, 3 * hidden) for _ in range(self.joint_layers + 1))
        self.out = torch.nn.Linear(hidden, channels * patch_size * patch_size)

    def _attend(self, layer, x, opts):
        b, n, _ = x.shape
        q, k, v = self.qkv[layer](x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return x + optimized_attention(q, k, v, self.heads, None, skip_reshape=True, transformer_options=opts)

    def forward(self, x, timestep, context=None, ref_latents=None, transformer_options={}, **kwargs):
        p = self.patch_size
        txt = self.txt_in(context)
        img = self.img_in(_patchify(x, p))
        n_img = img.shape[1]
        refs = [self.img_in(_patchify(r, p)) for r in (ref_latents or ())]
        if refs and contract["reference_image_num_tokens"] and not self.refs_first:
            transformer_options = {**transformer_options, "reference_image_num_tokens": [r.shape[1] for r in refs]}
        if self.refs_first:  # OmniGen2: a refiner over the target alone, then [text | refs | target]
            img = self._attend(self.joint_layers, img, transformer_options)
            seq = torch.cat([txt, *refs, img], dim=1)
        else:
            seq = torch.cat([txt, img, *refs], dim=1)
        seq = seq + timestep.reshape(-1, 1, 1)
        for layer in range(self.joint_layers):
            seq = self._attend(layer, seq, transformer_options)
        img = seq[:, -n_img:] if self.refs_first else seq[:, txt.shape[1]:txt.shape[1] + n_img]
        return self.out(img).mean()  # a scalar summary is enough for the tests


class Flux(_Diffusion):  # comfy.ldm.flux.model.Flux (FLUX.1, Kontext, FLUX.2)
    pass


class QwenImageTransformer2DModel(_Diffusion):
    pass


class OmniGen2Transformer2DModel(_Diffusion):
    refs_first = True


class UNetModel(_Diffusion):
    pass


class BaseModel(torch.nn.Module):
    diffusion_class = Flux

    def __init__(self, **kw):
        super().__init__()
        self.diffusion_model = self.diffusion_class(**kw)

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        wrappers = [w for ws in transformer_options.get("wrappers", {}).get("apply_model", {}).values() for w in ws]

        def run(i, *args, **kw):
            if i == len(wrappers):
                return self._apply_model(*args, **kw)
            return wrappers[i](functools.partial(run, i + 1), *args, **kw)

        return run(0, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        return self.diffusion_model(x, t, context=c_crossattn, transformer_options=transformer_options, **kwargs)


def _name(cls_name, base, diffusion):
    return type(cls_name, (base,), {"diffusion_class": diffusion})


QwenImage = _name("QwenImage", BaseModel, QwenImageTransformer2DModel)
Omnigen2 = _name("Omnigen2", BaseModel, OmniGen2Transformer2DModel)
Flux2 = _name("Flux2", BaseModel, Flux)
FluxModel = _name("Flux", BaseModel, Flux)
SDXL = _name("SDXL", BaseModel, UNetModel)


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = ModelPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        return n


def forward(patcher, x, t, context, ref_latents=None, sigmas=None, sample_sigmas=None, **kwargs):
    """One batched forward as ComfyUI's calc_cond_batch makes it: a fresh transformer_options per call."""
    opts = dict(patcher.model_options.get("transformer_options", {}))
    if sigmas is not None:
        opts["sigmas"], opts["sample_sigmas"] = sigmas, sample_sigmas
    if type(patcher.model).__name__ == "Flux2" and context.shape[1] < 512:
        context = F.pad(context, (0, 0, 512 - context.shape[1], 0))
    extra = dict(kwargs)
    if ref_latents is not None:
        extra["ref_latents"] = ref_latents
    return patcher.model.apply_model(x, t, None, context, None, opts, **extra)


def text_tokens(model_name, n):
    return 512 if model_name == "Flux2" and n < 512 else n


def image_tokens(latent, p):
    return math.prod(latent.shape[2:-2]) * (-(-latent.shape[-2] // p)) * (-(-latent.shape[-1] // p))
