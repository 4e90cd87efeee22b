"""AdamW for the class-token vectors, one row per class, updating only the rows of the classes in the
step's batch (`token_schedule: per-class`).

DA-Fusion learns each class's token in a separate textual-inversion run: a fresh AdamW (weight decay
1e-2) that takes 1,000 steps on that class's images and never touches another class. One joint run
with a plain AdamW differs in two ways: decoupled weight decay shrinks every token at every step
(CUB: 100,000 steps at lr 4e-3 leave 0.018 of a token against DA-Fusion's 0.980), and Adam's moments
keep moving a token on steps whose batch holds none of its images. Here a row is updated (moments,
weight decay, its own step count for the bias correction) only on the steps whose batch holds its
class, and is left exactly as it was on every other step: each row follows the AdamW run of its own
class, whatever the other rows do. The per-class sampler (sampling.PerClassSampler) gives each step
one class, so a class's steps are the steps of its own run."""

from __future__ import annotations

import torch


class RowAdamW(torch.optim.Optimizer):
    """AdamW (torch's update, non-amsgrad) on 2-D parameters whose rows are classes. `set_rows(labels)`
    before `step()` names the rows to update; the others keep their values and moments. State per
    parameter: `step` (float32, one count per row), `exp_avg`, `exp_avg_sq`."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"RowAdamW updates rows of 2-D parameters, got shape {tuple(p.shape)}")
        self._rows: torch.Tensor | None = None

    def set_rows(self, labels: torch.Tensor) -> None:
        """The classes of the coming step's batch (any shape of class indices, on any device)."""
        self._rows = labels.reshape(-1).long()

    @torch.no_grad()
    def step(self, closure=None):
        if self._rows is None:
            raise RuntimeError("RowAdamW.step: call set_rows(labels) with the batch's classes first")
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                counts = state["step"].to(p.device)
                on = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
                on[self._rows.to(p.device)] = True
                grad = p.grad
                steps = counts + on.float()
                m = state["exp_avg"].lerp(grad, 1.0 - beta1)
                v = state["exp_avg_sq"].mul(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                # bias corrections in float64, as torch's AdamW computes them (in Python floats); rows never
                # updated count 0, clamped to 1 here and masked out below
                taken = steps.clamp(min=1.0).double().view(-1, 1)
                step_size = (lr / (1.0 - beta1 ** taken)).float()
                denom = (v.sqrt() / (1.0 - beta2 ** taken).sqrt().float()).add_(eps)
                new = p.mul(1.0 - lr * decay).addcdiv_(m, denom / step_size, value=-1.0)
                rows = on.view(-1, 1)
                p.copy_(torch.where(rows, new, p))
                state["exp_avg"] = torch.where(rows, m, state["exp_avg"])
                state["exp_avg_sq"] = torch.where(rows, v, state["exp_avg_sq"])
                state["step"] = steps
        self._rows = None  # one step per set_rows: a stale mask would update the wrong class
        return loss
