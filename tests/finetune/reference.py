"""The fine-tuning step as it was when the whole embedding matrix trained (finetune/loop.py at commit 689756f), kept as the
reference the new step is compared with: the text encoder's whole embedding matrix, resized for
the class tokens, is trainable; the gradients of the other rows are zeroed before clipping and the
rows are copied back after every optimizer step; checkpoints cut the matrix's Adam moments to the
class-token rows. The methods below are that code, nearly line for line; only the set-up converts a
Finetuner built by the new code (same model, same LoRA init) to the old layout."""

from __future__ import annotations

import os
from typing import Callable

import torch

from diffmix_ray.finetune.loop import CKPT_OPTIMIZER, CKPT_WEIGHTS, Finetuner, read_trained


class FullMatrixFinetuner:
    def __init__(self, tuner: Finetuner, init_ids: list[int]):
        self.tuner, cfg = tuner, tuner.cfg
        text_encoder, tokenizer = tuner.text_encoder, tuner.tokenizer
        text_encoder.set_input_embeddings(tuner.class_tokens.base)  # back to the model's own nn.Embedding
        self.token_ids = tokenizer.convert_tokens_to_ids(tuner.tokens)
        # --- the old Finetuner._add_class_tokens (the tokens are already in the tokenizer) ---
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        weight = self.embeddings.weight
        with torch.no_grad():
            weight[self.token_ids] = weight[init_ids].mean(0)
        weight.requires_grad_(True)
        self.frozen_rows = weight.detach().clone().float()
        self.restore_mask = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        self.restore_mask[self.token_ids] = False
        # --- the old optimizer: the whole matrix is param 0 ---
        groups = [{"params": [weight], "lr": cfg.ti_lr}]
        if cfg.has_lora:
            groups.append({"params": [p for p in tuner.unet.parameters() if p.requires_grad], "lr": cfg.lr})
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
        for g in self.optimizer.param_groups:
            g["base_lr"] = g["lr"]
        self.scaler = tuner.scaler

    @property
    def embeddings(self) -> torch.nn.Embedding:
        return self.tuner.text_encoder.get_input_embeddings()

    def train_step(self, batch: dict, step: int) -> float:
        cfg = self.tuner.cfg
        warm = min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * warm
        loss = self.tuner.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.restore_mask is not None and self.embeddings.weight.grad is not None:
            self.embeddings.weight.grad[self.restore_mask] = 0
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.restore_mask is not None:
            with torch.no_grad():
                weight = self.embeddings.weight
                weight[self.restore_mask] = self.frozen_rows[self.restore_mask].to(weight.dtype)
        return float(loss.detach())

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        out = {}
        if self.tuner.cfg.has_lora:
            out.update({f"lora.{k}": v for k, v in get_peft_model_state_dict(self.tuner.unet).items()})
        for token, token_id in zip(self.tuner.tokens, self.token_ids):
            out[f"embed.{token}"] = self.embeddings.weight[token_id]
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    def _map_embedding_moments(self, state: dict, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        if 0 in state["state"]:
            state["state"] = dict(state["state"])
            moments = state["state"][0]
            state["state"][0] = {k: fn(v) if k in ("exp_avg", "exp_avg_sq") else v for k, v in moments.items()}
        return state

    def save(self, folder: str, step: int) -> None:
        from safetensors.torch import save_file

        save_file(self.trainable_tensors(), os.path.join(folder, CKPT_WEIGHTS))
        optimizer = self._map_embedding_moments(self.optimizer.state_dict(), lambda m: m[self.token_ids].clone())
        torch.save({"optimizer": optimizer, "scaler": self.scaler.state_dict(), "step": step},
                   os.path.join(folder, CKPT_OPTIMIZER))

    def load(self, folder: str) -> int:
        from peft.utils import set_peft_model_state_dict

        lora, embeds, step = read_trained(folder)
        if self.tuner.cfg.has_lora:
            set_peft_model_state_dict(self.tuner.unet, lora)
        with torch.no_grad():
            for token, token_id in zip(self.tuner.tokens, self.token_ids):
                self.embeddings.weight[token_id] = embeds[token].to(self.embeddings.weight.device)

        def full_rows(rows: torch.Tensor) -> torch.Tensor:
            moments = torch.zeros(self.embeddings.weight.shape, dtype=rows.dtype)
            moments[self.token_ids] = rows
            return moments

        saved = torch.load(os.path.join(folder, CKPT_OPTIMIZER), map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(self._map_embedding_moments(saved["optimizer"], full_rows))
        self.scaler.load_state_dict(saved["scaler"])
        return step
