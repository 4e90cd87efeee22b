"""torchvision classifier checkpoints as timm weights (`diffmix-ray model convert-classifier`).

The Diff-Mix reference trains torchvision models: `resnet50(pretrained=True)` (IMAGENET1K_V1) and
`vit_b_16(weights=IMAGENET1K_SWAG_E2E_V1)` (ViT-B/16 fine-tuned end to end at 384 px). This project
trains timm architectures, so those weights are renamed onto timm's modules here, tensor for tensor:

- ResNet-50 -> timm `resnet50`: the two implementations name every tensor alike (conv1, bn1,
  layer1.0.downsample.0, fc, ...); nothing is renamed, every name and shape is checked.
- ViT-B/16 -> timm `vit_base_patch16_384` (or `_224` for 224 px weights): conv_proj -> patch_embed.proj,
  class_token -> cls_token, encoder.pos_embedding -> pos_embed, encoder_layer_i.{ln_1, self_attention
  .in_proj (q, k, v stacked in the same order), self_attention.out_proj, ln_2, mlp.0, mlp.3} ->
  blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, encoder.ln -> norm, heads.head -> head.
  Both add the position embeddings after prepending the class token, use LayerNorm eps 1e-6 and exact
  GELU, and classify the class token after the final norm, so the logits agree to float rounding.

The result is one safetensors file that `train-cls --pretrained` (and `run --pretrained`) reads; the
1,000-class head is kept and replaced by `build_model` when the dataset has another class count."""

from __future__ import annotations

import os
import re

import torch

from ..errors import DiffmixError

ARCHS = ("resnet50", "vit_base_patch16_384", "vit_base_patch16_224")
_VIT_BLOCK = {"ln_1": "norm1", "self_attention.in_proj_weight": "attn.qkv.weight",
              "self_attention.in_proj_bias": "attn.qkv.bias", "self_attention.out_proj": "attn.proj",
              "ln_2": "norm2", "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2",
              "mlp.linear_1": "mlp.fc1", "mlp.linear_2": "mlp.fc2"}  # (torchvision < 0.13 named them linear_i)
_VIT_TOP = {"conv_proj": "patch_embed.proj", "class_token": "cls_token", "encoder.pos_embedding": "pos_embed",
            "encoder.ln": "norm", "heads.head": "head"}
_LAYER = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)$")


def _rename(key: str, table: dict[str, str]) -> str | None:
    """`key` with its longest matching prefix (a whole dotted name) replaced, or None."""
    for old in sorted(table, key=len, reverse=True):
        if key == old or key.startswith(old + "."):
            return table[old] + key[len(old):]
    return None


def vit_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision VisionTransformer state dict under timm's VisionTransformer names."""
    if any(k.startswith("heads.pre_logits") for k in state):
        raise DiffmixError("this ViT checkpoint has a pre-logits layer (representation_size); timm's "
                           "vit_base_patch16_* has none: convert a checkpoint without one "
                           "(e.g. IMAGENET1K_SWAG_E2E_V1)")
    out, unknown = {}, []
    for key, value in state.items():
        if layer := _LAYER.match(key):
            rest = _rename(layer.group(2), _VIT_BLOCK)
            new = f"blocks.{layer.group(1)}.{rest}" if rest else None
        else:
            new = _rename(key, _VIT_TOP)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise DiffmixError(f"{len(unknown)} tensors of the checkpoint are no part of a torchvision ViT "
                           f"(e.g. {unknown[:3]}): is it a torchvision vit_b_16 state dict?")
    return out


def source_kind(state: dict[str, torch.Tensor]) -> str:
    if "conv_proj.weight" in state and "class_token" in state:
        return "torchvision-vit"
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state and "fc.weight" in state:
        return "torchvision-resnet"
    raise DiffmixError(f"the checkpoint is neither a torchvision ResNet nor a ViT state dict (first keys "
                       f"{list(state)[:4]}); convert-classifier reads torchvision's resnet50 and vit_b_16 weights")


def convert_state(state: dict[str, torch.Tensor], arch: str, **model_kwargs) -> dict[str, torch.Tensor]:
    """`state` (torchvision) renamed for timm `arch`, checked tensor by tensor against that architecture
    with the checkpoint's own class count: every tensor present, none left over, every shape equal.
    `model_kwargs` go to timm.create_model (tests check the mapping on a shallower ViT-B: depth=2)."""
    import timm

    if arch not in ARCHS:
        raise DiffmixError(f"--arch {arch!r}: convert-classifier maps onto {', '.join(ARCHS)}")
    kind = source_kind(state)
    if (kind == "torchvision-vit") != arch.startswith("vit"):
        raise DiffmixError(f"the checkpoint is a {kind.split('-')[1]} state dict and --arch is {arch}: pass "
                           f"--arch {'vit_base_patch16_384' if kind == 'torchvision-vit' else 'resnet50'}")
    state = vit_keys(state) if kind == "torchvision-vit" else dict(state)
    head = "head.weight" if arch.startswith("vit") else "fc.weight"
    model = timm.create_model(arch, pretrained=False, num_classes=state[head].shape[0], **model_kwargs)
    own = model.state_dict()
    if arch.startswith("vit") and state["pos_embed"].shape != own["pos_embed"].shape:
        tokens = state["pos_embed"].shape[1]
        size = 16 * round((tokens - 1) ** 0.5)
        raise DiffmixError(f"the checkpoint's position embeddings cover {tokens} tokens ({size} px input); {arch} "
                           f"takes {own['pos_embed'].shape[1]}: pass --arch vit_base_patch16_{size} (the reference's "
                           "ViT is IMAGENET1K_SWAG_E2E_V1 at 384 px)")
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or extra or shapes:
        raise DiffmixError(f"the converted checkpoint does not fit timm {arch}: {len(missing)} missing, {len(extra)} "
                           f"left over, {len(shapes)} mis-shaped (e.g. {(missing + extra + shapes)[:3]})")
    model.load_state_dict(state, strict=True)  # the final word on names and shapes
    return {k: v.detach().to(own[k].dtype).contiguous() for k, v in state.items()}


def convert_file(src: str, out: str, arch: str, overwrite: bool = False) -> str:
    """Read a torchvision checkpoint, convert it for `arch`, write it as safetensors; returns the file.
    OUT ending in .safetensors is the file, anything else a folder that receives model.safetensors."""
    from safetensors.torch import save_file

    from .model import fingerprint, read_state, weights_file

    file = out if out.endswith(".safetensors") else os.path.join(out, "model.safetensors")
    if os.path.exists(file) and not overwrite:
        raise DiffmixError(f"{file} exists: pass --overwrite to replace it, or another OUT")
    source = weights_file(src, "SRC")
    try:
        state = read_state(source)
    except Exception as e:  # noqa: BLE001 - unreadable file in any format
        raise DiffmixError(f"SRC {src} is not a readable weights file: {e}") from e
    converted = convert_state(state, arch)
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    meta = {"arch": arch, "converted_from": os.path.basename(source), "source_sha256": fingerprint(source),
            "source_kind": source_kind(state)}
    tmp = file + ".tmp"
    save_file(converted, tmp, metadata=meta)
    os.replace(tmp, file)
    return file
