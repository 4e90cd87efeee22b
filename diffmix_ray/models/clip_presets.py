"""Built-in CLIP models for `score`, built from config alone: offline, seeded, random weights.

`tiny` (56k parameters, 32 px) is for tests and the demo; `clip-b32` has CLIP ViT-B/32's exact
architecture (151M parameters, 224 px) for GPU benchmarks at the real model's cost. Their tokenizer
is the SD presets' small in-memory one (presets.build_tokenizer), padded to 49408 entries for
clip-b32. Their scores exercise and measure the system; they mean nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import torch

from .presets import MAX_PROMPT_TOKENS, build_tokenizer


@dataclass(frozen=True)
class ClipPreset:
    name: str
    description: str
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    projection_dim: int
    text_vocab_size: int | None = None  # None: the in-memory tokenizer's own size

    def fingerprint(self, seed: int) -> str:
        blob = json.dumps({"clip_preset": dataclasses.asdict(self), "seed": seed}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


CLIP_PRESETS: dict[str, ClipPreset] = {
    "tiny": ClipPreset("tiny", "tiny CLIP (56k params), 32 px; tests and the demo", image_size=32, patch_size=8,
                       vision_hidden=32, vision_intermediate=37, vision_layers=2, vision_heads=4, text_hidden=32,
                       text_intermediate=37, text_layers=2, text_heads=4, projection_dim=16),
    # openai/clip-vit-base-patch32's config.json, every size spelled out (quick_gelu, layer norm 1e-5
    # and logit scale 2.6592 are transformers' CLIP defaults and the checkpoint's values).
    "clip-b32": ClipPreset("clip-b32", "CLIP ViT-B/32's exact architecture (151M params), 224 px, random weights",
                           image_size=224, patch_size=32, vision_hidden=768, vision_intermediate=3072,
                           vision_layers=12, vision_heads=12, text_hidden=512, text_intermediate=2048,
                           text_layers=12, text_heads=8, projection_dim=512, text_vocab_size=49408),
}


def _config(p: ClipPreset, tokenizer):
    from transformers import CLIPConfig

    text = dict(vocab_size=len(tokenizer), hidden_size=p.text_hidden, intermediate_size=p.text_intermediate,
                num_hidden_layers=p.text_layers, num_attention_heads=p.text_heads,
                max_position_embeddings=MAX_PROMPT_TOKENS, projection_dim=p.projection_dim, hidden_act="quick_gelu",
                # the pooled text feature is taken at the first end-of-text token: this tokenizer's ids
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=p.vision_hidden, intermediate_size=p.vision_intermediate,
                  num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads, image_size=p.image_size,
                  patch_size=p.patch_size, projection_dim=p.projection_dim, hidden_act="quick_gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=p.projection_dim,
                      logit_scale_init_value=2.6592)


def build_clip(name: str, seed: int = 0, device: str | torch.device = "cpu"):
    """(CLIPModel, tokenizer) of a preset. On the meta device: the architecture without weights
    (seconds, no RAM); elsewhere the same name and seed give the same weights, and the caller's
    global RNG is left as it was."""
    from transformers import CLIPModel

    preset = CLIP_PRESETS[name]
    tokenizer = build_tokenizer(preset.text_vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = CLIPModel(_config(preset, tokenizer))
    return model.eval(), tokenizer
