"""The identity models and their use in the sampling loop.

* The Resampler (InstantID / IP-Adapter Plus design; InfiniteYou-FLUX sizes: 512 -> 8 tokens
  of 4096) read from `image_proj_model.bin` (state dict under "image_proj", original key
  names) into diffusers' IPAdapterPlusImageProjection, the same network.
* InfuseNet: a diffusers FluxControlNetModel (`controlnet/InfuseNetModel/`), fed the identity
  tokens in place of text and the keypoint image as control; its residuals are added to the
  FLUX transformer between start_at and end_at of the schedule, scaled by cn_strength.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

# diffusers' own FluxControlNetModel.__init__ (models/controlnets/controlnet_flux.py) builds the
# FluxPosEmbed that diffusers itself deprecated (models/embeddings.py): its FutureWarning
# is about diffusers' code, not ryla's, and would print on every InfuseNet build.
warnings.filterwarnings("ignore", message=r"`FluxPosEmbed` is deprecated", category=FutureWarning)

# InfiniteYou-FLUX v1.0's Resampler.
RESAMPLER = dict(embed_dims=512, output_dims=4096, hidden_dims=1280, depth=4, dim_head=64, heads=20,
                 num_queries=8, ffn_ratio=4)


def resampler_from_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Resampler keys (layers.N.0 = attention, layers.N.1 = feed-forward) ->
    diffusers IPAdapterPlusImageProjection keys."""
    out = {}
    for key, value in sd.items():
        m = re.match(r"^layers\.(\d+)\.(\d)\.(.+)$", key)
        if not m:
            out[key] = value
            continue
        i, part, rest = m.groups()
        base = f"layers.{i}."
        name, _, param = rest.partition(".")
        if part == "0":
            if name == "to_kv":  # keys and values are one matrix in the original
                k, v = value.chunk(2, dim=0)
                out[f"{base}attn.to_k.{param}"], out[f"{base}attn.to_v.{param}"] = k, v
                continue
            target = {"norm1": "ln0", "norm2": "ln1", "to_q": "attn.to_q", "to_out": "attn.to_out.0"}[name]
            out[f"{base}{target}.{param}"] = value
        else:
            target = {"0": "ff.0", "1": "ff.1.net.0.proj", "3": "ff.1.net.2"}[name]
            out[f"{base}{target}.{param}"] = value
    return out


