"""Stable-Diffusion-shaped pipelines built from config alone: offline, seeded, random weights.

They have SD 1.5's architecture families, scheduler and folder layout, so every code path
(tokenizer, text encoder, VAE x8, UNet with cross-attention, PNDM, save/load, LoRA, textual
inversion) runs in tests and demos without the hub. `tiny` is for tests; `bench` is big enough for
CPU timings to mean something; `sd15` is SD 1.5's exact architecture (1.07B parameters), for GPU
benchmarks and calibration at the real model's cost. Their images are noise: they exercise the
system, not the method."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

import torch

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

WRITE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class PresetConfig:
    """Sizes of one preset. The VAE downsamples by 2**(len(vae_channels)-1), 8 like SD's.

    Fields with a default were added after `tiny` and `bench` existed; the fingerprint hashes them
    only where a preset sets them to something else, so adding one never changes an existing
    preset's fingerprint (and so never invalidates the concept banks and outputs that record it)."""

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
    vae_layers_per_block: int = 1
    # None: the byte-level tokenizer's own size (~560). A number pads the tokenizer with inert
    # entries to exactly this size, so len(tokenizer) == the embedding rows (see build_tokenizer).
    text_vocab_size: int | None = None
    # CLIPTextConfig.projection_dim: unused by CLIPTextModel, but recorded in its config.json as
    # the real checkpoint records it. None keeps transformers' default (512).
    text_projection_dim: int | None = None
    write_dtype: str = "float32"  # what `model make` writes unless told otherwise

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    def fingerprint(self, seed: int) -> str:
        """Identifies the weights build_pipeline(name, seed) produces (for a given library version)."""
        fields = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.default is not dataclasses.MISSING and fields[f.name] == f.default:
                del fields[f.name]
        blob = json.dumps({"preset": fields, "seed": seed}, sort_keys=True)
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
    # SD 1.5's unet/, vae/ and text_encoder/ config.json (runwayml/stable-diffusion-v1-5); every
    # field not set here is a diffusers/transformers default equal to the real config's value
    # (UNet norm_num_groups 32, norm_eps 1e-5, silu, flip_sin_to_cos, no linear projection;
    # CLIP quick_gelu, layer_norm_eps 1e-5). Parameters: UNet 859.52M, VAE 83.65M, text 123.06M.
    # fp16 safety of the default (unscaled) init, measured once in fp32 on CPU, seed 0, diffusers
    # 0.42.1 / transformers 5.24.0, as the max |output| of every module: text encoder 4.2; UNet
    # 6.2 (64x64 latents, batch 2, t=500; output finite, std 0.32, cond-uncond difference std
    # 0.39); VAE 16.2 (encode of a 512^2 image, decode of N(0,1)/0.18215 latents: mean pixel 0.51,
    # 0.6% black). A full img2img (DPM-Solver++, guidance 7.5, strength 0.7, 5 steps) peaked at
    # UNet 8.8, VAE 37.1, final latents max 12.2, image mean 0.51. fp16's limit is 65504, so the
    # weights need no rescaling; a library whose init changes should be measured again.
    "sd15": PresetConfig(
        name="sd15",
        description="SD 1.5's exact architecture (1.07B params), 512 px, random weights; for GPU benchmarks",
        resolution=512,
        unet_channels=(320, 640, 1280, 1280),
        unet_down_blocks=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        unet_up_blocks=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        unet_layers_per_block=2,
        unet_attention_head_dim=8,
        vae_channels=(128, 256, 512, 512),
        vae_norm_groups=32,
        text_hidden=768,
        text_intermediate=3072,
        text_layers=12,
        text_heads=12,
        vae_layers_per_block=2,
        text_vocab_size=49408,
        text_projection_dim=768,
        write_dtype="float16",
    ),
}


def preset_config(name: str) -> PresetConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise DiffmixError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None


def build_tokenizer(vocab_size: int | None = None, words: tuple[str, ...] = PROMPT_WORDS) -> CLIPTokenizer:
    """A CLIP BPE tokenizer built in memory: the 256 byte-level symbols (plain and end-of-word
    forms) make any text encodable; merges give each of `words` one token (PROMPT_WORDS by default;
    the sample model adds its world's words).

    `vocab_size` pads the vocabulary with filler entries up to that size. Textual inversion resizes
    the text encoder's embeddings to len(tokenizer) + new tokens, so a tokenizer smaller than the
    embedding matrix would shrink it. The fillers contain a space, which CLIP's pre-tokenizer
    always splits on, and no merge builds them: no text ever encodes to one."""
    # diffusers, transformers and tokenizers are imported where a model is built, not with this module:
    # stage drivers read presets' names and configs, and importing them costs ~5 s of CPU per process.
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {BOS_TOKEN: 0, EOS_TOKEN: 1}
    for symbol in alphabet:
        vocab.setdefault(symbol, len(vocab))
    for symbol in alphabet:
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        # CLIP's BPE marks the word's last symbol with </w>; merge left to right into one token.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            pair, merged = (merged, piece), merged + piece
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise DiffmixError(f"a preset tokenizer needs at least {len(vocab)} entries, "
                               f"got text_vocab_size={vocab_size}")
        for i in range(len(vocab), vocab_size):
            vocab[f"<unused {i}>"] = i
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_PROMPT_TOKENS)


