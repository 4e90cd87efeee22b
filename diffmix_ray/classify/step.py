"""The classifier's training step and evaluation batch, taking batches directly: plain torch, no Ray,
so the Ray Train loop (loop.py) and the benchmark (bench/bench_classify_step.py) run the same code.

A batch is what the data path delivers: `image` (uint8 NHWC pixels on the device, from the data
workers; with --gpu-decode a list of encoded images on the host), `source`, `label` (the target
class) and `strength` on the device. Here, on the device, the pixels become the normalised input
(transforms.ToInput) and the labels the soft target: Diff-Mix's (1 - s^g) onehot(source) +
s^g onehot(target) (synthetic rows times soft_scaler), mixed by the reference's CutMix/Mixup/CMO
(mixing.py) when asked, then label smoothing; or timm's Mixup/CutMix for the real-data baselines.

Nothing here reads a value back to the host: the step returns its loss as a device tensor, and
evaluation counts into device tensors, so a GPU never waits for the host between the reads the
caller chooses (once per epoch). (A float16 run's GradScaler still checks for inf every step: dynamic
loss scaling needs it. bf16, the default where the GPU has it, needs no scaler.)"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from . import gpu_decode, mixing
from .transforms import ToInput, tensor_augmentations


def check_finite_loss(loss: float, epoch: int, first_step: int, steps: int) -> None:
    """Stop a run whose epoch loss is NaN or inf: its weights are broken, and scoring or marking
    them complete would pass a diverged run off as a result."""
    if not math.isfinite(loss):
        from ..errors import DiffmixError

        raise DiffmixError(f"epoch {epoch} (steps {first_step + 1}-{first_step + steps}): the training loss became "
                           f"{loss} (non-finite): training diverged and is stopped; nothing is marked complete. "
                           "Lower --lr (or --weight-decay), then start again with --overwrite")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Training and evaluation precision: bf16 autocast on CUDA where supported, else fp16; fp32 on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def is_convolutional(model: torch.nn.Module) -> bool:
    """A CNN (ResNet, ConvNeXt, EfficientNet...), as opposed to a ViT, whose only convolution is its
    patch embedding: channels_last speeds convolutions up and does nothing for attention."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


def use_channels_last(model: torch.nn.Module, device: torch.device) -> bool:
    """channels_last where it pays: convolutions on CUDA (tensor cores read NHWC). On CPU the layout
    stays as it was."""
    return device.type == "cuda" and is_convolutional(model)


def diffmix_targets(source: torch.Tensor, target: torch.Tensor, strength: torch.Tensor, gamma: float,
                    num_classes: int, soft_scaler: float = 1.0) -> torch.Tensor:
    """labels.soft_labels on the device, with the same precision: s^gamma in float64, the rest in
    float32. Real rows have s = 0, intra-class rows source == target: both one-hot. Synthetic rows
    (s > 0) are scaled by `soft_scaler` (the reference's HugFewShotDataset: its targets then sum
    to the scaler)."""
    w = strength.double().pow(gamma)
    y = torch.zeros(len(source), num_classes, dtype=torch.float32, device=source.device)
    y.scatter_add_(1, source.long().view(-1, 1), (1.0 - w).float().view(-1, 1))
    y.scatter_add_(1, target.long().view(-1, 1), w.float().view(-1, 1))
    if soft_scaler != 1.0:
        y = y * torch.where(strength > 0, soft_scaler, 1.0).float().view(-1, 1)
    return y