def resampler_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse, used to write tiny files in the published layout."""
    out = {}
    for key, value in sd.items():
        m = re.match(r"^layers\.(\d+)\.(.+)$", key)
        if not m:
            out[key] = value
            continue
        i, rest = m.groups()
        base = f"layers.{i}."
        if rest.startswith("attn.to_k."):
            out[base + "0.to_kv." + rest[len("attn.to_k."):]] = torch.cat([value, sd[key.replace("to_k", "to_v")]])
        elif rest.startswith("attn.to_v."):
            continue
        elif rest.startswith(("ln0.", "ln1.")):
            out[base + "0." + {"ln0": "norm1", "ln1": "norm2"}[rest[:3]] + rest[3:]] = value
        elif rest.startswith("attn.to_q."):
            out[base + "0.to_q." + rest[len("attn.to_q."):]] = value
        elif rest.startswith("attn.to_out.0."):
            out[base + "0.to_out." + rest[len("attn.to_out.0."):]] = value
        else:
            for ours, theirs in (("ff.0.", "1.0."), ("ff.1.net.0.proj.", "1.1."), ("ff.1.net.2.", "1.3.")):
                if rest.startswith(ours):
                    out[base + theirs + rest[len(ours):]] = value
    return out


def resampler_config(sd: dict[str, torch.Tensor]) -> dict:
    """The Resampler's sizes, read from its original state dict (heads of 64 channels, as in
    InstantID and InfiniteYou)."""
    hidden = sd["latents"].shape[-1]
    inner = sd["layers.0.0.to_q.weight"].shape[0]
    return dict(embed_dims=sd["proj_in.weight"].shape[1], output_dims=sd["proj_out.weight"].shape[0],
                hidden_dims=hidden, depth=len({k.split(".")[1] for k in sd if k.startswith("layers.")}),
                dim_head=64, heads=inner // 64, num_queries=sd["latents"].shape[1],
                ffn_ratio=sd["layers.0.1.1.weight"].shape[0] // hidden)


def load_resampler(path: Path, device, dtype):
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = state.get("image_proj", state)
    model = IPAdapterPlusImageProjection(**resampler_config(state))
    model.load_state_dict(resampler_from_original(state), strict=True)
    return model.to(device, dtype).eval().requires_grad_(False)


def load_infusenet(folder: Path, device, dtype):
    from diffusers import FluxControlNetModel

    return FluxControlNetModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True).to(device).eval()


@dataclass(frozen=True)
class IdentityAdapter:
    """Everything the sampler needs to steer one request towards a face."""

    controlnet: object
    id_tokens: torch.Tensor  # [1, 8, d]
    control_image: object  # PIL keypoint image, or None for InfiniteYou's black control image
    vae: object  # to encode the control image at the latent's size
    strength: float  # controlnet (InfuseNet) residual scale
    start: float
    end: float

    def active(self, step: int, total: int) -> bool:
        """Whether step `step` of `total` lies in [start_at, end_at) of the schedule."""
        fraction = step / max(total, 1)
        return self.start <= fraction and (fraction < self.end or self.end >= 1.0)

    def residuals(self, hidden_states, control, timestep, img_ids, guidance, pooled, batch) -> dict:
        """InfuseNet's residuals for one step, by calling the model (InfuseNetSteps computes the
        same for every step of a request with less work a step)."""
        tokens = self.id_tokens.to(hidden_states.device, hidden_states.dtype).expand(batch, -1, -1)
        blocks, single = self.controlnet(
            hidden_states=hidden_states,
            controlnet_cond=control.to(hidden_states.device, hidden_states.dtype).expand(batch, -1, -1),
            conditioning_scale=self.strength,
            encoder_hidden_states=tokens,
            pooled_projections=torch.zeros_like(pooled),  # as InfiniteYou: identity only, no text
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=torch.zeros(tokens.shape[1], 3, device=hidden_states.device, dtype=hidden_states.dtype),
            guidance=guidance,
            return_dict=False,
        )
        return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": single}

    def steps(self) -> InfuseNetSteps:
        """What computes the residuals over one sampling run's steps."""
        return InfuseNetSteps(self)


