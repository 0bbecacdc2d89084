"""The one UNet that every medad method uses.

A MONAI-style, ``spatial_dims``-generic UNet in the family of the DDPM / improved-diffusion UNet
(Ho et al. 2020; Nichol & Dhariwal 2021): residual blocks with GroupNorm (or BatchNorm), optional
sinusoidal timestep conditioning, optional self-attention per level, optional learned-variance
output, and either concatenated (diffusion UNets) or additive (FAIR's restoration UNet) skips.

The network is TorchScript-scriptable so ``monai.bundle ckpt_export`` can export trained checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import List, Optional

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn

__all__ = ["AnomalyUNet", "timestep_embedding"]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM.

    Args:
        timesteps: (B,) timesteps.
        dim: embedding size.
        max_period: lowest frequency of the embedding.

    Returns:
        (B, dim) embedding.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2 == 1:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def _norm(norm: str, spatial_dims: int, channels: int, num_groups: int) -> nn.Module:
    if norm == "group":
        # widths of the small CPU settings are not always multiples of 32: use the largest divisor.
        return get_norm_layer(("group", {"num_groups": math.gcd(num_groups, channels)}), spatial_dims, channels)
    return get_norm_layer(norm, spatial_dims, channels)


def _act(act: str | tuple) -> nn.Module:
    # MONAI's "SWISH" is x * sigmoid(x) in two kernels; torch's SiLU is the same function in one fused kernel
    # (measured: a DISYRE forward pass 14 % faster on CPU). Neither has parameters, so checkpoints load either way.
    if isinstance(act, str) and act.upper() == "SWISH":
        return nn.SiLU()
    return get_act_layer(act)


class ResidualBlock(nn.Module):
    """Norm-act-conv twice, with the timestep embedding added between the convolutions."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        norm: str,
        num_groups: int,
        act: str,
        dropout: float,
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.spatial_dims = spatial_dims
        self.norm1 = _norm(norm, spatial_dims, in_channels, num_groups)
        self.act1 = _act(act)
        self.conv1 = conv(in_channels, out_channels, kernel_size=3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, out_channels) if emb_channels > 0 else nn.Identity()
        self.use_emb = emb_channels > 0
        self.norm2 = _norm(norm, spatial_dims, out_channels, num_groups)
        self.act2 = _act(act)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = conv(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *S), (B, E) -> (B, C_out, *S)."""
        h = self.conv1(self.act1(self.norm1(x)))
        if self.use_emb:
            e = self.emb_proj(emb)
            while e.dim() < h.dim():
                e = e.unsqueeze(-1)
            h = h + e
        h = self.conv2(self.dropout(self.act2(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, residual (improved-diffusion's AttentionBlock)."""

    def __init__(self, spatial_dims: int, channels: int, num_head_channels: int, norm: str, num_groups: int) -> None:
        super().__init__()
        self.num_heads = max(1, channels // num_head_channels)
        self.norm = _norm(norm, spatial_dims, channels, num_groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, C, *S)."""
        b, c = x.shape[0], x.shape[1]
        tokens = self.norm(x).reshape(b, c, -1).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        heads = self.num_heads
        q = q.reshape(b, -1, heads, c // heads).transpose(1, 2)
        k = k.reshape(b, -1, heads, c // heads).transpose(1, 2)
        v = v.reshape(b, -1, heads, c // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        return x + self.proj(out).transpose(1, 2).reshape(x.shape)


class Downsample(nn.Module):
    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.conv = Conv[Conv.CONV, spatial_dims](channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The residual (+ attention) blocks of one resolution level."""

    def __init__(self, blocks: List[ResidualBlock], attentions: List[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList(attentions)


class AnomalyUNet(nn.Module):
    """UNet shared by all medad methods (2D/3D, with or without timestep conditioning).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input image (plus any conditioning channels).
        out_channels: channels of the prediction (ε, x₀ or the restored image).
        channels: width of each resolution level; ``len(channels)`` levels, downsampling by 2 between them.
            Default ``(64, 128, 256, 256)``.
        num_res_blocks: residual blocks per level (int, or one per level). Default 2.
        attention_levels: per level, whether to add self-attention after each residual block.
            Default: attention on the two deepest levels.
        num_head_channels: channels per attention head. Default 32.
        with_timestep: condition on the diffusion timestep (sinusoidal embedding + MLP). FAIR uses none.
        learned_variance: double the output channels: ``[prediction, v]`` where ``v`` sets the learned-range
            variance of improved-DDPM (see :class:`medad.diffusion.ModelVarType`).
        skip_mode: ``"concat"`` (DDPM/improved-diffusion: every encoder block's output is concatenated in the
            decoder) or ``"add"`` (FAIR: each level's encoder output is added after upsampling).
        norm: ``"group"`` (GroupNorm, default), ``"batch"`` (FAIR) or ``"instance"``.
        norm_num_groups: GroupNorm groups (reduced to a divisor of the width when needed). Default 32.
        act: activation name from MONAI's factory. Default ``"SWISH"``.
        dropout: dropout in residual blocks. Default 0.
        mid_attention: self-attention in the bottleneck; default follows ``attention_levels[-1]``.
        output_activation: ``None``, ``"sigmoid"`` (restoration networks that output images in [0, 1]) or
            ``"residual"``: the prediction is ``x + f(x)`` with ``f``'s last convolution initialised to zero, so
            the untrained network returns its input (an identity-friendly x₀ parametrisation: a restoration
            network starts at "do nothing" and only has to learn the change; needs ``in_channels ==
            out_channels`` and no learned variance).

    Input spatial sizes must be divisible by ``2 ** (len(channels) - 1)``.
    """

    __jit_ignored_attributes__ = ["init_args"]  # a plain dict of settings; TorchScript has no use for it

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (64, 128, 256, 256),
        num_res_blocks: int | Sequence[int] = 2,
        attention_levels: Sequence[bool] | None = None,
        num_head_channels: int = 32,
        with_timestep: bool = True,
        learned_variance: bool = False,
        skip_mode: str = "concat",
        norm: str = "group",
        norm_num_groups: int = 32,
        act: str = "SWISH",
        dropout: float = 0.0,
        mid_attention: bool | None = None,
        output_activation: str | None = None,
    ) -> None:
        # the constructor arguments, so a run folder can record and rebuild exactly this network
        init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.init_args = init_args
        if skip_mode not in ("concat", "add"):
            raise ValueError(f"skip_mode must be 'concat' or 'add', got {skip_mode!r}.")
        channels = tuple(int(c) for c in channels)
        levels = len(channels)
        blocks_per_level = [int(num_res_blocks)] * levels if isinstance(num_res_blocks, int) else list(num_res_blocks)
        if attention_levels is None:
            attention_levels = [i >= levels - 2 for i in range(levels)]
        if len(blocks_per_level) != levels or len(attention_levels) != levels:
            raise ValueError("num_res_blocks and attention_levels must have one entry per level of `channels`.")
        mid_attention = bool(attention_levels[-1]) if mid_attention is None else mid_attention

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.with_timestep = with_timestep
        self.learned_variance = learned_variance
        self.add_skips = skip_mode == "add"
        self.size_divisor = 2 ** (levels - 1)
        if output_activation not in (None, "sigmoid", "residual"):
            raise ValueError(f"output_activation must be None, 'sigmoid' or 'residual', got {output_activation!r}.")
        if output_activation == "residual" and (in_channels != out_channels or learned_variance):
            raise ValueError("output_activation='residual' needs in_channels == out_channels and no learned variance.")
        self.output_sigmoid = output_activation == "sigmoid"
        self.output_residual = output_activation == "residual"
        conv = Conv[Conv.CONV, spatial_dims]
        emb_channels = 4 * channels[0] if with_timestep else 0
        self.emb_channels = emb_channels
        self.time_mlp = (
            nn.Sequential(nn.Linear(channels[0], emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
            if with_timestep
            else nn.Identity()
        )

        def res(cin: int, cout: int) -> ResidualBlock:
            return ResidualBlock(spatial_dims, cin, cout, emb_channels, norm, norm_num_groups, act, dropout)

        def attn(c: int, use: bool) -> nn.Module:
            return AttentionBlock(spatial_dims, c, num_head_channels, norm, norm_num_groups) if use else nn.Identity()

        self.conv_in = conv(in_channels, channels[0], kernel_size=3, padding=1)
        skip_channels = [channels[0]]
        down_levels: List[Level] = []
        downsamplers: List[nn.Module] = []
        ch = channels[0]
        for i, width in enumerate(channels):
            blocks, attentions = [], []
            for _ in range(blocks_per_level[i]):
                blocks.append(res(ch, width))
                attentions.append(attn(width, bool(attention_levels[i])))
                ch = width
                skip_channels.append(ch)
            down_levels.append(Level(blocks, attentions))
            if i < levels - 1:
                downsamplers.append(Downsample(spatial_dims, ch))
                skip_channels.append(ch)
            else:
                downsamplers.append(nn.Identity())
        self.down_levels = nn.ModuleList(down_levels)
        self.downsamplers = nn.ModuleList(downsamplers)

        self.mid_block1 = res(ch, ch)
        self.mid_attention = attn(ch, mid_attention)
        self.mid_block2 = res(ch, ch)

        up_levels: List[Level] = []
        upsamplers: List[nn.Module] = []
        for i in reversed(range(levels)):
            width = channels[i]
            blocks, attentions = [], []
            if self.add_skips:
                for _ in range(blocks_per_level[i]):
                    blocks.append(res(ch, width))
                    attentions.append(attn(width, bool(attention_levels[i])))
                    ch = width
            else:
                for _ in range(blocks_per_level[i] + 1):
                    blocks.append(res(ch + skip_channels.pop(), width))
                    attentions.append(attn(width, bool(attention_levels[i])))
                    ch = width
            up_levels.append(Level(blocks, attentions))
            if i > 0:
                target = channels[i - 1] if self.add_skips else ch
                upsamplers.append(Upsample(spatial_dims, ch, target))
                ch = target
            else:
                upsamplers.append(nn.Identity())
        self.up_levels = nn.ModuleList(up_levels)
        self.upsamplers = nn.ModuleList(upsamplers)

        self.out_norm = _norm(norm, spatial_dims, ch, norm_num_groups)
        self.out_act = _act(act)
        self.conv_out = conv(ch, out_channels * (2 if learned_variance else 1), kernel_size=3, padding=1)
        if self.output_residual:  # start as the identity map
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def _embed(self, x: torch.Tensor, timesteps: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.with_timestep:
            return torch.zeros(x.shape[0], 0, device=x.device, dtype=x.dtype)
        if timesteps is None:
            timesteps = torch.zeros(x.shape[0], device=x.device, dtype=torch.long)
        elif timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        return self.time_mlp(timestep_embedding(timesteps, self.channels[0]).to(x.dtype))

    def forward(self, x: torch.Tensor, timesteps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predict from an image and (optionally) its timestep.

        Args:
            x: (B, in_channels, *spatial), each spatial size divisible by ``2 ** (len(channels) - 1)``.
            timesteps: (B,) or scalar integer timesteps; ignored when ``with_timestep`` is False,
                zeros when omitted.

        Returns:
            (B, out_channels, *spatial), or (B, 2 * out_channels, *spatial) with ``learned_variance``.
        """
        for size in x.shape[2:]:
            if size % self.size_divisor != 0:
                raise ValueError(
                    f"AnomalyUNet input spatial size {list(x.shape[2:])} must be divisible by {self.size_divisor}."
                )
        emb = self._embed(x, timesteps)
        h = self.conv_in(x)
        skips: List[torch.Tensor] = [h]
        level_outputs: List[torch.Tensor] = []
        for level, down in zip(self.down_levels, self.downsamplers):
            for down_block, down_attention in zip(level.blocks, level.attentions):
                h = down_attention(down_block(h, emb))
                skips.append(h)
            level_outputs.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)

        h = self.mid_block2(self.mid_attention(self.mid_block1(h, emb)), emb)

        for up_level, up in zip(self.up_levels, self.upsamplers):
            if self.add_skips:
                h = h + level_outputs.pop()
                for add_block, add_attention in zip(up_level.blocks, up_level.attentions):
                    h = add_attention(add_block(h, emb))
            else:
                for cat_block, cat_attention in zip(up_level.blocks, up_level.attentions):
                    h = cat_attention(cat_block(torch.cat([h, skips.pop()], dim=1), emb))
            h = up(h)
        out = self.conv_out(self.out_act(self.out_norm(h)))
        if self.output_sigmoid:
            out = torch.sigmoid(out)
        if self.output_residual:
            out = x + out
        return out

    @torch.jit.export
    def encoder_features(self, x: torch.Tensor, timesteps: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Outputs of each encoder level, used as a feature extractor when no pretrained backbone is given.

        Args:
            x: (B, in_channels, *spatial).
            timesteps: as in :meth:`forward`.

        Returns:
            one (B, channels[i], *spatial / 2**i) tensor per level.
        """
        emb = self._embed(x, timesteps)
        h = self.conv_in(x)
        features: List[torch.Tensor] = []
        for feature_level, feature_down in zip(self.down_levels, self.downsamplers):
            for feature_block, feature_attention in zip(feature_level.blocks, feature_level.attentions):
                h = feature_attention(feature_block(h, emb))
            features.append(h)
            if not isinstance(feature_down, nn.Identity):
                h = feature_down(h)
        return features
