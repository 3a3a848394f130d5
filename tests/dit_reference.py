"""Shared PyTorch reference helpers for DiT tests (diffusers model, independent RoPE, original-name state dict)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from hcjax.config import preset


def tiny_cfg(**overrides):
    return dataclasses.replace(preset("tiny").dit, **overrides)


def diffusers_model(cfg, seed=0):
    """A diffusers HunyuanVideo transformer with the dims of ``cfg`` and every weight randomised (seeded)."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim, num_layers=cfg.depth_double_blocks,
        num_single_layers=cfg.depth_single_blocks, num_refiner_layers=cfg.refiner_depth,
        mlp_ratio=cfg.mlp_width_ratio, patch_size=cfg.patch_size[1], patch_size_t=cfg.patch_size[0],
        guidance_embeds=cfg.guidance_embed, text_embed_dim=cfg.text_states_dim,
        pooled_projection_dim=cfg.text_states_dim_2, rope_theta=cfg.rope_theta, rope_axes_dim=cfg.rope_dim_list,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():            # default init leaves some tensors at 0 / 1; perturb all
            p.add_(0.1 * torch.randn_like(p))
    return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def to_original_names(sd: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    """Invert the documented original -> diffusers mapping (spec hunyuanvideo-vs-diffusers.md section 2)."""
    o: dict[str, np.ndarray] = {}
    cat = lambda *ks: np.concatenate([sd[k] for k in ks], axis=0)  # noqa: E731
    te, ce = "time_text_embed", "context_embedder"
    for wb in ("weight", "bias"):
        o[f"img_in.proj.{wb}"] = sd[f"x_embedder.proj.{wb}"]
        o[f"time_in.mlp.0.{wb}"] = sd[f"{te}.timestep_embedder.linear_1.{wb}"]
        o[f"time_in.mlp.2.{wb}"] = sd[f"{te}.timestep_embedder.linear_2.{wb}"]
        o[f"vector_in.in_layer.{wb}"] = sd[f"{te}.text_embedder.linear_1.{wb}"]
        o[f"vector_in.out_layer.{wb}"] = sd[f"{te}.text_embedder.linear_2.{wb}"]
        if cfg.guidance_embed:
            o[f"guidance_in.mlp.0.{wb}"] = sd[f"{te}.guidance_embedder.linear_1.{wb}"]
            o[f"guidance_in.mlp.2.{wb}"] = sd[f"{te}.guidance_embedder.linear_2.{wb}"]
        o[f"txt_in.input_embedder.{wb}"] = sd[f"{ce}.proj_in.{wb}"]
        o[f"txt_in.t_embedder.mlp.0.{wb}"] = sd[f"{ce}.time_text_embed.timestep_embedder.linear_1.{wb}"]
        o[f"txt_in.t_embedder.mlp.2.{wb}"] = sd[f"{ce}.time_text_embed.timestep_embedder.linear_2.{wb}"]
        o[f"txt_in.c_embedder.linear_1.{wb}"] = sd[f"{ce}.time_text_embed.text_embedder.linear_1.{wb}"]
        o[f"txt_in.c_embedder.linear_2.{wb}"] = sd[f"{ce}.time_text_embed.text_embedder.linear_2.{wb}"]
        for i in range(cfg.refiner_depth):
            r, d = f"txt_in.individual_token_refiner.blocks.{i}", f"{ce}.token_refiner.refiner_blocks.{i}"
            o[f"{r}.norm1.{wb}"] = sd[f"{d}.norm1.{wb}"]
            o[f"{r}.norm2.{wb}"] = sd[f"{d}.norm2.{wb}"]
            o[f"{r}.self_attn_qkv.{wb}"] = cat(f"{d}.attn.to_q.{wb}", f"{d}.attn.to_k.{wb}", f"{d}.attn.to_v.{wb}")
            o[f"{r}.self_attn_proj.{wb}"] = sd[f"{d}.attn.to_out.0.{wb}"]
            o[f"{r}.mlp.fc1.{wb}"] = sd[f"{d}.ff.net.0.proj.{wb}"]
            o[f"{r}.mlp.fc2.{wb}"] = sd[f"{d}.ff.net.2.{wb}"]
            o[f"{r}.adaLN_modulation.1.{wb}"] = sd[f"{d}.norm_out.linear.{wb}"]
        for i in range(cfg.depth_double_blocks):
            b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
            o[f"{b}.img_mod.linear.{wb}"] = sd[f"{d}.norm1.linear.{wb}"]
            o[f"{b}.txt_mod.linear.{wb}"] = sd[f"{d}.norm1_context.linear.{wb}"]
            o[f"{b}.img_attn_qkv.{wb}"] = cat(f"{d}.attn.to_q.{wb}", f"{d}.attn.to_k.{wb}", f"{d}.attn.to_v.{wb}")
            o[f"{b}.txt_attn_qkv.{wb}"] = cat(f"{d}.attn.add_q_proj.{wb}", f"{d}.attn.add_k_proj.{wb}",
                                              f"{d}.attn.add_v_proj.{wb}")
            o[f"{b}.img_attn_proj.{wb}"] = sd[f"{d}.attn.to_out.0.{wb}"]
            o[f"{b}.txt_attn_proj.{wb}"] = sd[f"{d}.attn.to_add_out.{wb}"]
            o[f"{b}.img_mlp.fc1.{wb}"] = sd[f"{d}.ff.net.0.proj.{wb}"]
            o[f"{b}.img_mlp.fc2.{wb}"] = sd[f"{d}.ff.net.2.{wb}"]
            o[f"{b}.txt_mlp.fc1.{wb}"] = sd[f"{d}.ff_context.net.0.proj.{wb}"]
            o[f"{b}.txt_mlp.fc2.{wb}"] = sd[f"{d}.ff_context.net.2.{wb}"]
        for i in range(cfg.depth_single_blocks):
            b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
            o[f"{b}.linear1.{wb}"] = cat(f"{d}.attn.to_q.{wb}", f"{d}.attn.to_k.{wb}", f"{d}.attn.to_v.{wb}",
                                         f"{d}.proj_mlp.{wb}")
            o[f"{b}.linear2.{wb}"] = sd[f"{d}.proj_out.{wb}"]
            o[f"{b}.modulation.linear.{wb}"] = sd[f"{d}.norm.linear.{wb}"]
        w = sd[f"norm_out.linear.{wb}"]
        h = w.shape[0] // 2
        o[f"final_layer.adaLN_modulation.1.{wb}"] = np.concatenate([w[h:], w[:h]], axis=0)  # (scale,shift)->(shift,scale)
        o[f"final_layer.linear.{wb}"] = sd[f"proj_out.{wb}"]
    for i in range(cfg.depth_double_blocks):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        o[f"{b}.img_attn_q_norm.weight"] = sd[f"{d}.attn.norm_q.weight"]
        o[f"{b}.img_attn_k_norm.weight"] = sd[f"{d}.attn.norm_k.weight"]
        o[f"{b}.txt_attn_q_norm.weight"] = sd[f"{d}.attn.norm_added_q.weight"]
        o[f"{b}.txt_attn_k_norm.weight"] = sd[f"{d}.attn.norm_added_k.weight"]
    for i in range(cfg.depth_single_blocks):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        o[f"{b}.q_norm.weight"] = sd[f"{d}.attn.norm_q.weight"]
        o[f"{b}.k_norm.weight"] = sd[f"{d}.attn.norm_k.weight"]
    return o


def spec_rope(grid, dims, theta, with_ref):
    """RoPE cos/sin written from spec 5.8 in numpy (independent of hcjax.rope)."""
    t, h, w = grid
    positions = []
    if with_ref:
        positions += [(-1.0, hh, ww + w) for hh in range(h) for ww in range(w)]
    positions += [(tt, hh, ww) for tt in range(t) for hh in range(h) for ww in range(w)]
    pos = np.array(positions, dtype=np.float32)
    cos_parts, sin_parts = [], []
    for axis, d in enumerate(dims):
        omega = (1.0 / (np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))).astype(np.float32)
        ang = pos[:, axis:axis + 1] * omega[None, :]
        cos_parts.append(np.repeat(np.cos(ang), 2, axis=1))
        sin_parts.append(np.repeat(np.sin(ang), 2, axis=1))
    return np.concatenate(cos_parts, 1).astype(np.float32), np.concatenate(sin_parts, 1).astype(np.float32)