def preset_tokenizer(preset: str) -> CLIPTokenizer:
    """The tokenizer of build_pipeline(preset): its length equals the text encoder's vocabulary."""
    return build_tokenizer(preset_config(preset).text_vocab_size)


def _text_encoder(config: PresetConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    extra = {} if config.text_projection_dim is None else {"projection_dim": config.text_projection_dim}
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=config.text_intermediate,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    ))


def _unet(config: PresetConfig) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
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


def _vae(config: PresetConfig) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    n_blocks = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=config.vae_channels,
        norm_num_groups=config.vae_norm_groups,
        layers_per_block=config.vae_layers_per_block,
        latent_channels=4,
        sample_size=config.resolution,
        scaling_factor=SD_VAE_SCALING_FACTOR,
    )


def _modules(config: PresetConfig, tokenizer: CLIPTokenizer):
    """(name, module) for the text encoder, UNet and VAE, built one at a time in this order: the
    order they draw from torch's global generator, which is what fixes the weights for a seed.
    Yielding them one by one lets write_preset save and free each before building the next."""
    yield "text_encoder", _text_encoder(config, tokenizer).eval()
    yield "unet", _unet(config).eval()
    yield "vae", _vae(config).eval()


def preset_modules(preset: str, device: str | torch.device = "meta") -> dict[str, torch.nn.Module]:
    """The preset's text encoder, UNet and VAE, by default on the meta device: the architecture and
    parameter shapes without allocating or initialising weights (seconds and no RAM even for
    sd15). On a real device the weights are NOT build_pipeline's: use it for shapes only."""
    tokenizer = preset_tokenizer(preset)
    with torch.device(device):
        return dict(_modules(preset_config(preset), tokenizer))


def _pipeline(modules: dict, tokenizer: CLIPTokenizer) -> StableDiffusionImg2ImgPipeline:
    from diffusers import PNDMScheduler, StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**modules, tokenizer=tokenizer, scheduler=PNDMScheduler(**SD15_SCHEDULER),
                                          safety_checker=None, feature_extractor=None, image_encoder=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(preset: str, seed: int = 0) -> StableDiffusionImg2ImgPipeline:
    """The preset's img2img pipeline on CPU in float32. Same preset and seed give bit-identical
    weights; the caller's global RNG state is left as it was. sd15 takes ~4.3 GB and ~10-30 s."""
    config = preset_config(preset)
    tokenizer = preset_tokenizer(preset)
    # Module constructors draw from torch's global CPU generator: seed it inside a fork so the
    # weights depend only on `seed` and the caller's random stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = dict(_modules(config, tokenizer))
    return _pipeline(modules, tokenizer)


def resolve_write_dtype(preset: str, dtype: str | None) -> str:
    """`dtype` checked, or the preset's default for writing (float16 for sd15, float32 otherwise)."""
    config = preset_config(preset)
    if dtype is None:
        return config.write_dtype
    if dtype not in WRITE_DTYPES:
        raise DiffmixError(f"unknown dtype {dtype!r} for writing a preset; use one of {sorted(WRITE_DTYPES)} "
                           f"(the {preset!r} preset's default is {config.write_dtype})")
    return dtype


def write_preset(preset: str, out_dir: str, seed: int = 0, dtype: str | None = None) -> str:
    """Save the preset as a diffusers folder (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/) that loads like any Stable Diffusion checkpoint. Returns out_dir.

    The weights are build_pipeline(preset, seed)'s, cast to `dtype` (default: the preset's
    write_dtype). Components are built, saved and freed one at a time, so peak RAM is about the
    largest one in float32 (the sd15 UNet: 3.4 GB) rather than the whole model. model_index.json
    is written last, so an interrupted write leaves a folder the loader refuses as incomplete."""
    config = preset_config(preset)
    torch_dtype = WRITE_DTYPES[resolve_write_dtype(preset, dtype)]
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    tokenizer = preset_tokenizer(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, module in _modules(config, tokenizer):
            # nn.Module.to casts exactly as ModelMixin.to does, minus the spurious "should be kept
            # in float32: []" warning diffusers 0.42 logs on every dtype cast (none of these
            # models lists modules to keep in float32).
            torch.nn.Module.to(module, torch_dtype)
            # The same call DiffusionPipeline.save_pretrained makes, so the files are identical.
            module.save_pretrained(os.path.join(out_dir, name), **_save_kwargs(module))
            del module
    shell = _pipeline(preset_modules(preset), tokenizer)  # meta modules: only their classes matter now
    tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    _write_classic_tokenizer_files(tokenizer, os.path.join(out_dir, "tokenizer"))
    shell.scheduler.save_pretrained(os.path.join(out_dir, "scheduler"))
    shell.save_config(out_dir)  # model_index.json, last
    return out_dir


def _save_kwargs(module: torch.nn.Module) -> dict:
    from transformers import CLIPTextModel

    if isinstance(module, CLIPTextModel):
        # diffusers passes this for transformers >= 5, whose default would prefix adapter keys.
        return {"save_peft_format": False}
    return {"safe_serialization": True, "variant": None}


def _write_classic_tokenizer_files(tokenizer: CLIPTokenizer, folder: str) -> None:
    """Add vocab.json and merges.txt beside tokenizer.json, as in real SD folders, so loaders that
    only understand the classic files (older transformers, other tools) can read the folder too."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
