"""The order network: reads a clean sequence and outputs per-token clock rates ``b_in`` (and ``b_um``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from insertion_diffusion.nn.transformer import ScalarHead, Transformer, TransformerConfig

RATE_FNS = ("softplus", "exp")


class BoundedRate(nn.Module):
    """Map a raw scalar ``s`` to a rate in ``[b_min, b_max]``.

    ``softplus``: ``b = min(b_min + softplus(s), b_max)`` (gradients stay alive near ``b_min``, hard ceiling).
    ``exp``: ``b = min(b_min + exp(s), b_max)``.

    Args:
        b_min, b_max: bounds (``0 <= b_min < b_max``).
        fn: "softplus" or "exp".
    """

    def __init__(self, b_min: float, b_max: float, fn: str = "softplus") -> None:
        super().__init__()
        if fn not in RATE_FNS:
            # LoFlexMDM checks its model.order_rate_fn first and names the key; this guards direct use.
            raise ValueError(f"rate function fn={fn!r} is not one of: {', '.join(RATE_FNS)}")
        if not (0.0 <= b_min < b_max):
            raise ValueError(f"rate bounds must satisfy 0 <= b_min < b_max, got b_min={b_min}, b_max={b_max}")
        self.b_min, self.b_max, self.fn = float(b_min), float(b_max), fn

    def forward(self, s: Tensor) -> Tensor:
        s = s.float()
        b = self.b_min + (F.softplus(s) if self.fn == "softplus" else s.clamp_max(30.0).exp())
        return b.clamp_max(self.b_max)


class OrderNetwork(nn.Module):
    """A transformer over the clean sequence ``z1`` with per-token rate heads.

    Args:
        vocab_size: token ids.
        cfg: backbone size; ``cfg.time_conditioning`` decides whether the rates also see ``t``.
        b_min, b_max, rate_fn: bounds and squashing of the rates (see :class:`BoundedRate`).
        learn_b_um: also output ``b_um``; otherwise ``b_um = 1``.
        backbone: reuse this transformer instead of building one (the shared-backbone variant).
        time_conditioning: the rate heads are modulated by ``t`` (needs a time-conditioned backbone).
    """

    def __init__(
        self,
        vocab_size: int,
        cfg: TransformerConfig,
        b_min: float = 1.01,
        b_max: float = 100.0,
        rate_fn: str = "softplus",
        learn_b_um: bool = False,
        backbone: Transformer | None = None,
        time_conditioning: bool = False,
        max_length: int = 0,
    ) -> None:
        super().__init__()
        self.shared = backbone is not None
        self.net = backbone if backbone is not None else Transformer(vocab_size, cfg, max_length=max_length)
        use_t = time_conditioning and self.net.cfg.time_conditioning
        d, c = self.net.cfg.d_model, (self.net.cfg.d_cond if use_t else None)
        # Heads start at s = -2: b = b_min + softplus(-2) ~ b_min + 0.13 (near-uniform order at the start).
        self.b_in_head = ScalarHead(d, c, bias_init=-2.0)
        self.b_um_head = ScalarHead(d, c, bias_init=-2.0) if learn_b_um else None
        self.bound = BoundedRate(b_min, b_max, rate_fn)

    def forward(self, z1: Tensor, valid: Tensor, t: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Rates for every position of the clean rows.

        Args:
            z1: (B, L) clean tokens; valid: (B, L) bool; t: (B,) times or None (time-free rates).

        Returns:
            ``(b_in, b_um)``: (B, L) fp32 each; ``b_um`` is None when it is fixed to 1.
        """
        h, cond = self.net(z1, t, valid)
        b_in = self.bound(self.b_in_head(h, cond))
        b_um = self.bound(self.b_um_head(h, cond)) if self.b_um_head is not None else None
        return b_in, b_um
