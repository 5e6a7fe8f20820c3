"""ExPLoRA: parameter-efficient extended self-supervised pre-training of a ViT backbone (phase 4).

ExPLoRA (Khanna, Irgau, Lobell, Ermon; ICML 2025, arXiv 2406.10973) adapts a ViT pre-trained on
natural images to a new domain *before* supervised fine-tuning: starting from the source weights,
it fully unfreezes a few blocks (usually the last one; the released ViT-L checkpoint is
``blk23r64``: block 23 of 24 and LoRA rank 64), puts LoRA on the Q and V projections of every
other block, continues the source model's self-supervised objective on unlabeled in-domain
images, and merges. Supervised training then starts from the merged backbone.

What this module builds (``docs/methods.md`` §6):

* **Objective: DINO self-distillation** (Caron et al., ICCV 2021, arXiv 2104.14294): a student
  and an EMA teacher (momentum 0.996 -> 1, cosine), multi-crop views (2 global + ``n_local``
  local crops; the teacher sees the global ones), the teacher's output centred (EMA of its batch
  means, 0.9) and sharpened (temperature 0.04 vs the student's 0.1), cross-entropy between the
  teacher's and the student's distributions over every pair of different views. The projection
  head (3-layer MLP, L2-normalised bottleneck, weight-normalised prototype layer) is **freshly
  initialised**: public DINOv2 checkpoints ship without it. DINOv2's iBOT masked-token and KoLeo
  terms are left out, and the teacher temperature is fixed (no warm-up): documented
  simplifications of DINOv2's recipe for short runs.
* **Trainable parameters**: the last ``unfrozen_blocks`` blocks entirely; LoRA of rank ``r`` on
  Q and V in every other block; the projection head. Nothing else (patch/position embeddings,
  the final norm, K) trains. Whether ExPLoRA also unfreezes norms or embeddings is not known
  (the pre-training code is not public), so this follows the paper's description literally.
* **Q/V of a fused qkv**: timm computes Q, K and V with one ``Linear(dim, 3*dim)``. LoRA on that
  layer would adapt K too, so :class:`~stage1_pro.models.dora.FusedQKVLoRA` adds separate
  low-rank deltas to the Q and V slices of the fused output (and merges them into the Q and V
  rows of the fused weight).
* **Augmentations**, batched on the device (per-sample parameters): random resized crops with
  horizontal flips (global scale 0.4-1, local 0.05-0.4; local crops at 3/7 of the side, rounded
  to the patch size), colour jitter (p = 0.8), grayscale (p = 0.2), solarisation on the second
  global view (p = 0.2). Gaussian blur is left out.

The extended backbone is an artifact of its own: ``backbone.safetensors`` (the merged, plain timm
state dict, headless) plus ``explora.json`` (kind ``explora``: model, resolution, data, settings,
loss history, sha256 of the weights). ``explora_backbone=DIR`` reuses it in later runs;
:func:`load_extended_backbone` checks that it matches the run's model and resolution.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 (the PyTorch convention)

from stage1_pro import storage
from stage1_pro.errors import ArtifactError, ConfigError, DataError
from stage1_pro.provenance import sha256_bytes, utc_now

if TYPE_CHECKING:
    from stage1_pro.config import Stage1ProConfig

_LOG = logging.getLogger("stage1_pro.training.explora")

WEIGHTS_FILE = "backbone.safetensors"
INFO_FILE = "explora.json"
#: Sub-folder of a phase-4 run directory that holds its extended backbone.
RUN_SUBDIR = "explora"
#: ``data`` of an artifact pre-trained on the run's own training images.
TRAIN_IMAGES = "the training split's images (labels unused)"

__all__ = [
    "DINOHead",
    "DINOLoss",
    "ExPLoRA",
    "add_explora_adapters",
    "check_explora_model",
    "load_extended_backbone",
    "multi_crop",
    "run_phase4",
    "save_extended_backbone",
]


# ------------------------------------------------------------------------------------------
# model checks and the ExPLoRA parameterisation


def check_explora_model(model_name: str) -> None:
    """Raise :class:`ConfigError` unless ``model_name`` is a timm VisionTransformer (fused qkv)."""
    import timm

    if not timm.is_model(model_name):
        raise ConfigError(f"model_name={model_name!r} is not a timm model")
    module = timm.models.model_entrypoint(model_name).__module__
    if not module.endswith(".vision_transformer"):
        raise ConfigError(
            "phase 4 (ExPLoRA) needs a ViT backbone (a timm VisionTransformer such as "
            f"vit_small_patch14_dinov2, vit_tiny_patch16_224 or test_vit); model_name={model_name!r} is "
            f"defined in {module}. "
            "Pick a ViT model_name, or run phase 3 or 5 with this model."
        )


def _blocks(backbone: nn.Module) -> nn.Sequential:
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not all(
        isinstance(getattr(getattr(b, "attn", None), "qkv", None), nn.Linear) for b in blocks
    ):
        raise ConfigError(
            f"{type(backbone).__name__} is not a timm VisionTransformer with fused attn.qkv layers; "
            "ExPLoRA needs one (e.g. vit_small_patch14_dinov2)"
        )
    return blocks


def add_explora_adapters(
    backbone: nn.Module, *, unfrozen_blocks: int, rank: int, alpha: float | None = None
) -> dict[str, int]:
    """Freeze ``backbone``, unfreeze its last ``unfrozen_blocks`` blocks, add Q/V LoRA to the others.

    Returns the number of trainable parameters per group (``unfrozen_blocks``, ``lora``).
    """
    from stage1_pro.models.dora import FusedQKVLoRA

    blocks = _blocks(backbone)
    depth = len(blocks)
    if not 1 <= unfrozen_blocks < depth:
        raise ConfigError(
            f"explora_unfrozen_blocks={unfrozen_blocks}: must be between 1 and {depth - 1} for this "
            f"{depth}-block ViT (ExPLoRA unfreezes 1-2 blocks and puts LoRA on the others)"
        )
    backbone.requires_grad_(False)
    counts = {"unfrozen_blocks": 0, "lora": 0}
    for i, block in enumerate(blocks):
        if i >= depth - unfrozen_blocks:
            block.requires_grad_(True)
            counts["unfrozen_blocks"] += sum(p.numel() for p in block.parameters())
        else:
            block.attn.qkv = FusedQKVLoRA(block.attn.qkv, rank, float(alpha if alpha is not None else rank))
            counts["lora"] += sum(
                p.numel() for n, p in block.attn.qkv.named_parameters() if n.startswith("lora_")
            )
    return counts


# ------------------------------------------------------------------------------------------
# DINO head, loss and multi-crop views


class DINOHead(nn.Module):
    """DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes."""

    def __init__(
        self, in_dim: int, out_dim: int = 4096, hidden_dim: int = 2048, bottleneck_dim: int = 256
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        # DINO's weight-normalised last layer with the norm fixed to 1 ("norm_last_layer").
        return F.linear(z, F.normalize(self.prototypes, dim=-1))


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student over all view pairs.

    ``forward(student_out, teacher_out)`` takes the outputs of all crops stacked crop by crop
    (``n_crops * B`` student rows, ``n_global * B`` teacher rows); the teacher's view ``i`` is
    not compared with the student's view ``i``. The centre is updated after each call in
    training mode (EMA of the teacher's batch mean).
    """

    def __init__(
        self,
        out_dim: int,
        n_crops: int,
        n_global: int = 2,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.n_crops, self.n_global = n_crops, n_global
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
        student = F.log_softmax(student_out.float() / self.student_temp, dim=-1).chunk(self.n_crops)
        teacher_f = teacher_out.detach().float()
        teacher = F.softmax((teacher_f - self.center) / self.teacher_temp, dim=-1).chunk(self.n_global)
        total, pairs = student_out.new_zeros((), dtype=torch.float32), 0
        for iq, q in enumerate(teacher):
            for v, log_p in enumerate(student):
                if v == iq:
                    continue
                total = total + torch.sum(-q * log_p, dim=-1).mean()
                pairs += 1
        if self.training:
            with torch.no_grad():
                self.center.mul_(self.center_momentum).add_(
                    teacher_f.mean(0, keepdim=True), alpha=1 - self.center_momentum
                )
        return total / pairs


def _crop_grid(
    n: int, size: int, scale: tuple[float, float], generator: torch.Generator, device
) -> torch.Tensor:
    """Per-sample sampling grids of random resized crops (area ``scale``, ratio 3/4-4/3) with flips."""
    area = torch.empty(n).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(max=1.0)  # fractions of the side
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    return F.affine_grid(theta.to(device), [n, 3, size, size], align_corners=False)


def _color(x: torch.Tensor, generator: torch.Generator, solarize: float) -> torch.Tensor:
    """Colour jitter (p=0.8: brightness/contrast 0.4, saturation 0.2), grayscale (p=0.2), solarise."""
    n, dev = x.shape[0], x.device

    def draw(lo: float, hi: float) -> torch.Tensor:
        return torch.empty(n).uniform_(lo, hi, generator=generator).to(dev).view(n, 1, 1, 1)

    def coin(p: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) < p).to(dev).view(n, 1, 1, 1)

    jitter = coin(0.8)
    gray_w = torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)
    y = x * torch.where(jitter, draw(0.6, 1.4), 1.0)
    mean = (y * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    y = (y - mean) * torch.where(jitter, draw(0.6, 1.4), 1.0) + mean
    gray = (y * gray_w).sum(1, keepdim=True)
    y = (y - gray) * torch.where(jitter, draw(0.8, 1.2), 1.0) + gray
    y = torch.where(coin(0.2), (y * gray_w).sum(1, keepdim=True).expand_as(y), y).clamp(0, 1)
    if solarize > 0:
        y = torch.where(coin(solarize) & (y >= 0.5), 1.0 - y, y)
    return y


def multi_crop(
    images: torch.Tensor,
    *,
    global_size: int,
    local_size: int,
    n_local: int,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
) -> list[torch.Tensor]:
    """DINO views of a ``uint8`` NHWC batch: ``[global_1, global_2, local_1, ...]``, normalised NCHW."""
    from stage1_pro.transforms import normalize

    x = images.permute(0, 3, 1, 2).float() / 255.0
    n = x.shape[0]
    views = []
    for i in range(2 + n_local):
        is_global = i < 2
        size, scale = (global_size, global_scale) if is_global else (local_size, local_scale)
        grid = _crop_grid(n, size, scale, generator, x.device)
        crop = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        crop = _color(crop, generator, solarize=0.2 if i == 1 else 0.0)
        views.append(normalize(crop * 255.0, mean, std))
    return views


# ------------------------------------------------------------------------------------------
# the estimator


class _Student(nn.Module):
    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        # Views of one resolution go through the backbone together (as DINO's MultiCropWrapper).
        feats, i = [], 0
        while i < len(views):
            j = i
            while j < len(views) and views[j].shape[-1] == views[i].shape[-1]:
                j += 1
            feats.append(self.backbone(torch.cat(views[i:j])))
            i = j
        return self.head(torch.cat(feats))


@dataclass
class _Source:
    """Unlabeled images: a batch dataset (``ds[rows] -> (uint8 NHWC, ...)``) and its rows."""

    dataset: Any
    rows: np.ndarray
    description: str
    fingerprint: str | None = None


class ExPLoRA:
    """DINO-style extended pre-training of a timm ViT with ExPLoRA's parameter budget.

    Args:
        unfrozen_blocks: last blocks trained in full (``explora_unfrozen_blocks``; default 1).
        lora_rank: rank of the Q and V LoRA in every other block (``explora_lora_rank``; default 8);
            alpha = rank.
        epochs: passes over the unlabeled images (default 2).
        batch_size: images per step (default 64).
        lr: peak AdamW learning rate (default 5e-4: DINO's 5e-4 per 256 images), 10 % linear
            warm-up then cosine decay.
        scale_lr: scale ``lr`` linearly by ``batch_size / 256`` (default True).
        weight_decay: AdamW weight decay (default 0.04).
        n_local: local crops per image (default 4).
        out_dim, hidden_dim, bottleneck_dim: projection head sizes (DINO: 65536 / 2048 / 256;
            defaults 4096 / 2048 / 256: 4096 prototypes for small data).
        teacher_momentum: starting EMA momentum of the teacher (default 0.996, cosine to 1).
        clip_grad: gradient-norm clip (default 3.0; 0 disables it).
        seed: seed of the batch order, the crops and the head's initialisation (default 0).

    Attributes:
        history_ (list[float]): mean DINO loss per epoch.
        trainable_ (dict): trainable parameter counts: ``unfrozen_blocks``, ``lora``, ``head``,
            ``total``.
    """

    def __init__(
        self,
        unfrozen_blocks: int = 1,
        lora_rank: int = 8,
        epochs: int = 2,
        batch_size: int = 64,
        lr: float = 5e-4,
        scale_lr: bool = True,
        weight_decay: float = 0.04,
        n_local: int = 4,
        out_dim: int = 4096,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        teacher_momentum: float = 0.996,
        clip_grad: float = 3.0,
        seed: int = 0,
    ) -> None:
        self.unfrozen_blocks = unfrozen_blocks
        self.lora_rank = lora_rank
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.scale_lr = scale_lr
        self.weight_decay = weight_decay
        self.n_local = n_local
        self.out_dim = out_dim
        self.hidden_dim = hidden_dim
        self.bottleneck_dim = bottleneck_dim
        self.teacher_momentum = teacher_momentum
        self.clip_grad = clip_grad
        self.seed = seed

    def get_params(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in self.__init__.__code__.co_varnames[1 : self.__init__.__code__.co_argcount]
        }

    def prepare(self, backbone: nn.Module) -> _Student:
        """Add the ExPLoRA adapters to ``backbone`` (in place) and a fresh DINO head; set ``trainable_``."""
        counts = add_explora_adapters(backbone, unfrozen_blocks=self.unfrozen_blocks, rank=self.lora_rank)
        head = DINOHead(backbone.num_features, self.out_dim, self.hidden_dim, self.bottleneck_dim)
        counts["head"] = sum(p.numel() for p in head.parameters())
        counts["total"] = counts["unfrozen_blocks"] + counts["lora"] + counts["head"]
        self.trainable_ = counts
        return _Student(backbone, head)

    def fit(
        self,
        backbone: nn.Module,
        dataset: Any,
        rows: Sequence[int] | np.ndarray,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        img_size: int,
        device: torch.device | str = "cpu",
        amp_dtype: torch.dtype | None = None,
        log_every: int = 20,
    ) -> ExPLoRA:
        """Pre-train ``backbone`` (a timm ViT built with ``dynamic_img_size=True``) in place.

        ``dataset[list_of_rows]`` must return ``(uint8 NHWC images, ...)``; ``rows`` are the
        images to use (labels, if any, are ignored). Afterwards :meth:`merged_state_dict` gives
        the plain weights.
        """
        from stage1_pro.optim import warmup_cosine
        from stage1_pro.training.loaders import EpochBatchSampler, make_loader

        device = torch.device(device)
        rows = np.asarray(rows, dtype=np.int64)
        batch = min(self.batch_size, len(rows))
        if batch < 2:
            raise DataError(f"ExPLoRA needs at least 2 unlabeled images, got {len(rows)}")
        torch.manual_seed(self.seed)
        student = self.prepare(backbone).to(device)
        teacher = copy.deepcopy(student).requires_grad_(False)
        self._student = student
        patch = backbone.patch_embed.patch_size[0]
        local_size = max(patch, round(img_size * 3 / 7 / patch) * patch)
        loss_fn = DINOLoss(self.out_dim, n_crops=2 + self.n_local).to(device)
        params = [p for p in student.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        lr = self.lr * batch / 256 if self.scale_lr else self.lr
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr,
        )
        sampler = EpochBatchSampler(rows, batch, shuffle=True, seed=self.seed, drop_last=True)
        loader = make_loader(dataset, sampler)
        total = max(1, self.epochs * len(sampler))
        warmup = int(0.1 * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
        gen = torch.Generator().manual_seed(self.seed)
        student_params = [p for p in student.parameters()]
        teacher_params = [p for p in teacher.parameters()]
        trainable = [i for i, p in enumerate(student_params) if p.requires_grad]
        self.history_: list[float] = []
        step = 0
        for epoch in range(self.epochs):
            sampler.set_epoch(epoch)
            student.train()
            teacher.train()
            losses, t0 = [], time.perf_counter()
            for x, *_ in loader:
                views = multi_crop(
                    x.to(device), global_size=img_size, local_size=local_size, n_local=self.n_local,
                    mean=mean, std=std, generator=gen,
                )  # fmt: skip
                with torch.autocast(
                    device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None
                ):
                    with torch.no_grad():
                        teacher_out = teacher(views[:2])
                    loss = loss_fn(student(views), teacher_out)
                if not torch.isfinite(loss):
                    raise DataError(
                        f"ExPLoRA: the DINO loss became {float(loss)} at step {step}; lower the lr"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.clip_grad:
                    nn.utils.clip_grad_norm_(params, self.clip_grad)
                optimizer.step()
                scheduler.step()
                momentum = 1 - (1 - self.teacher_momentum) * (math.cos(math.pi * step / total) + 1) / 2
                with torch.no_grad():
                    for i in trainable:  # frozen parameters are identical in both networks
                        teacher_params[i].mul_(momentum).add_(student_params[i].detach(), alpha=1 - momentum)
                losses.append(float(loss.detach()))
                step += 1
                if log_every and step % log_every == 0:
                    _LOG.info("ExPLoRA step %d/%d: DINO loss %.4f", step, total, losses[-1])
            self.history_.append(float(np.mean(losses)) if losses else float("nan"))
            _LOG.info(
                "ExPLoRA epoch %d/%d: DINO loss %.4f (%.1f s)", epoch + 1, self.epochs, self.history_[-1],
                time.perf_counter() - t0,
            )  # fmt: skip
        self.n_images_ = len(rows)
        return self

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """Merge the LoRA into the backbone (in place) and return its plain state dict (CPU, contiguous)."""
        from stage1_pro.models.dora import merge_adapters

        backbone = self._student.backbone
        merge_adapters(backbone)
        return {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}


# ------------------------------------------------------------------------------------------
# the artifact


def save_extended_backbone(out_dir: str, state: dict[str, torch.Tensor], info: dict[str, Any]) -> str:
    """Write ``backbone.safetensors``, then ``explora.json`` (validated) into ``out_dir``; return its URI."""
    from safetensors.torch import save as save_safetensors

    from stage1_pro.artifacts import write_artifact

    data = save_safetensors(state)
    storage.write_bytes(storage.join(out_dir, WEIGHTS_FILE), data)
    uri = storage.join(out_dir, INFO_FILE)
    write_artifact(
        uri, "explora", {**info, "weights_file": WEIGHTS_FILE, "weights_sha256": sha256_bytes(data)}
    )
    return uri


def _info_uri(uri: str) -> str:
    return uri if uri.endswith(".json") else storage.join(uri, INFO_FILE)


def load_extended_backbone(
    uri: str, *, model_name: str, img_size: int
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an ExPLoRA artifact (folder or its ``explora.json``) made for ``model_name`` at ``img_size``.

    Returns ``(state_dict, info)``. Raises :class:`ConfigError` for another model or resolution
    and :class:`ArtifactError` for a weights file whose sha256 does not match.
    """
    from safetensors.torch import load as load_safetensors

    from stage1_pro.artifacts import read_artifact

    info_uri = _info_uri(uri)
    info = read_artifact(info_uri, "explora")
    if info["model_name"] != model_name or info["img_size"] != img_size:
        raise ConfigError(
            f"explora_backbone={uri}: made for {info['model_name']} at {info['img_size']} px, but this run "
            f"trains {model_name} at {img_size} px; pass --model-name {info['model_name']} --img-size "
            f"{info['img_size']} or drop --explora-backbone to pre-train again"
        )
    weights_uri = storage.join(info_uri.rsplit("/", 1)[0] if "/" in info_uri else ".", info["weights_file"])
    data = storage.read_bytes(weights_uri)
    if sha256_bytes(data) != info["weights_sha256"]:
        raise ArtifactError(
            f"{weights_uri}: sha256 does not match {info_uri}; the file is damaged or was replaced"
        )
    return load_safetensors(data), info


# ------------------------------------------------------------------------------------------
# phase 4


def _explora_settings(config: Stage1ProConfig) -> dict[str, Any]:
    return {
        "unfrozen_blocks": config.explora_unfrozen_blocks,
        "lora_rank": config.explora_lora_rank,
        "epochs": config.explora_epochs,
        "batch_size": config.batch_size,
        "seed": config.seed,
    }


def _unlabeled_source(config: Stage1ProConfig, ctx: Any) -> _Source:
    """``explora_data`` decoded at the training resolution, or the prepared training images."""
    if config.explora_data is None:
        rows = ctx.split_rows.rows["train"]
        return _Source(ctx.shards, rows, TRAIN_IMAGES)
    from stage1_pro.data import load_dataset
    from stage1_pro.preprocessing import PixelSpec, load_pixels
    from stage1_pro.training.loaders import TensorBatches

    ds = load_dataset(config.explora_data)
    spec = PixelSpec.from_config(config)  # the same pixels as the prepared training images
    images = np.stack([load_pixels(uri, spec) for uri in ds.uris])
    return _Source(
        TensorBatches(torch.from_numpy(images), np.zeros(len(ds), dtype=np.int64)),
        np.arange(len(ds)),
        config.explora_data,
        ds.fingerprint,
    )


def run_phase4(ctx: Any) -> dict[str, Any]:
    """Phase 4's ``before_training`` hook: extend ``ctx.model.backbone`` with ExPLoRA.

    Uses ``config.explora_backbone`` when given; otherwise reuses ``RUN_DIR/explora`` from an
    interrupted run of the same settings, or pre-trains and saves it there. The merged weights
    are loaded into the model's backbone (strictly), so supervised training starts from them.
    Returns the artifact's info.
    """
    import timm

    from stage1_pro.training.distributed import barrier

    config = ctx.config
    check_explora_model(config.model_name)
    target = ctx.model.backbone
    if config.explora_backbone:
        state, info = load_extended_backbone(config.explora_backbone, model_name=config.model_name,
                                             img_size=config.img_size)  # fmt: skip
        target.load_state_dict(state, strict=True)
        _LOG.info("phase 4: extended backbone from %s", config.explora_backbone)
        return info
    run_dir = storage.join(ctx.out_dir, RUN_SUBDIR)
    settings = _explora_settings(config)
    existing = _info_uri(run_dir)
    if ctx.dist.is_main and not _reusable(existing, config, settings):
        source = _unlabeled_source(config, ctx)
        ssl_backbone = timm.create_model(config.model_name, num_classes=0, img_size=config.img_size,
                                         dynamic_img_size=True)  # fmt: skip
        ssl_backbone.load_state_dict(target.state_dict(), strict=True)
        est = ExPLoRA(**settings, lr=5e-4)
        amp = torch.bfloat16 if ctx.device.type == "cuda" and config.amp != "off" else None
        mean, std = ctx.model.info["mean"], ctx.model.info["std"]
        est.fit(ssl_backbone, source.dataset, source.rows, mean=mean, std=std, img_size=config.img_size,
                device=ctx.device, amp_dtype=amp, log_every=config.log_every)  # fmt: skip
        info = {
            "model_name": config.model_name,
            "img_size": config.img_size,
            "data": source.description,
            "data_fingerprint": source.fingerprint,
            "n_images": est.n_images_,
            "settings": settings,
            "trainable_parameters": est.trainable_,
            "objective": "DINO self-distillation (student/EMA teacher, multi-crop, centring, sharpening)",
            "dino_loss_per_epoch": est.history_,
            "created_at": utc_now(),
        }
        save_extended_backbone(run_dir, est.merged_state_dict(), info)
    barrier(ctx.dist)
    state, info = load_extended_backbone(run_dir, model_name=config.model_name, img_size=config.img_size)
    target.load_state_dict(state, strict=True)
    _LOG.info(
        "phase 4: extended backbone saved to %s (DINO loss per epoch %s)",
        run_dir,
        info["dino_loss_per_epoch"],
    )
    return info


def _reusable(info_uri: str, config: Stage1ProConfig, settings: dict[str, Any]) -> bool:
    from stage1_pro.artifacts import read_artifact

    if not storage.exists(info_uri):
        return False
    try:
        info = read_artifact(info_uri, "explora")
    except ArtifactError:
        return False
    return (
        info["settings"] == settings
        and info["model_name"] == config.model_name
        and info["img_size"] == config.img_size
        and info["data"] == (config.explora_data or TRAIN_IMAGES)
    )
