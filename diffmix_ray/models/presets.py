"""Stable-Diffusion-shaped pipelines built from config alone: offline, seeded, random weights.

They have SD 1.5's architecture families, scheduler and folder layout, only smaller, so every code
path (tokenizer, text encoder, VAE x8, UNet with cross-attention, PNDM, save/load, LoRA, textual
inversion) runs in tests and demos without the hub. `tiny` is for tests; `bench` is big enough for
CPU timings to mean something. Their images are noise: they exercise the system, not the method."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..errors import DiffmixError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_PROMPT_TOKENS = 77  # CLIP's context length, as in SD 1.x

# Words that get whole-word tokens so typical Diff-Mix prompts ("a photo of a <class_3> bird")
# tokenize to a realistic length; every other text still tokenizes, byte by byte.
PROMPT_WORDS = (
    "a", "an", "the", "photo", "of", "image", "picture", "in", "on", "with", "and",
    "bird", "flower", "car", "aircraft", "dog", "cat", "pet", "food",
)

# SD 1.5's scheduler/scheduler_config.json, so presets schedule noise exactly like the real model.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
    trained_betas=None,
)
SD_VAE_SCALING_FACTOR = 0.18215


@dataclass(frozen=True)
class PresetConfig:
    """Sizes of one preset. The VAE downsamples by 2**(len(vae_channels)-1), 8 like SD's."""

    name: str
    description: str
    resolution: int  # image side in pixels
    unet_channels: tuple[int, ...]
    unet_down_blocks: tuple[str, ...]
    unet_up_blocks: tuple[str, ...]
    unet_layers_per_block: int
    unet_attention_head_dim: int
    vae_channels: tuple[int, ...]
    vae_norm_groups: int
    text_hidden: int  # also the UNet's cross_attention_dim, as in SD
    text_intermediate: int
    text_layers: int
    text_heads: int

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    def fingerprint(self, seed: int) -> str:
        """Identifies the weights build_pipeline(name, seed) produces (for a given library version)."""
        blob = json.dumps({"preset": dataclasses.asdict(self), "seed": seed}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


PRESETS: dict[str, PresetConfig] = {
    "tiny": PresetConfig(
        name="tiny",
        description="~1M-param UNet, 64 px; for tests and demos",
        resolution=64,
        unet_channels=(32, 64),
        unet_down_blocks=("DownBlock2D", "CrossAttnDownBlock2D"),
        unet_up_blocks=("CrossAttnUpBlock2D", "UpBlock2D"),
        unet_layers_per_block=1,
        unet_attention_head_dim=8,
        vae_channels=(8, 16, 16, 16),
        vae_norm_groups=8,
        text_hidden=32,
        text_intermediate=37,
        text_layers=2,
        text_heads=4,
    ),
    "bench": PresetConfig(
        name="bench",
        description="~24M-param UNet, 128 px; an img2img batch of 4 takes >= 1 s on a 2-core CPU",
        resolution=128,
        unet_channels=(128, 256),
        unet_down_blocks=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        unet_up_blocks=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        unet_layers_per_block=2,
        unet_attention_head_dim=8,
        vae_channels=(32, 64, 64, 64),
        vae_norm_groups=16,
        text_hidden=128,
        text_intermediate=256,
        text_layers=2,
        text_heads=4,
    ),
}


def preset_config(name: str) -> PresetConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise DiffmixError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer built in memory: the 256 byte-level symbols (plain and end-of-word
    forms) make any text encodable; merges give PROMPT_WORDS one token each."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {BOS_TOKEN: 0, EOS_TOKEN: 1}
    for symbol in alphabet:
        vocab.setdefault(symbol, len(vocab))
    for symbol in alphabet:
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in PROMPT_WORDS:
        # CLIP's BPE marks the word's last symbol with </w>; merge left to right into one token.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            pair, merged = (merged, piece), merged + piece
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_PROMPT_TOKENS)


def _build_components(config: PresetConfig) -> dict:
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=config.text_intermediate,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=config.unet_channels,
        down_block_types=config.unet_down_blocks,
        up_block_types=config.unet_up_blocks,
        layers_per_block=config.unet_layers_per_block,
        attention_head_dim=config.unet_attention_head_dim,
        cross_attention_dim=config.text_hidden,
    )
    n_vae_blocks = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_vae_blocks,
        block_out_channels=config.vae_channels,
        norm_num_groups=config.vae_norm_groups,
        layers_per_block=1,
        latent_channels=4,
        sample_size=config.resolution,
        scaling_factor=SD_VAE_SCALING_FACTOR,
    )
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                scheduler=PNDMScheduler(**SD15_SCHEDULER))


def build_pipeline(preset: str, seed: int = 0) -> StableDiffusionImg2ImgPipeline:
    """The preset's img2img pipeline on CPU in float32. Same preset and seed give bit-identical
    weights; the caller's global RNG state is left as it was."""
    config = preset_config(preset)
    # Module constructors draw from torch's global CPU generator: seed it inside a fork so the
    # weights depend only on `seed` and the caller's random stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = _build_components(config)
    for module in (components["vae"], components["text_encoder"], components["unet"]):
        module.eval()
    pipe = StableDiffusionImg2ImgPipeline(**components, safety_checker=None, feature_extractor=None,
                                          image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_preset(preset: str, out_dir: str, seed: int = 0) -> str:
    """Save the preset as a diffusers folder (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/) that loads like any Stable Diffusion checkpoint. Returns out_dir."""
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    pipe = build_pipeline(preset, seed)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _write_classic_tokenizer_files(pipe.tokenizer, os.path.join(out_dir, "tokenizer"))
    return out_dir


def _write_classic_tokenizer_files(tokenizer: CLIPTokenizer, folder: str) -> None:
    """Add vocab.json and merges.txt beside tokenizer.json, as in real SD folders, so loaders that
    only understand the classic files (older transformers, other tools) can read the folder too."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
