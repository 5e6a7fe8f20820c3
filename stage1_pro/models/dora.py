"""The project's own low-rank adapters: LoRA, a fast DoRA, and LoRA on the Q/V slices of a fused qkv.

Method notes: ``docs/methods.md`` §8 (LoRA, DoRA, why DoRAN is not built) and §6 (the Q/V LoRA of
ExPLoRA).

All three wrap a frozen ``nn.Linear`` (or a ``groups=1`` ``nn.Conv2d``) and merge back into a plain
layer of the same type, so a trained model is saved and served as an ordinary timm network.

LoRA (Hu et al., arXiv 2106.09685)::

    y = x W0ᵀ + b + s · (x Aᵀ) Bᵀ,      s = alpha / r,  A Kaiming-uniform, B = 0.

DoRA (Liu et al., arXiv 2402.09353, ICML 2024, Eq. 5)::

    W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row,   m initialised to ‖W0‖_row,

with the norm treated as a constant in the backward pass (the paper's §4.3 memory trick, also
what HF PEFT does). Because the norm is a per-output-unit scale, W' never needs to exist::

    y = k ⊙ (x W0ᵀ + s·(x Aᵀ) Bᵀ) + b,     k = m / ‖W0 + s·B A‖_row  (detached norm).

``DoRALayer`` folds ``s·k`` into B (an out × r tensor) and applies k to the frozen base output with
one fused ``addcmul``; the norm itself is an out × in computation on weights (no activations),
done under ``no_grad`` in fp32. Compared with PEFT 0.21's DoRA, which rebuilds ``B A`` through an
identity-matrix forward, subtracts the bias from the base output and spends four elementwise passes
over the activations (promoted to fp32 under bf16 autocast), this costs one pass more than LoRA.
The outputs and gradients are the same as PEFT's (``tests/test_dora.py`` checks both, and the merge).

With dropout > 0 in training, PEFT's semantics are kept exactly: the base path sees the clean input
and the DoRA correction sees the dropped one, ``y = x W0ᵀ + b + (k - 1) ⊙ x̃ W0ᵀ + k ⊙ s·(x̃ Aᵀ) Bᵀ``.

DoRAN (arXiv 2510.04331) is deliberately absent: see :func:`create_adapter` and the README.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F  # noqa: N812 (the PyTorch convention)
from torch import nn

from stage1_pro.errors import ConfigError, NotBuiltError
from stage1_pro.models.lowrank_ops import DoRALinear, LoRALinear, autocast_off

__all__ = [
    "ADAPTER_METHODS",
    "DORAN_NOT_BUILT",
    "DoRALayer",
    "FusedQKVLoRA",
    "LoRALayer",
    "LowRankAdapter",
    "apply_adapters",
    "create_adapter",
    "merge_adapters",
    "wrap_modules",
]

#: Why ``peft_method="doran"`` is refused (also printed by the README's "Research phases 4–6").
DORAN_NOT_BUILT = (
    "peft_method='doran' is not built: DoRAN (Diep et al., arXiv 2510.04331) is known only from its abstract "
    "and third-party summaries. They name a learnable positive term tau added to DoRA's norm and auxiliary "
    "networks that generate the low-rank matrices, shared across the query and value projections (v1 of the "
    "abstract says 'across layers'), but not the auxiliary networks' inputs, widths or activations, how "
    "tau is parameterised, kept positive and initialised, whether the norm is detached, or any "
    "hyperparameter; no official code exists. Implementing it would mean inventing most of the method. "
    "Use peft_method=dora (the default) or lora."
)


def _is_supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


class _MagnitudeGrad(torch.autograd.Function):
    """Identity on ``y = k ⊙ base(x)`` (k already folded into W0) whose backward adds ``dL/dk``.

    With k folded into the frozen weight, autograd would get ``dL/dk`` only through ``dL/dW``, a
    full out × in gradient matmul; here it is the per-channel reduction ``Σ g ⊙ y / k``, and the
    input gradient ``g (k ⊙ W0)`` needs no extra elementwise pass over the activations. A channel with
    k = 0 (an all-zero row of W0) gets zero magnitude gradient.
    """

    @staticmethod
    def forward(ctx, scaled: torch.Tensor, k: torch.Tensor, channel_dim: int) -> torch.Tensor:
        ctx.save_for_backward(scaled, k)
        ctx.channel_dim = channel_dim
        return scaled.view_as(scaled)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        scaled, k = ctx.saved_tensors
        grad_k = None
        if ctx.needs_input_grad[1]:
            dim = ctx.channel_dim % grad.dim()
            dims = [d for d in range(grad.dim()) if d != dim]
            summed = (grad * scaled).sum(dim=dims, dtype=k.dtype)
            grad_k = summed / torch.where(k == 0, torch.ones_like(k), k)
        return grad, grad_k, None


class LowRankAdapter(nn.Module):
    """Common part of the adapters: a frozen base layer plus trainable ``lora_A`` (r × in[×k×k]) and
    ``lora_B`` (out × r[×1×1]), initialised as in LoRA/PEFT (A Kaiming-uniform with a=√5, B zero).

    Args:
        base_layer: the ``nn.Linear`` or ``nn.Conv2d`` (``groups=1``, zero padding) to adapt; its
            parameters are frozen.
        rank: r.
        alpha: scaling numerator; the update is ``(alpha / rank) · B A``.
        dropout: dropout on the adapter's input (training only).
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not _is_supported(base_layer):
            raise ConfigError(
                f"low-rank adapters wrap nn.Linear or nn.Conv2d with groups=1, not {base_layer!r}; "
                "exclude this module from the adapter's target modules"
            )
        if isinstance(base_layer, nn.Conv2d) and base_layer.padding_mode != "zeros":
            raise ConfigError(
                f"adapters support zero-padded convolutions only (padding_mode={base_layer.padding_mode!r}); "
                "exclude this module from the adapter's target modules"
            )
        if rank < 1:
            raise ConfigError(f"adapter rank must be >= 1 (got {rank})")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.rank = int(rank)
        self.scaling = float(alpha) / self.rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base_layer.weight
        out_features, in_shape = weight.shape[0], weight.shape[1:]
        self.lora_A = nn.Parameter(
            torch.empty(self.rank, *in_shape, dtype=weight.dtype, device=weight.device)
        )
        b_shape = (out_features, self.rank) + (1,) * (weight.dim() - 2)
        self.lora_B = nn.Parameter(torch.zeros(b_shape, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    # --- the three linear maps (same op as the base layer) -----------------------------------
    def _base(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, base.stride, base.padding, base.dilation)

    def _add_up(
        self, out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``out + up(h) + bias``, for a Linear as one ``addmm`` (no separate up-projection tensor).

        The bias rides along as one more low-rank column (``h`` gets a column of ones, ``weight`` the
        bias), so the sum costs one read and one write of the output instead of four passes.
        """
        if not isinstance(self.base_layer, nn.Linear):
            return out + F.conv2d(h, weight, bias)
        h2 = h.reshape(-1, h.shape[-1])
        if bias is not None:
            h2 = torch.cat([h2, h2.new_ones(h2.shape[0], 1)], dim=1)
            weight = torch.cat([weight, bias.to(weight.dtype)[:, None]], dim=1)
        return torch.addmm(out.reshape(-1, out.shape[-1]), h2, weight.t()).view(out.shape)

    def _fused_path(self) -> bool:
        """A Linear base with no dropout active: the fused autograd functions of :mod:`.lowrank_ops` apply."""
        return isinstance(self.base_layer, nn.Linear) and (
            isinstance(self.dropout, nn.Identity) or not self.training
        )

    def _channel_view(self, vector: torch.Tensor) -> torch.Tensor:
        """A per-output-unit vector shaped to broadcast over the layer's output."""
        return vector if isinstance(self.base_layer, nn.Linear) else vector.view(1, -1, 1, 1)

    def _b_scaled(self, factor: torch.Tensor | float) -> torch.Tensor:
        """``B`` with a per-output factor folded in (an out × r tensor: far cheaper than scaling outputs)."""
        if isinstance(factor, float):
            return self.lora_B * factor
        return self.lora_B * factor.view((-1,) + (1,) * (self.lora_B.dim() - 1)).to(self.lora_B.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` in the base weight's shape."""
        w = self.base_layer.weight
        delta = self.lora_B.reshape(w.shape[0], self.rank) @ self.lora_A.reshape(self.rank, -1)
        return (self.scaling * delta).reshape(w.shape)

    def merged_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """A plain layer of the base type with the adapted weight (and the base bias), trainable again."""
        merged = copy.deepcopy(self.base_layer)
        merged.weight.copy_(self.merged_weight().to(merged.weight.dtype))
        for p in merged.parameters():
            p.requires_grad_(True)
        return merged

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


class LoRALayer(LowRankAdapter):
    """LoRA: ``y = base(x) + s · B A x̃`` (x̃ = dropout(x)); merge ``W0 + s·B A``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self._fused_path():
            return LoRALinear.apply(x, base.weight, base.bias, self.lora_A, self.lora_B, self.scaling)
        h = self._base(self.dropout(x), self.lora_A, None)
        return self._add_up(self._base(x, base.weight, base.bias), h, self._b_scaled(self.scaling), None)

    def merged_weight(self) -> torch.Tensor:
        return self.base_layer.weight + self.delta_weight().to(self.base_layer.weight.dtype)


class DoRALayer(LowRankAdapter):
    """DoRA with a detached weight norm, computed without materialising ``W'`` (see module doc).

    ``lora_magnitude`` (one entry per output unit) is the trainable m, initialised to ``‖W0‖_row``.
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, rank, alpha, dropout)
        w = base_layer.weight.detach()
        self.lora_magnitude = nn.Parameter(torch.linalg.vector_norm(w.float().flatten(1), dim=1).to(w.dtype))

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``‖W0 + s·B A‖_row`` in at least fp32 (autocast off: bf16 would round it), without a graph."""
        w = self.base_layer.weight
        dtype = torch.promote_types(w.dtype, torch.float32)
        with autocast_off(w):
            adapted = torch.addmm(
                w.to(dtype).flatten(1),
                self.lora_B.to(dtype).reshape(w.shape[0], self.rank),
                self.lora_A.to(dtype).reshape(self.rank, -1),
                alpha=self.scaling,
            )
            return torch.linalg.vector_norm(adapted, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self._fused_path():
            return DoRALinear.apply(
                x, base.weight, base.bias, self.lora_A, self.lora_B, self.lora_magnitude, self.scaling
            )
        norm = self.weight_norm()
        scale = self.lora_magnitude.to(norm.dtype) / norm  # k = m / ‖·‖: the gradient reaches m only
        b_scaled = self._b_scaled(scale * self.scaling)  # s·k folded into B (out × r)
        h_in = self.dropout(x)
        if h_in is x:  # no dropout (or eval): k folded into W0, k's gradient from _MagnitudeGrad
            w = base.weight
            w_scaled = w * scale.detach().to(w.dtype).view((-1,) + (1,) * (w.dim() - 1))
            channel_dim = -1 if isinstance(base, nn.Linear) else 1
            scaled_base = _MagnitudeGrad.apply(self._base(x, w_scaled, None), scale, channel_dim)
            return self._add_up(scaled_base, self._base(x, self.lora_A, None), b_scaled, base.bias)
        # Dropout: PEFT's form (clean base path, dropped input for the DoRA correction).
        clean = self._base(x, base.weight, base.bias)
        dropped = self._base(h_in, base.weight, None)
        corrected = clean + dropped * self._channel_view((scale - 1).to(dropped.dtype))
        return self._add_up(corrected, self._base(h_in, self.lora_A, None), b_scaled, None)

    def merged_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        dtype = torch.promote_types(w.dtype, torch.float32)
        adapted = w.to(dtype) + self.delta_weight().to(dtype)
        norm = torch.linalg.vector_norm(adapted.flatten(1), dim=1)
        factor = (self.lora_magnitude.to(dtype) / norm).view((-1,) + (1,) * (w.dim() - 1))
        return factor * adapted


class FusedQKVLoRA(LowRankAdapter):
    """LoRA on chosen slices of a fused ``qkv`` projection (timm ``Attention.qkv``: out = 3·dim).

    timm computes Q, K and V with one ``nn.Linear(dim, 3*dim)``; plain LoRA on it would also adapt
    K. Here each chosen slice gets its own rank-r pair (A_q, B_q), (A_v, B_v); the A's are stacked
    (``lora_A``: (n·r) × dim) so one matmul serves all slices, and B is laid out block-diagonally in
    the fused output (zeros for the K rows, built per forward from the small ``lora_B``)::

        qkv(x) + s · [B_q (A_q x); 0; B_v (A_v x)]

    Args:
        base_layer: the fused ``nn.Linear`` (out_features divisible by 3).
        rank, alpha, dropout: as in LoRA, per slice.
        slices: which of "q", "k", "v" to adapt (ExPLoRA: Q and V).
    """

    _ORDER = ("q", "k", "v")

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        slices: Iterable[str] = ("q", "v"),
    ) -> None:
        if not isinstance(base_layer, nn.Linear) or base_layer.out_features % 3:
            raise ConfigError(
                f"FusedQKVLoRA needs an nn.Linear with out_features divisible by 3, got {base_layer!r}"
            )
        slices = tuple(slices)
        if not slices or any(s not in self._ORDER for s in slices) or len(set(slices)) != len(slices):
            raise ConfigError(f"slices={slices!r}: choose distinct entries of 'q', 'k', 'v'")
        super().__init__(base_layer, rank, alpha, dropout)
        self.slices = tuple(s for s in self._ORDER if s in slices)
        dim, n = base_layer.out_features // 3, len(self.slices)
        w = base_layer.weight
        # n stacked A's, each initialised like a LoRA A of its own; n B's of dim × r, zero.
        self.lora_A = nn.Parameter(
            torch.empty(n * self.rank, base_layer.in_features, dtype=w.dtype, device=w.device)
        )
        for i in range(n):
            nn.init.kaiming_uniform_(self.lora_A.data[i * self.rank : (i + 1) * self.rank], a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(n, dim, self.rank, dtype=w.dtype, device=w.device))

    def _fused_b(self) -> torch.Tensor:
        """(3·dim) × (n·r) block matrix: B_slice in its slice's rows and its A's columns, zeros elsewhere."""
        n, dim, r = self.lora_B.shape
        zeros = self.lora_B.new_zeros(dim, r)
        rows = []
        for name in self._ORDER:
            i = self.slices.index(name) if name in self.slices else -1
            rows.append(torch.cat([self.lora_B[j] if j == i else zeros for j in range(n)], dim=1))
        return torch.cat(rows, dim=0)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self._fused_b() @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        h = F.linear(self.dropout(x), self.lora_A)
        return self._add_up(F.linear(x, base.weight, base.bias), h, self._fused_b() * self.scaling, None)

    def merged_weight(self) -> torch.Tensor:
        return self.base_layer.weight + self.delta_weight().to(self.base_layer.weight.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, slices={''.join(self.slices)}"


#: ``peft_method`` -> adapter class (``doran`` is refused with :data:`DORAN_NOT_BUILT`).
ADAPTER_METHODS: dict[str, type[LowRankAdapter]] = {"lora": LoRALayer, "dora": DoRALayer}


def create_adapter(
    method: str, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0
) -> LowRankAdapter:
    """Wrap ``base_layer`` in the adapter named ``method`` (``lora`` | ``dora``).

    Raises:
        NotBuiltError: for ``doran`` (see :data:`DORAN_NOT_BUILT`).
        ConfigError: for an unknown method or an unsupported layer.
    """
    if method == "doran":
        raise NotBuiltError(DORAN_NOT_BUILT)
    if method not in ADAPTER_METHODS:
        raise ConfigError(f"peft_method={method!r} is unknown; allowed: {', '.join(ADAPTER_METHODS)}")
    return ADAPTER_METHODS[method](base_layer, rank, alpha, dropout)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def wrap_modules(
    model: nn.Module, names: Iterable[str], method: str, *, rank: int, alpha: float, dropout: float = 0.0
) -> list[str]:
    """Replace each named submodule of ``model`` by the ``method`` adapter around it (in place).

    Only the wrapped layers' own weights are frozen; freezing the rest of the model is the caller's
    choice. Returns the names.
    """
    names = list(names)
    for name in names:
        _set_submodule(model, name, create_adapter(method, model.get_submodule(name), rank, alpha, dropout))
    return names


def apply_adapters(
    model: nn.Module,
    method: str,
    target_modules: str,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap every supported layer whose name fully matches the regex ``target_modules``.

    Returns the replaced module names. Raises :class:`ConfigError` when nothing matches.
    Layers already wrapped, grouped convolutions and other layer types are skipped.
    """
    pattern = re.compile(target_modules)
    names = [
        name
        for name, module in model.named_modules()
        if name and pattern.fullmatch(name) and _is_supported(module) and ".base_layer" not in f".{name}"
    ]
    if not names:
        raise ConfigError(
            f"no nn.Linear / groups=1 nn.Conv2d module of {type(model).__name__} matches the adapter target "
            f"pattern {target_modules!r}"
        )
    return wrap_modules(model, names, method, rank=rank, alpha=alpha, dropout=dropout)


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every :class:`LowRankAdapter` in ``model`` by its merged plain layer (in place)."""
    names = [name for name, m in model.named_modules() if isinstance(m, LowRankAdapter)]
    for name in names:  # parents before children never matters: adapters do not nest
        _set_submodule(model, name, model.get_submodule(name).merge())
    return model
