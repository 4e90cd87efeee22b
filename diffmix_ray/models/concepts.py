"""The concept bank (finetune -> generate): per-class textual-inversion tokens + UNet LoRA.

On disk (contracts.py names the files): `pytorch_lora_weights.safetensors` (diffusers LoRA
format, absent for a TI-only bank), `learned_embeds.safetensors` (placeholder token -> vector)
and `concepts.json`. Loading goes through diffusers' own loaders (`load_lora_weights`,
`load_textual_inversion`), so a bank also loads into a plain diffusers pipeline."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import storage
from ..contracts import CONCEPTS_JSON, LEARNED_EMBEDS, LORA_WEIGHTS
from ..errors import DiffmixError

BANK_MODES = ("ti+lora", "ti", "lora")


@dataclass(frozen=True)
class ConceptBank:
    tokens: list[str]  # index = class label
    class_names: list[str]
    prompt_template: str  # with {token} and {super_class}
    super_class: str
    mode: str  # ti+lora | ti | lora
    base_model: dict[str, Any]  # {"spec": ..., "fingerprint": ...}
    dataset_fingerprint: str
    train_config: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""  # hash of the bank's files, filled in by load_bank

    @property
    def has_lora(self) -> bool:
        return self.mode in ("ti+lora", "lora")

    @property
    def has_tokens(self) -> bool:
        return self.mode in ("ti+lora", "ti")

    def prompt(self, label: int) -> str:
        if not 0 <= label < len(self.tokens):
            raise DiffmixError(f"class {label} has no token in this concept bank (it has {len(self.tokens)} classes)")
        token = self.tokens[label] if self.has_tokens else self.class_names[label]
        return self.prompt_template.format(token=token, super_class=self.super_class).strip()


def _meta(bank: ConceptBank) -> dict[str, Any]:
    meta = asdict(bank)
    meta.pop("fingerprint")
    return meta


def check_finite(tensors: dict, what: str) -> None:
    """Refuse weights holding NaN or infinity (a diverged fine-tune): a bank of them generates nothing."""
    import torch

    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise DiffmixError(f"{what}: tensor {name!r} holds non-finite values (NaN or inf): the fine-tune "
                               "diverged; fine-tune again with a lower --lr / --ti-lr")


def save_bank(out: str, bank: ConceptBank, lora_state: dict | None, embeds: dict | None) -> None:
    """Write the bank; concepts.json goes last, so its presence means the bank is complete."""
    from safetensors.torch import save_file

    if bank.mode not in BANK_MODES:
        raise DiffmixError(f"concept bank mode {bank.mode!r} must be one of {BANK_MODES}")
    for part in (lora_state, embeds):
        check_finite(part or {}, f"the concept bank for {out}")
    with tempfile.TemporaryDirectory() as tmp:
        if bank.has_lora:
            from diffusers import StableDiffusionPipeline

            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=lora_state, weight_name=LORA_WEIGHTS,
                                                      safe_serialization=True)
            storage.write_bytes_atomic(storage.join(out, LORA_WEIGHTS), open(os.path.join(tmp, LORA_WEIGHTS), "rb").read())
        if bank.has_tokens:
            path = os.path.join(tmp, LEARNED_EMBEDS)
            save_file({t: embeds[t].detach().float().cpu().contiguous() for t in bank.tokens}, path)
            storage.write_bytes_atomic(storage.join(out, LEARNED_EMBEDS), open(path, "rb").read())
    storage.write_json_atomic(storage.join(out, CONCEPTS_JSON), _meta(bank))


def load_bank(uri: str) -> tuple[ConceptBank, str]:
    """Read a bank; returns it and a local directory holding its files (staged from S3 if needed)."""
    uri = storage.normalize(uri)
    meta_uri = storage.join(uri, CONCEPTS_JSON)
    if not storage.exists(meta_uri):
        raise DiffmixError(f"{uri} is not a concept bank (no {CONCEPTS_JSON}); make one with `diffmix-ray finetune`")
    meta = storage.read_json(meta_uri)
    try:
        bank = ConceptBank(**{k: meta[k] for k in ("tokens", "class_names", "prompt_template", "super_class", "mode",
                                                   "base_model", "dataset_fingerprint")},
                           train_config=meta.get("train_config", {}))
    except KeyError as e:
        raise DiffmixError(f"{meta_uri} lacks field {e}; it was not written by diffmix-ray finetune") from e
    local = storage.normalize(uri)
    if storage.is_s3(uri):
        local = tempfile.mkdtemp(prefix="diffmix-bank-")
    h = hashlib.sha256(json.dumps(_meta(bank), sort_keys=True).encode())
    for name, needed in ((LORA_WEIGHTS, bank.has_lora), (LEARNED_EMBEDS, bank.has_tokens)):
        if not needed:
            continue
        src = storage.join(uri, name)
        if not storage.exists(src):
            raise DiffmixError(f"concept bank {uri} (mode {bank.mode}) is missing {name}")
        data = storage.read_bytes(src)
        from safetensors.torch import load as load_tensors

        try:
            tensors = load_tensors(data)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on damaged files
            raise DiffmixError(f"concept bank {uri}: {name} is not a readable safetensors file ({e}); "
                               "fine-tune again or restore the file") from e
        check_finite(tensors, f"concept bank {uri}: {name}")
        h.update(hashlib.sha256(data).digest())
        if storage.is_s3(uri):
            with open(os.path.join(local, name), "wb") as f:
                f.write(data)
    return ConceptBank(**{**asdict(bank), "fingerprint": h.hexdigest()}), local


def check_bank_matches(bank: ConceptBank, bank_uri: str, model_fingerprint: str, dataset_fingerprint: str) -> None:
    """Refuse a bank trained on another base model or another dataset: its tokens would mean nothing."""
    if bank.base_model.get("fingerprint") != model_fingerprint:
        raise DiffmixError(f"concept bank {bank_uri} was trained on base model {bank.base_model.get('spec')!r} "
                           f"(fingerprint {str(bank.base_model.get('fingerprint'))[:12]}), not the --model given "
                           f"(fingerprint {model_fingerprint[:12]}); pass the same base model it was fine-tuned from")
    if bank.dataset_fingerprint != dataset_fingerprint:
        raise DiffmixError(f"concept bank {bank_uri} was trained on another dataset (fingerprint "
                           f"{bank.dataset_fingerprint[:12]}, --dataset has {dataset_fingerprint[:12]}); "
                           "fine-tune on this dataset or pass the dataset the bank was made from")


def apply_bank(pipe, bank: ConceptBank, local_dir: str) -> None:
    """Load the bank's LoRA and tokens into `pipe` (in place)."""
    from safetensors.torch import load_file

    if bank.has_lora:
        pipe.load_lora_weights(local_dir, weight_name=LORA_WEIGHTS)
    if bank.has_tokens:
        embeds = load_file(os.path.join(local_dir, LEARNED_EMBEDS))
        missing = [t for t in bank.tokens if t not in embeds]
        if missing:
            raise DiffmixError(f"{LEARNED_EMBEDS} in the concept bank lacks tokens {missing[:5]}")
        pipe.load_textual_inversion([embeds[t] for t in bank.tokens], token=list(bank.tokens))



