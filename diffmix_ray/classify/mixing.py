"""The Diff-Mix reference's image-mixing baselines on a training batch, with its semantics, on the
device (plain torch, no Ray). Labels enter as the rows' own targets, soft ones included (Diff-Mix's
(1 - s^g) onehot(source) + s^g onehot(target), times soft_scaler), and leave mixed by the share of
pixels each image keeps; label smoothing comes after (the reference's loss smooths the mixed target).

- `cutmix` (`--mixing reference --cutmix`): the reference's dataset-level CutMix
  (downstream_tasks/utils.py `CutMix`, num_mix 1, beta 1): each sample, with probability `prob`,
  gets a box of another sample pasted in: lam ~ Beta(1, 1), a box of side sqrt(1 - lam) around a
  uniform centre, clipped to the image; label lam' y + (1 - lam') y_other, lam' = 1 - box area /
  image area. The reference draws the other sample from the whole (already real/synthetic-mixed)
  training set; here it is a uniformly drawn other sample of the same batch, itself a uniform draw
  of that set. So with synthetic data both images may be synthetic and both labels soft, as there.
- `mixup` (`--mixing reference --mixup`, the reference's `mixup_data`): with probability `prob` per
  batch, lam ~ Beta(1, 1) for the batch, x = lam x + (1 - lam) x[perm], y likewise.
- `cmo` (CMO, Park et al. 2022, the reference's long-tail trainer `--data_aug CMO`): with probability
  `prob` per batch, one box (as above, lam ~ Beta(1, 1)) of the minority batch, drawn with class
  weights 1/n_c, is pasted onto every image of the batch; label lam' y + (1 - lam') y_minority,
  which equals the reference's lam' loss(y) + (1 - lam') loss(y_minority) for every loss here that
  is linear in the target (ce, balanced-softmax, drw on soft targets)."""

from __future__ import annotations

import torch

DEFAULT_PROB = 0.5  # the reference's --mixup_probability default (and timm's prob here before)


def _boxes(lam: torch.Tensor, height: int, width: int, generator: torch.Generator | None):
    """The reference's rand_bbox for each lam: cut sides int(side * sqrt(1 - lam)) around a uniform
    centre, clipped to the image. Returns (top, bottom, left, right) as integer tensors."""
    device = lam.device
    ratio = torch.sqrt(1.0 - lam)
    cut_h = (height * ratio).floor().long()
    cut_w = (width * ratio).floor().long()
    cy = torch.randint(0, height, lam.shape, generator=generator, device=device)
    cx = torch.randint(0, width, lam.shape, generator=generator, device=device)
    top, bottom = (cy - cut_h // 2).clamp(0, height), (cy + cut_h // 2).clamp(0, height)
    left, right = (cx - cut_w // 2).clamp(0, width), (cx + cut_w // 2).clamp(0, width)
    return top, bottom, left, right


def box_masks(top, bottom, left, right, height: int, width: int) -> torch.Tensor:
    """(N, 1, H, W) booleans: inside each box."""
    rows = torch.arange(height, device=top.device).view(1, height, 1)
    cols = torch.arange(width, device=top.device).view(1, 1, width)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < bottom.view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols < right.view(-1, 1, 1)))
    return inside.unsqueeze(1)


def kept_share(top, bottom, left, right, height: int, width: int) -> torch.Tensor:
    """lam' = 1 - box area / image area: the share of its own pixels an image keeps."""
    return 1.0 - ((bottom - top) * (right - left)).float() / float(height * width)


def _uniform(n: int, device, generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device)


def cutmix(x: torch.Tensor, y: torch.Tensor, prob: float, generator: torch.Generator | None = None):
    """Per-sample CutMix with another sample of the batch (NCHW images, (N, C) targets)."""
    n, _, height, width = x.shape
    if n < 2 or prob <= 0:
        return x, y
    device = x.device
    hit = _uniform(n, device, generator) < prob
    lam = _uniform(n, device, generator)  # Beta(1, 1)
    other = (torch.arange(n, device=device) + torch.randint(1, n, (n,), generator=generator, device=device)) % n
    top, bottom, left, right = _boxes(lam, height, width, generator)
    mask = box_masks(top, bottom, left, right, height, width) & hit.view(-1, 1, 1, 1)
    keep = torch.where(hit, kept_share(top, bottom, left, right, height, width), torch.ones_like(lam))
    mixed = torch.where(mask, x[other], x)
    return mixed, keep.view(-1, 1) * y + (1.0 - keep.view(-1, 1)) * y[other]


def mixup(x: torch.Tensor, y: torch.Tensor, prob: float, generator: torch.Generator | None = None):
    """Batch Mixup: with probability `prob`, one lam ~ Beta(1, 1) and a random permutation. The coin
    and lam stay on the device (no read back to the host): the blend is computed and kept or not."""
    n = x.shape[0]
    if n < 2 or prob <= 0:
        return x, y
    device = x.device
    hit = _uniform(1, device, generator) < prob
    lam = _uniform(1, device, generator)
    perm = torch.randperm(n, generator=generator, device=device)
    blend_x = lam.view(1, 1, 1, 1) * x + (1.0 - lam.view(1, 1, 1, 1)) * x[perm]
    blend_y = lam.view(1, 1) * y + (1.0 - lam.view(1, 1)) * y[perm]
    return torch.where(hit, blend_x, x), torch.where(hit, blend_y, y)


def cmo(x: torch.Tensor, y: torch.Tensor, x_minor: torch.Tensor, y_minor: torch.Tensor, prob: float,
        generator: torch.Generator | None = None):
    """CMO: with probability `prob`, one box of the minority batch pasted onto the whole batch."""
    _, _, height, width = x.shape
    if prob <= 0:
        return x, y
    device = x.device
    hit = _uniform(1, device, generator) < prob
    lam = _uniform(1, device, generator)
    box = _boxes(lam, height, width, generator)
    mask = box_masks(*box, height, width) & hit.view(1, 1, 1, 1)
    keep = torch.where(hit, kept_share(*box, height, width), torch.ones_like(lam)).view(1, 1)
    return torch.where(mask, x_minor, x), keep * y + (1.0 - keep) * y_minor


def from_config(cfg: dict):
    """(timm Mixup or None, the reference's mix function (x, y) -> (x, y) or None) for a run's options."""
    if not (cfg["cutmix"] or cfg["mixup"]):
        return None, None
    prob = DEFAULT_PROB if cfg.get("mix_prob") is None else cfg["mix_prob"]
    if cfg.get("mixing", "timm") == "timm":
        from timm.data import Mixup

        return Mixup(mixup_alpha=1.0 if cfg["mixup"] else 0.0, cutmix_alpha=1.0 if cfg["cutmix"] else 0.0,
                     prob=prob, label_smoothing=cfg["label_smoothing"], num_classes=cfg["num_classes"]), None
    fn = cutmix if cfg["cutmix"] else mixup
    return None, lambda x, y: fn(x, y, prob)
