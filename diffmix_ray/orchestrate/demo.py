"""`diffmix-ray demo`: every stage on built-in defaults (the sample world's 12 classes, the `sample`
model and CLIP trained on that world, local Ray, local disk, CPU). Each step calls the same code a real
run does; only the sizes are small. It ends with what the sample world's judge (a colour-and-shape
measurement, no model) sees in the translations at each strength."""

from __future__ import annotations

import os
import time

from rich.markup import escape

from .. import storage
from ..console import console
from ..errors import DiffmixError

STEPS = ("prepare", "finetune", "generate", "score", "train-cls", "report")
# Diff-Mix images that look like their target class (upper 80% of the sample CLIP's probability, within
# each target class) and show the object at all (all but the lowest 10% of the reference's object score).
DEMO_FILTER = ("clip_target_prob:p20-100@class", "clip_object_prob:p10-100")
DEMO_STRENGTHS = (0.3, 0.5, 0.7, 0.9)  # a set, so the contact sheet shows the translations as strength grows
DEMO_PER_CLASS = 10  # images per class: 6 train, 2 val, 2 test


def run_demo(out: str, overwrite: bool = False) -> dict[str, str]:
    from ..data.prepare import PrepareConfig, prepare
    from ..data.sample import SAMPLE_CLASSES, SAMPLE_SUPER_CLASS, write_sample_imagefolder
    from ..classify.config import ClassifyConfig
    from ..classify.run import run_classify
    from ..finetune.config import FinetuneConfig
    from ..finetune.run import run_finetune
    from ..generate.config import GenerateConfig
    from ..generate.run import run_generate
    from ..score.config import ScoreConfig
    from ..score.run import run_score

    out = storage.normalize(out)
    if storage.is_s3(out):
        raise DiffmixError("the demo writes to local disk; pass a local --out")
    t0 = time.perf_counter()
    paths = {"raw": os.path.join(out, "raw"), "dataset": os.path.join(out, "dataset"),
             "concepts": os.path.join(out, "concepts"), "synthetic": os.path.join(out, "synthetic"),
             "scores": os.path.join(out, "synthetic", "scores", "default"), "classifier": os.path.join(out, "classifier"),
             "report": os.path.join(out, "report")}

    console.rule(f"1/{len(STEPS)} prepare: the sample world's {len(SAMPLE_CLASSES)} classes -> canonical dataset")
    if overwrite or not os.path.isdir(paths["raw"]):
        write_sample_imagefolder(paths["raw"], num_classes=len(SAMPLE_CLASSES), per_class=DEMO_PER_CLASS)
    prepare(PrepareConfig(format="imagefolder", source=paths["raw"], super_class=SAMPLE_SUPER_CLASS, name="sample",
                          val_fraction=0.2, test_fraction=0.2), paths["dataset"], overwrite=overwrite,
            show_progress=False)

    console.rule(f"2/{len(STEPS)} finetune: one token per class + UNet LoRA on the sample model (Ray Train)")
    _init_local_ray(out)
    run_finetune(FinetuneConfig(dataset=paths["dataset"], out=paths["concepts"], model=DEMO_MODEL, **DEMO_FINETUNE),
                 overwrite=overwrite)

    console.rule(f"3/{len(STEPS)} generate: diff-mix translations with the concept bank (Ray Data)")
    run_generate(GenerateConfig(dataset=paths["dataset"], model=DEMO_MODEL, concepts=paths["concepts"],
                                out=paths["synthetic"], mode="diff-mix", per_image=4, multiplier=None,
                                strength_set=DEMO_STRENGTHS, steps=DEMO_STEPS, batch_size=16, cpus_per_actor=1,
                                rows_per_shard=512),
                 overwrite=overwrite)

    console.rule(f"4/{len(STEPS)} score: the sample CLIP scores every synthetic image, beside the shards "
                 "(Ray Data)")
    run_score(ScoreConfig(synthetic=paths["synthetic"], clip=DEMO_MODEL, batch_size=64), overwrite=overwrite)

    console.rule(f"5/{len(STEPS)} train-cls: a timm classifier on real + the synthetic images a score filter "
                 "keeps (Ray Train)")
    run_classify(ClassifyConfig(dataset=paths["dataset"], synthetic=(paths["synthetic"],), arch="test_resnet",
                                out=paths["classifier"], img_size=32, epochs=4, batch_size=16, lr=0.01,
                                optimizer="adamw", weight_decay=0.0, warmup_epochs=0.0, synthetic_p=0.3,
                                synthetic_filter=DEMO_FILTER),
                 overwrite=overwrite)  # an unfinished run of this config continues from its last epoch

    console.rule(f"6/{len(STEPS)} report: contact sheet, score plots, accuracy plot, comparison table")
    from .report import run_report

    run_report([paths["synthetic"], paths["classifier"]], paths["report"])
    from .judged import judge_synthetic, judged_markdown

    judged = judged_markdown(judge_synthetic(paths["synthetic"]), "What the judge sees in the Diff-Mix translations "
                             "(colour and shape measured, no model)")
    storage.write_text_atomic(os.path.join(paths["report"], "judged.md"), judged)
    console.print(judged, markup=False, highlight=False)

    console.print(f"[green]demo finished in {time.perf_counter() - t0:.1f} s[/green]: "
                  + escape(", ".join(f"{k} at {v}" for k, v in paths.items())), markup=True)
    return paths


DEMO_MODEL = "sample"  # the sample model and the sample CLIP: trained on the world the demo draws
# 12 tokens + LoRA: 300 steps of 8 images (~30 s of stepping on a CPU; Ray Train's start costs more) let
# every token find its class (docs/sample-world.md)
DEMO_FINETUNE = dict(rank=4, lr=1e-3, ti_lr=5e-3, max_steps=300, batch_size=8, checkpoint_every=300, log_every=100)
DEMO_STEPS = 10  # DPM-Solver++ steps (Diff-Mix: 25): the demo's time; 10 judge about the same on the sample model


def _init_local_ray(out: str) -> None:
    """A local Ray for the demo unless one is running/addressed already; its files stay in --out."""
    import ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return
    temp = os.path.join("/tmp", f"diffmix-demo-ray-{os.getpid()}")  # Ray needs a short socket path
    ray.init(include_dashboard=False, _temp_dir=temp, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)  # loopback only: nothing outside this machine needs to reach it
