"""A time-conditioned transformer (DiT-style AdaLN blocks, rotary positions, PyTorch SDPA attention).

The same blocks serve every method: bidirectional with a key-padding mask for the diffusion and
insertion models, causal (``causal=True``) for autoregressive ones, block-causal (``causal=True`` with
``block_size > 1``) for the hyperschedule model.

Shapes: ``B`` batch, ``W`` sequence width, ``d`` model width, ``c`` conditioning width.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIG_KEYS = "(model.backbone or model.order_backbone)"
"""Where a :class:`TransformerConfig` comes from in a run config; error messages name it."""


@dataclass
class TransformerConfig:
    """Size of a transformer backbone.

    Attributes:
        num_layers: number of blocks.
        d_model: hidden width.
        num_heads: attention heads (``d_model`` must be divisible by it).
        d_ff: feed-forward width (default ``4 * d_model``).
        d_cond: width of the time conditioning vector.
        dropout: dropout on the attention block's output projection and on the feed-forward output.
        attention_dropout: dropout on the attention probabilities (default 0, as in DiT/DDiT backbones; on CPU
            a non-zero value also forces PyTorch's slower math attention path).
        rotary_dim: how many dims per head get rotary embeddings (default: all).
        time_conditioning: whether blocks are modulated by ``t`` (AdaLN); False gives plain LayerNorm.
        absolute_positions: also add a learned absolute position embedding (up to the model's max length).
            Rotary embeddings only see relative offsets; tasks with a fixed layout (e.g. a prompt of
            ``u v`` edge pairs, where a token's parity matters) learn much faster with absolute positions.
        conv_kernel: width of a depthwise convolution over neighbouring positions added to the residual
            stream before every block (0 = none; odd for bidirectional models, any width >= 2 when causal,
            where it only looks back). In-context lookups ("the node paired with the goal") need one
            attention head to fetch a neighbour and a second to match on it; the convolution supplies the
            neighbour directly, which shortens the loss plateau before such lookups are learned from
            thousands of steps to hundreds (see docs/star_graphs.md).
    """

    num_layers: int = 4
    d_model: int = 256
    num_heads: int = 4
    d_ff: int | None = None
    d_cond: int = 128
    dropout: float = 0.1
    attention_dropout: float = 0.0
    rotary_dim: int | None = None
    time_conditioning: bool = True
    absolute_positions: bool = False
    conv_kernel: int = 0

    def __post_init__(self) -> None:
        # The same dataclass is built from either backbone section of a config, and jsonargparse reports the
        # bare ValueError: the message says which setting it is and where it lives. The >= 1 checks come before
        # the divisibility check, which would otherwise divide by num_heads = 0.
        for key in ("num_layers", "d_model", "num_heads", "d_cond"):
            if getattr(self, key) < 1:
                raise ValueError(f"backbone setting {key}={getattr(self, key)} must be >= 1 {CONFIG_KEYS}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"backbone setting d_model={self.d_model} must be divisible by num_heads={self.num_heads} {CONFIG_KEYS}"
            )
        for key in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"backbone setting {key}={getattr(self, key)} must be in [0, 1) {CONFIG_KEYS}")
        if self.conv_kernel < 0 or self.conv_kernel == 1:
            raise ValueError(
                f"backbone setting conv_kernel={self.conv_kernel} must be 0 (off) or >= 2 (3 is typical) {CONFIG_KEYS}"
            )


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of ``t in [0, 1]`` followed by an MLP: (B,) -> (B, c)."""

    def __init__(self, d_cond: int, num_freqs: int = 128) -> None:
        super().__init__()
        self.num_freqs = num_freqs
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(num_freqs) / num_freqs)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, d_cond), nn.SiLU(), nn.Linear(d_cond, d_cond))

    def forward(self, t: Tensor) -> Tensor:
        # Scale to [0, 1000] so low frequencies still resolve small differences in t.
        angles = (1000.0 * t.float())[:, None] * self.freqs[None, :]
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))