def smooth(y: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
    return (1.0 - smoothing) * y + smoothing / num_classes


def soft_targets(source: torch.Tensor, target: torch.Tensor, strength: torch.Tensor, gamma: float,
                 num_classes: int, smoothing: float, soft_scaler: float = 1.0) -> torch.Tensor:
    """labels.soft_labels + labels.smooth on the device (diffmix_targets, then label smoothing)."""
    return smooth(diffmix_targets(source, target, strength, gamma, num_classes, soft_scaler), smoothing, num_classes)


class Inputs:
    """A delivered batch -> (model input, soft target) on `device`. `mixup`: timm's Mixup/CutMix (real
    data only: it makes its own targets from class indices); `mix`: the reference's (mixing.py), a
    function (x, y) -> (x, y) on the rows' own targets, synthetic ones included. A batch with `cmo_*`
    keys (the CMO minority stream) gets CMO with probability `cmo_prob` while `cmo_active`."""

    def __init__(self, data_cfg: dict, device, num_classes: int, gamma: float = 1.0, smoothing: float = 0.0,
                 channels_last: bool = False, gpu_decode: bool = False, mixup=None,
                 where: Callable[[dict, int], str] | None = None, soft_scaler: float = 1.0, mix=None,
                 cmo_prob: float = 0.0):
        self.device = torch.device(device)
        self.num_classes, self.gamma, self.smoothing, self.mixup = num_classes, gamma, smoothing, mixup
        self.soft_scaler, self.mix, self.cmo_prob, self.cmo_active = soft_scaler, mix, cmo_prob, True
        self.to_input = ToInput(data_cfg, self.device, channels_last)
        self.gpu_decode, self.where = gpu_decode, where
        self.tensor_tf = ({t: tensor_augmentations(data_cfg, t) for t in (True, False)} if gpu_decode else None)

    def images(self, batch: dict, training: bool) -> torch.Tensor:
        if not self.gpu_decode:
            return self.to_input(batch["image"], "NHWC")
        where = (lambda i: self.where(batch, i)) if self.where is not None else None
        decoded = gpu_decode.decode(batch["image"], self.device, where)
        return self.to_input(gpu_decode.augment(decoded, self.tensor_tf[training]), "NCHW")

    def targets(self, batch: dict, prefix: str = "") -> torch.Tensor:
        """The rows' Diff-Mix targets, before smoothing."""
        return diffmix_targets(batch[prefix + "source"], batch[prefix + "label"], batch[prefix + "strength"],
                               self.gamma, self.num_classes, self.soft_scaler)

    def __call__(self, batch: dict, training: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images(batch, training)
        if training and self.mixup is not None:  # timm's baselines: their own targets, with smoothing
            return self.mixup(x, batch["label"])
        y = self.targets(batch)
        if training and self.mix is not None:
            x, y = self.mix(x, y)
        if training and "cmo_image" in batch and self.cmo_active:
            minor = {k.removeprefix("cmo_"): v for k, v in batch.items() if k.startswith("cmo_")}
            x, y = mixing.cmo(x, y, self.images(minor, training), self.targets(minor), self.cmo_prob)
        return x, smooth(y, self.smoothing, self.num_classes)


def train_step(model: torch.nn.Module, batch: dict, inputs: Inputs, optimizer: torch.optim.Optimizer, scaler,
               loss_fn: Callable, lr: float, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One optimizer step on `batch` at learning rate `lr`; returns the loss, detached, on the device."""
    x, y = inputs(batch, training=True)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(x)
    loss = loss_fn(logits, y, batch["label"])
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train_epoch(model: torch.nn.Module, batches: Iterator[dict], steps: int, inputs: Inputs, optimizer, scaler,
                loss_fn: Callable, lr_of: Callable[[int], float], first_step: int,
                amp_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """`steps` steps from `batches`, numbered from `first_step` (the schedule's step count). Returns
    the per-step losses on the device: the caller reads them once (`mean_loss`)."""
    model.train()
    losses = []
    for i in range(steps):
        batch = next(batches, None)
        if batch is None:
            raise RuntimeError(f"the data ran out after {i} of {steps} steps of the epoch")
        losses.append(train_step(model, batch, inputs, optimizer, scaler, loss_fn, lr_of(first_step + i), amp_dtype))
    return losses


def mean_loss(losses: list[torch.Tensor]) -> float | None:
    """The mean of an epoch's per-step losses: one device-to-host copy, in float64 as before."""
    return float(torch.stack(losses).double().mean().cpu()) if losses else None


@torch.no_grad()
def count_correct(model: torch.nn.Module, batch: dict, inputs: Inputs, correct: torch.Tensor, total: torch.Tensor,
                  amp_dtype: torch.dtype | None = None) -> None:
    """Add one evaluation batch's per-class (correct, total) into the device tensors, without a read:
    index_add_ on a fixed-size tensor (bincount would read its input's maximum back to the host)."""
    x = inputs.images(batch, training=False)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        pred = model(x).argmax(1)
    labels = batch["label"].long()
    total.index_add_(0, labels, torch.ones_like(labels, dtype=total.dtype))
    correct.index_add_(0, labels, (pred == labels).to(correct.dtype))
