"""train-cls's view of its classifier: a timm architecture with optional local pretrained weights
(built by models.classifier, the one classifier factory), and what a run records of those weights."""

from __future__ import annotations

from ..models.classifier import WEIGHT_FILES, check_arch, create_classifier, read_state, weights_file  # noqa: F401

# --pretrained none: random initialisation on purpose (a recipe naming pretrained weights insists on
# being told), recorded as such in metrics.json and the report
FROM_SCRATCH = "none"


def fingerprint(file: str) -> str:
    """sha256 of a weights file's bytes: which weights a run started from, whatever the file is called."""
    import hashlib

    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_weights(pretrained: str | None) -> dict:
    """What a run's backbone started from, for metrics.json and the report: the file and its sha256,
    or a random initialisation (chosen with --pretrained none, or no --pretrained at all)."""
    if not pretrained or pretrained == FROM_SCRATCH:
        return {"pretrained": pretrained, "file": None, "sha256": None,
                "init": "random (--pretrained none)" if pretrained == FROM_SCRATCH else "random (no --pretrained)"}
    file = weights_file(pretrained)
    return {"pretrained": pretrained, "file": file, "sha256": fingerprint(file), "init": "pretrained"}


def build_model(arch: str, num_classes: int, pretrained: str | None = None):
    """`arch` with `num_classes` outputs; `pretrained`: a local weights file or folder (its head replaced
    when the class count differs), or None / "none" for a random initialisation."""
    return create_classifier(arch, num_classes, None if pretrained in (None, "", FROM_SCRATCH) else pretrained)