def rotary_tables(width: int, rotary_dim: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables for positions ``0..width-1``: each (W, rotary_dim / 2)."""
    inv = 1.0 / (10_000.0 ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim))
    ang = torch.arange(width, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of ``x`` (B, H, W, Dh) in adjacent halves."""
    r = cos.shape[-1]
    x1, x2 = x[..., :r], x[..., r : 2 * r]
    # addcmul fuses each half's multiply-add into one pass (element-wise passes, not matmuls, bound this on CPU).
    parts = [torch.addcmul(x1 * cos, x2, sin, value=-1.0), torch.addcmul(x2 * cos, x1, sin)]
    if 2 * r < x.shape[-1]:
        parts.append(x[..., 2 * r :])
    return torch.cat(parts, dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN: ``x * (1 + scale) + shift`` with per-row (B, d) shift and scale (one fused pass over ``x``)."""
    return torch.addcmul(shift[:, None, :], x, 1.0 + scale[:, None, :])


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper mask on CPU; elsewhere exactly ``nn.Dropout``.

    On CPU, ``bernoulli_`` draws one Mersenne-Twister number per element and then copies an integer buffer
    into the float mask: about 5 ms for a (64, 38, 256) activation on this project's 2-core machine, nearly
    as long as the matmul it follows. Here one 64-bit draw gives four 15-bit uniforms (each 16-bit chunk
    with its top bit cleared, so the 63-bit ``random_`` range does not bias the last one), and an element
    is kept when its uniform is ``>= round(p * 2**15)``. The dropout rate is therefore ``p`` rounded to a
    multiple of ``2**-15``, and the kept values are scaled by the inverse of that rate's complement, so the
    expectation is exact. ``benchmarks/speed_elementwise.py`` times both; the draws follow the default
    generator, so ``torch.manual_seed`` still makes runs repeatable.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        threshold = round(self.p * 32768)
        if threshold >= 32768:
            return torch.zeros_like(x)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_()
        keep = (bits.view(torch.int16)[:n] & 0x7FFF) >= threshold
        # Multiply by the bool mask directly (no float copy of it), then rescale the product in place.
        return (x * keep.view(x.shape)).mul_(32768 / (32768 - threshold))


class TokenConv(nn.Module):
    """Depthwise convolution over positions, added to the residual stream: (B, W, d) -> (B, W, d).

    Bidirectional: centred (``kernel`` must be odd). Causal: position ``i`` sees ``i - kernel + 1 .. i``.
    Padding positions are zeroed first, so they never leak into real ones.
    """

    def __init__(self, d_model: int, kernel: int, causal: bool) -> None:
        super().__init__()
        if not causal and kernel % 2 == 0:
            raise ValueError(
                f"backbone conv_kernel={kernel} must be odd for a bidirectional model (the convolution is centred); "
                "use an odd width such as 3, or 0 to turn it off"
            )
        self.kernel, self.causal = kernel, causal
        self.conv = nn.Conv1d(d_model, d_model, kernel, groups=d_model)
        # Zero bias at initialisation. PyTorch's default bias (uniform in +-1/sqrt(kernel)) adds the same vector,
        # of norm ~0.33 sqrt(d_model), to every position, about 16 times the 0.02-scale embeddings: after the next
        # LayerNorm every token then looks alike. A network without a strong loss on its outputs (the order
        # network) did not recover the token identities in the runs measured (docs/results.md, fifth session).
        nn.init.zeros_(self.conv.bias)

    def forward(self, h: Tensor, valid: Tensor | None) -> Tensor:
        x = h if valid is None else h * valid[..., None].to(h.dtype)
        left = self.kernel - 1 if self.causal else self.kernel // 2
        right = 0 if self.causal else self.kernel // 2
        x = F.pad(x.transpose(1, 2), (left, right))
        return h + self.conv(x).transpose(1, 2)

    def forward_cached(self, h: Tensor, history: Tensor, pos: int) -> Tensor:
        """Causal step for new positions ``pos .. pos+n-1`` (h: (B, n, d)); ``history`` (B, width, d) holds
        earlier inputs and receives these in place."""
        n = h.shape[1]
        history[:, pos : pos + n] = h
        lo = max(0, pos - self.kernel + 1)
        x = history[:, lo : pos + n].transpose(1, 2)
        x = F.pad(x, (self.kernel - 1 - (pos - lo), 0))
        return h + self.conv(x).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block with AdaLN-Zero modulation from the conditioning vector."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d, h = cfg.d_model, cfg.num_heads
        self.num_heads = h
        self.norm1 = nn.LayerNorm(d, elementwise_affine=not cfg.time_conditioning)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=not cfg.time_conditioning)
        d_ff = cfg.d_ff or 4 * d
        # Exact (erf) GELU: on CPU it is ~3x faster than the tanh approximation (docs/benchmarks.md).
        self.ff = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))
        self.attention_dropout = cfg.attention_dropout
        self.drop = Dropout(cfg.dropout)
        self.ada = None
        if cfg.time_conditioning:
            self.ada = nn.Linear(cfg.d_cond, 6 * d)
            # Zero-init: every block starts as the identity (AdaLN-Zero).
            nn.init.zeros_(self.ada.weight)
            nn.init.zeros_(self.ada.bias)

    def _pre_attention(self, x: Tensor, cond: Tensor | None) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        if self.ada is not None and cond is not None:
            sh1, sc1, g1, sh2, sc2, g2 = self.ada(cond).chunk(6, dim=-1)
            return modulate(self.norm1(x), sh1, sc1), (g1, sh2, sc2, g2)
        return self.norm1(x), (None, None, None, None)

    def _post_attention(self, x: Tensor, a: Tensor, mod: tuple[Tensor | None, ...]) -> Tensor:
        g1, sh2, sc2, g2 = mod
        a = self.drop(self.proj(a))
        # Gated residuals as one addcmul each: x + g * a in a single pass.
        x = x + a if g1 is None else torch.addcmul(x, g1[:, None, :], a)
        h = self.norm2(x) if g2 is None else modulate(self.norm2(x), sh2, sc2)
        f = self.drop(self.ff(h))
        return x + f if g2 is None else torch.addcmul(x, g2[:, None, :], f)

    def _qkv(self, h: Tensor, rot: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        B, W, d = h.shape
        q, k, v = self.qkv(h).view(B, W, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        cos, sin = rot
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(
        self, x: Tensor, cond: Tensor | None, rot: tuple[Tensor, Tensor], attn_mask: Tensor | None, causal: bool
    ) -> Tensor:
        B, W, d = x.shape
        h, mod = self._pre_attention(x, cond)
        q, k, v = self._qkv(h, rot)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=causal and attn_mask is None,
        )
        return self._post_attention(x, a.transpose(1, 2).reshape(B, W, d), mod)

    def forward_cached(
        self,
        x: Tensor,
        cond: Tensor | None,
        rot: tuple[Tensor, Tensor],
        cache: tuple[Tensor, Tensor],
        pos: int,
        mask: Tensor | None,
    ) -> Tensor:
        """Attention of ``n`` new positions ``pos .. pos+n-1`` (x: (B, n, d)) over the cached keys and values of
        positions ``< pos`` plus their own, under ``mask`` (n, pos + n) bool (None: every key); writes their
        keys/values into ``cache`` in place."""
        B, n, d = x.shape
        h, mod = self._pre_attention(x, cond)
        q, k, v = self._qkv(h, rot)
        k_cache, v_cache = cache
        k_cache[:, :, pos : pos + n] = k
        v_cache[:, :, pos : pos + n] = v
        a = F.scaled_dot_product_attention(q, k_cache[:, :, : pos + n], v_cache[:, :, : pos + n], attn_mask=mask)
        return self._post_attention(x, a.transpose(1, 2).reshape(B, n, d), mod)


class Transformer(nn.Module):
    """Token embedding + blocks + final norm; returns hidden states and the conditioning vector.

    Args:
        vocab_size: number of token ids.
        cfg: the backbone size.
        causal: causal attention (autoregressive) instead of bidirectional.
        max_length: longest sequence (needed only with ``cfg.absolute_positions``).
        block_size: with ``causal``, attention is block-causal over blocks of this many positions: a position
            sees every position of its own block and of the blocks before it (1 = plain causal). Used by the
            hyperschedule model, whose finished blocks then never change and can be kept in a KV cache.
    """

    def __init__(
        self, vocab_size: int, cfg: TransformerConfig, causal: bool = False, max_length: int = 0, block_size: int = 1
    ) -> None:
        super().__init__()
        if block_size < 1 or (block_size > 1 and not causal):
            raise ValueError(f"block_size={block_size} must be >= 1, and > 1 only with causal=True")
        self.cfg = cfg
        self.causal = causal
        self.block_size = block_size
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos_embed = None
        if cfg.absolute_positions:
            if max_length < 1:
                raise ValueError("absolute_positions needs the model's max_length")
            self.pos_embed = nn.Embedding(max_length, cfg.d_model)
            nn.init.normal_(self.pos_embed.weight, std=0.02)
        self.time = TimestepEmbedding(cfg.d_cond) if cfg.time_conditioning else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.convs = None
        if cfg.conv_kernel:
            self.convs = nn.ModuleList(TokenConv(cfg.d_model, cfg.conv_kernel, causal) for _ in range(cfg.num_layers))
        head_dim = cfg.d_model // cfg.num_heads
        rd = cfg.rotary_dim or head_dim
        if cfg.rotary_dim is None and head_dim % 2:
            # rotary_dim was left at its default (the whole head): name the settings the user did give.
            raise ValueError(
                f"backbone settings d_model={cfg.d_model} and num_heads={cfg.num_heads} give an odd head dim "
                f"{head_dim}; rotary positions rotate pairs of dims: pick d_model / num_heads even, or set "
                f"rotary_dim to an even value below {head_dim} {CONFIG_KEYS}"
            )
        if rd % 2 or rd > head_dim:
            raise ValueError(
                f"backbone setting rotary_dim={rd} must be even and <= the head dim d_model / num_heads = {head_dim} "
                f"{CONFIG_KEYS}"
            )
        self.rotary_dim = rd

    def forward(self, x: Tensor, t: Tensor | None, valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Encode tokens.

        Args:
            x: (B, W) long token ids.
            t: (B,) float times in [0, 1] (ignored without time conditioning).
            valid: (B, W) bool key-padding mask (True = real token), or None for no padding.

        Returns:
            ``(h, cond)``: hidden states (B, W, d) and the conditioning vector (B, c) or None.
        """
        h = self.embed(x)
        if self.pos_embed is not None:
            if x.shape[1] > self.pos_embed.num_embeddings:
                raise ValueError(f"sequence width {x.shape[1]} exceeds max_length {self.pos_embed.num_embeddings}")
            h = h + self.pos_embed.weight[None, : x.shape[1]]
        cond = self.time(t) if self.time is not None and t is not None else None
        rot = rotary_tables(x.shape[1], self.rotary_dim, x.device, h.dtype)
        W = x.shape[1]
        attn_mask = None
        if self.causal and self.block_size > 1:
            attn_mask = self.causal_mask(0, W, x.device)[None, None]
        if valid is not None:
            keys = valid[:, None, None, :]
            if self.causal and attn_mask is None:
                attn_mask = torch.ones(W, W, dtype=torch.bool, device=x.device).tril()[None, None]
            attn_mask = keys if attn_mask is None else keys & attn_mask
        for i, block in enumerate(self.blocks):
            if self.convs is not None:
                h = self.convs[i](h, valid)
            h = block(h, cond, rot, attn_mask, self.causal)
        return h, cond

    def causal_mask(self, pos: int, n: int, device: torch.device) -> Tensor:
        """(n, pos + n) bool: which keys ``0 .. pos+n-1`` the queries ``pos .. pos+n-1`` see (causal, or
        block-causal with ``block_size``)."""
        q = torch.arange(pos, pos + n, device=device) // self.block_size
        k = torch.arange(pos + n, device=device) // self.block_size
        return k[None, :] <= q[:, None]

    # --- incremental (KV-cached) causal decoding ----------------------------------------------------
    def new_cache(self, batch_size: int, width: int, device: torch.device, dtype: torch.dtype) -> list[tuple[Tensor, ...]]:
        """Empty buffers per block: keys and values (B, H, width, Dh), plus the block inputs (B, width, d)
        when the backbone has a causal convolution (it needs the previous ``conv_kernel - 1`` of them)."""
        if not self.causal:
            raise ValueError("a KV cache needs a causal transformer (causal=True)")
        H = self.cfg.num_heads
        shape = (batch_size, H, width, self.cfg.d_model // H)
        extra = ((batch_size, width, self.cfg.d_model),) if self.convs is not None else ()
        return [tuple(torch.empty(s, device=device, dtype=dtype) for s in (shape, shape, *extra)) for _ in self.blocks]

    def forward_cached(self, x: Tensor, cache: list[tuple[Tensor, ...]], pos: int, t: Tensor | None = None) -> Tensor:
        """Hidden states (B, n, d) of the new tokens ``x`` (B, n) at positions ``pos .. pos+n-1``.

        Positions ``< pos`` must already be in ``cache`` (from earlier calls); a prefill is ``pos=0`` with the
        whole prefix. Every row shares the same positions, so there is no key-padding mask: a caller with
        prompts of different lengths feeds the prompt tokens step by step (teacher forcing) past the shortest.
        Equals :meth:`forward` on the full prefix, position for position, up to float rounding. With
        ``block_size > 1`` a call may start anywhere after the last block whose keys are final and re-run the
        blocks after it (their cached keys and values are overwritten).
        """
        n = x.shape[1]
        h = self.embed(x)
        if self.pos_embed is not None:
            if pos + n > self.pos_embed.num_embeddings:
                raise ValueError(f"position {pos + n - 1} exceeds max_length {self.pos_embed.num_embeddings}")
            h = h + self.pos_embed.weight[None, pos : pos + n]
        cond = self.time(t) if self.time is not None and t is not None else None
        cos, sin = rotary_tables(pos + n, self.rotary_dim, x.device, h.dtype)
        rot = (cos[pos:], sin[pos:])
        # A single query sees every key up to its own position, under either mask.
        mask = self.causal_mask(pos, n, x.device) if n > 1 else None
        for i, (block, kv) in enumerate(zip(self.blocks, cache)):
            if self.convs is not None:
                h = self.convs[i].forward_cached(h, kv[2], pos)
            h = block.forward_cached(h, cond, rot, kv[:2], pos, mask)
        return h


class AdaLNHead(nn.Module):
    """Final AdaLN + linear projection to ``out_dim`` per position (the token / LM head).

    Zero-initialised so that initial predictions are uniform.
    """

    def __init__(self, d_model: int, d_cond: int | None, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, elementwise_affine=d_cond is None)
        self.ada = nn.Linear(d_cond, 2 * d_model) if d_cond else None
        if self.ada is not None:
            nn.init.zeros_(self.ada.weight)
            nn.init.zeros_(self.ada.bias)
        self.out = nn.Linear(d_model, out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: Tensor, cond: Tensor | None) -> Tensor:
        h = self.norm(h)
        if self.ada is not None and cond is not None:
            shift, scale = self.ada(cond).chunk(2, dim=-1)
            h = modulate(h, shift, scale)
        return self.out(h)


class ScalarHead(nn.Module):
    """AdaLN(norm(h)) -> Linear -> GELU -> Linear(1): a raw per-position scalar (B, W), computed in fp32.

    Args:
        d_model, d_cond: widths.
        bias_init: initial output bias (sets the initial rate after the caller's squashing function).
    """

    def __init__(self, d_model: int, d_cond: int | None, bias_init: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, elementwise_affine=d_cond is None)
        self.ada = nn.Linear(d_cond, 2 * d_model) if d_cond else None
        if self.ada is not None:
            nn.init.zeros_(self.ada.weight)
            nn.init.zeros_(self.ada.bias)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.constant_(self.mlp[2].bias, bias_init)

    def forward(self, h: Tensor, cond: Tensor | None) -> Tensor:
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = self.norm(h.float())
            if self.ada is not None and cond is not None:
                shift, scale = self.ada(cond.float()).chunk(2, dim=-1)
                h = modulate(h, shift, scale)
            return self.mlp(h).squeeze(-1)


def without_time(cfg: TransformerConfig) -> TransformerConfig:
    """``cfg`` with time conditioning switched off, for methods that have no time (ARM, the Insertion Process)."""
    return dataclasses.replace(cfg, time_conditioning=False)


# Checkpoints store this config in their hyper-parameters; allow torch's weights-only unpickler to load it.
torch.serialization.add_safe_globals([TransformerConfig])
