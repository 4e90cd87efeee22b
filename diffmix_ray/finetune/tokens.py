"""The class tokens' embeddings as their own small trainable parameter.

Textual inversion learns one vector per class. diffusers' textual_inversion.py (and this project
before this module) makes the text encoder's whole embedding matrix trainable and undoes the update
of every other row after each step; for SD 1.5 that is a 49,408 x 768 fp32 gradient (152 MB) to
all-reduce under DDP and two Adam moments of the same size, to learn C x 768 numbers.

`ClassTokenEmbedding` replaces the text encoder's token lookup instead: ids of the base vocabulary
are looked up in the frozen matrix of the base model (untouched, not even resized), the ids the
tokenizer appended for the class tokens come from `vectors` (C x hidden, fp32), the only trainable
part. The values, gradients and Adam updates of the class rows are those of the full-matrix path;
everything else is left out rather than zeroed and restored. Plain tensor ops only: no boolean-mask
indexing (a `nonzero`, i.e. a host sync, per step)."""

from __future__ import annotations

import torch

from ..errors import DiffmixError


class ClassTokenEmbedding(torch.nn.Module):
    """input ids -> embeddings: ids < first_id from the frozen `base`, ids first_id.. first_id+C-1
    from `vectors` row id - first_id. The output has the frozen matrix's dtype: under bf16/fp16 the
    text encoder then computes in one dtype throughout (fp32 master vectors, low-precision compute,
    as autocast treats every other weight; a fp32 embedding output met bf16 LayerNorm weights), and
    in fp32 it equals the full fp32 trainable matrix of before."""

    def __init__(self, base: torch.nn.Embedding, first_id: int, vectors: torch.Tensor):
        super().__init__()
        if first_id > base.num_embeddings:
            raise DiffmixError(f"the class tokens start at id {first_id}, past the text encoder's "
                               f"{base.num_embeddings} embedding rows: the model's tokenizer and text encoder "
                               "disagree on the vocabulary; use a model folder whose tokenizer fits its text encoder")
        self.base = base.requires_grad_(False)
        self.first_id = first_id
        self.vectors = torch.nn.Parameter(vectors.detach().clone().float())

    @property
    def num_classes(self) -> int:
        return self.vectors.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_class = input_ids >= self.first_id
        looked_up = self.base(input_ids.masked_fill(is_class, 0))  # row 0 stands in, replaced below
        class_rows = torch.nn.functional.embedding((input_ids - self.first_id).clamp(min=0), self.vectors)
        return torch.where(is_class.unsqueeze(-1), class_rows.to(looked_up.dtype), looked_up)


def install_class_tokens(tokenizer, text_encoder, tokens: list[str], init_ids: list[int]) -> ClassTokenEmbedding:
    """Add `tokens` to `tokenizer` and give `text_encoder` a ClassTokenEmbedding whose class vectors
    all start at the mean embedding of `init_ids`. Returns the new lookup module."""
    if clash := [t for t in tokens if t in tokenizer.get_vocab()]:
        raise DiffmixError(f"the base model's tokenizer already has tokens {clash[:3]}; fine-tune from the "
                           "base model itself, not from a pipeline that already holds a concept bank")
    tokenizer.add_tokens(tokens)
    token_ids = tokenizer.convert_tokens_to_ids(tokens)
    first_id = token_ids[0]
    if token_ids != list(range(first_id, first_id + len(tokens))):  # the lookup maps ids to rows by offset
        raise DiffmixError(f"the tokenizer gave the class tokens ids {token_ids[:5]}..., not consecutive ids after its "
                           "vocabulary; use a model folder with a standard CLIP tokenizer")
    base = text_encoder.get_input_embeddings()
    with torch.no_grad():
        init = base.weight[init_ids].mean(0)  # in the frozen dtype, as the full-matrix path computed it
    lookup = ClassTokenEmbedding(base, first_id, init.unsqueeze(0).expand(len(tokens), -1))
    text_encoder.set_input_embeddings(lookup)
    return lookup