def to_torch_video(x: np.ndarray) -> torch.Tensor:
    """[B,T,H,W,C] -> [B,C,T,H,W]."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))


def from_torch_video(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 4, 1)


def reference_with_ref_tokens(model, cfg, x, t, text, mask, pooled, ref):
    """Independent reference for the reference-token path from diffusers' own sub-modules (spec 5.9, 5.13)."""
    with torch.no_grad():
        xt, reft = to_torch_video(x), to_torch_video(ref)
        b, _, tt, hh, ww = xt.shape
        pt, ph, pw = cfg.patch_size
        grid = (tt // pt, hh // ph, ww // pw)
        tt_ = torch.from_numpy(t)
        temb, _ = model.time_text_embed(tt_, torch.from_numpy(pooled), None)
        vid = model.x_embedder(xt)
        reft_tok = model.x_embedder(reft)
        enc = model.context_embedder(torch.from_numpy(text), tt_, torch.from_numpy(mask))
        img = torch.cat([reft_tok, vid], dim=1)
        cos, sin = spec_rope(grid, cfg.rope_dim_list, cfg.rope_theta, with_ref=True)
        rope = (torch.from_numpy(cos), torch.from_numpy(sin))
        n_img = img.shape[1]
        total = n_img + enc.shape[1]
        valid = n_img + torch.from_numpy(mask).sum(1)
        attn_mask = (torch.arange(total)[None, :] < valid[:, None])[:, None, None, :]
        for blk in model.transformer_blocks:
            img, enc = blk(img, enc, temb, attn_mask, rope)
        for blk in model.single_transformer_blocks:
            img, enc = blk(img, enc, temb, attn_mask, rope)
        n_ref = reft_tok.shape[1]
        out = model.proj_out(model.norm_out(img[:, n_ref:], temb))
        out = out.reshape(b, grid[0], grid[1], grid[2], -1, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        out = out.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return from_torch_video(out)