def write_random_bank(out: str, model: str, class_names: list[str], super_class: str, dataset_fingerprint: str,
                      mode: str = "ti+lora", seed: int = 0, lora_std: float = 0.5, token_std: float | None = None,
                      rank: int = 4) -> str:
    """A concept bank in exactly the format `finetune` writes, with seeded random weights instead of
    trained ones: for tests and benchmarks that need a bank (LoRA + class tokens) on any model
    without fine-tuning first. peft initialises LoRA's up weights to zero; they are drawn from
    N(0, lora_std) here so the bank visibly changes the images; token vectors from N(0, token_std),
    by default at the scale of the model's own embeddings. Returns `out`."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from ..contracts import DEFAULT_PROMPT_TEMPLATE, PLACEHOLDER_TEMPLATE
    from .loader import load_pipeline

    pipe, ref = load_pipeline(model, device="cpu")
    lora = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if mode in ("ti+lora", "lora"):
            pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                             target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
            with torch.no_grad():
                for name, p in pipe.unet.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, lora_std)
            lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
        dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
        tokens = [PLACEHOLDER_TEMPLATE.format(index=i) for i in range(len(class_names))]
        scale = token_std if token_std is not None else float(pipe.text_encoder.get_input_embeddings().weight.detach().std())
        embeds = {t: torch.randn(dim) * scale for t in tokens}
    bank = ConceptBank(tokens=tokens, class_names=list(class_names), prompt_template=DEFAULT_PROMPT_TEMPLATE,
                       super_class=super_class, mode=mode, base_model={"spec": ref.spec, "fingerprint": ref.fingerprint},
                       dataset_fingerprint=dataset_fingerprint, train_config={"random": True, "seed": seed})
    save_bank(out, bank, lora, embeds)
    return out