class InfuseNetSteps:
    """IdentityAdapter.residuals over the steps of one sampling run, computing once what
    diffusers' FluxControlNetModel.forward (0.42) computes again every step from inputs that do
    not change between steps: the control image's embedding (controlnet_x_embedder), the identity
    tokens' projection (context_embedder), the rotary embedding of the token positions
    (pos_embed: some 35 small kernels), and the zero pooled vector's embedding. Each step then
    computes the rest as that forward does, in its order, so the residuals are its bits (a
    conditioning scale of 1, InfiniteYou's default, multiplies by nothing). Each kernel left out
    is ~45 us of the host's time a step where launching is what limits (fast mode with identity:
    bench/results/README.md). A model that forward treats otherwise (a hint block, Union modes)
    is called as it is."""

    def __init__(self, adapter: IdentityAdapter):
        self.adapter = adapter
        model = adapter.controlnet
        self.direct = model.input_hint_block is not None or getattr(model, "union", False)
        # (latent shape, control, positions, pooled shape) -> the step-invariant parts, with the
        # control and position tensors themselves, so their ids stay theirs while kept
        self.fixed: dict[tuple, tuple] = {}

    def __call__(self, hidden_states, control, timestep, img_ids, guidance, pooled, batch) -> dict:
        fixed = self.prepared(hidden_states, control, img_ids, pooled, batch)
        if fixed is None:
            return self.adapter.residuals(hidden_states, control, timestep, img_ids, guidance, pooled, batch)
        return self.step_residuals(self.adapter.controlnet, self.adapter.strength, hidden_states, timestep, guidance,
                                   pooled.dtype, **fixed)

    def prepared(self, hidden_states, control, img_ids, pooled, batch) -> dict[str, torch.Tensor] | None:
        """The step-invariant tensors for step_residuals, by name, computed once per latent shape,
        control and positions; None for a model that forward treats otherwise (called as it is)."""
        if self.direct:
            return None
        model = self.adapter.controlnet
        device, dtype = hidden_states.device, hidden_states.dtype
        # the same tensors every step of a run (the engine keeps them per latent size)
        key = (tuple(hidden_states.shape), id(control), id(img_ids), tuple(pooled.shape))
        fixed = self.fixed.get(key)
        if fixed is None:
            tokens = self.adapter.id_tokens.to(device, dtype).expand(batch, -1, -1)
            txt_ids = torch.zeros(tokens.shape[1], 3, device=device, dtype=dtype)
            cos, sin = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
            # control and img_ids are kept with them, so their ids stay theirs while kept
            fixed = self.fixed[key] = (control, img_ids, dict(
                infusenet_control=model.controlnet_x_embedder(control.to(device, dtype).expand(batch, -1, -1)),
                infusenet_context=model.context_embedder(tokens),
                infusenet_rotary_cos=cos, infusenet_rotary_sin=sin,
                infusenet_pooled=model.time_text_embed.text_embedder(torch.zeros_like(pooled))))
        return fixed[2]

    @classmethod
    def step_residuals(cls, model, strength: float, hidden_states, timestep, guidance, pooled_dtype, *,
                       infusenet_control, infusenet_context, infusenet_rotary_cos, infusenet_rotary_sin,
                       infusenet_pooled) -> dict:
        """One step's residuals from `prepared`'s tensors: a function of its tensor arguments,
        the model's weights and `strength` alone (ryla.speed.graphs replays it so)."""
        dtype = hidden_states.dtype
        rotary = (infusenet_rotary_cos, infusenet_rotary_sin)
        hidden_states = model.x_embedder(hidden_states) + infusenet_control
        temb = cls._time_embedding(model, timestep, guidance, infusenet_pooled, dtype, pooled_dtype)
        block_samples = []
        encoder_hidden_states = infusenet_context
        for block in model.transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states=hidden_states,
                                                         encoder_hidden_states=encoder_hidden_states, temb=temb,
                                                         image_rotary_emb=rotary)
            block_samples.append(hidden_states)
        single_samples = []
        for block in model.single_transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states=hidden_states,
                                                         encoder_hidden_states=encoder_hidden_states, temb=temb,
                                                         image_rotary_emb=rotary)
            single_samples.append(hidden_states)
        blocks = [projection(sample) for sample, projection in zip(block_samples, model.controlnet_blocks)]
        single = [projection(sample) for sample, projection in zip(single_samples, model.controlnet_single_blocks)]
        if strength != 1.0:
            blocks = [sample * strength for sample in blocks]
            single = [sample * strength for sample in single]
        return {"controlnet_block_samples": blocks or None, "controlnet_single_block_samples": single or None}

    @staticmethod
    def _time_embedding(model, timestep, guidance, pooled_embedding, dtype, pooled_dtype):
        """FluxControlNetModel's temb, the timestep's (and guidance's) part computed, the pooled
        vector's given: CombinedTimestep(Guidance)TextProjEmbeddings.forward's sums in its order."""
        embed = model.time_text_embed
        timestep = timestep.to(dtype) * 1000
        time_embedding = embed.timestep_embedder(embed.time_proj(timestep).to(dtype=pooled_dtype))
        if guidance is not None and hasattr(embed, "guidance_embedder"):
            guidance = guidance.to(dtype) * 1000
            time_embedding = time_embedding + embed.guidance_embedder(
                embed.time_proj(guidance).to(dtype=pooled_dtype))
        return time_embedding + pooled_embedding
