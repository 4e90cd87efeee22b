"""The `diffmix-ray finetune` command. cli.py registers it (wrapped in its `friendly` error
printer); this module must not import diffmix_ray.cli, which imports it."""

from __future__ import annotations

from typing import Optional

import typer


def finetune(
    dataset: Optional[str] = typer.Option(None, help="Canonical dataset URI (from `prepare`); reads its train split."),
    model: Optional[str] = typer.Option(None, help="Base model: sample | tiny | bench | sd15 | a diffusers folder | s3://..."),
    out: Optional[str] = typer.Option(None, help="Output URI: the concept bank at its root, checkpoints under train/."),
    config: Optional[str] = typer.Option(None, help="YAML file with any of these options (flags override it)."),
    mode: Optional[str] = typer.Option(None, help="ti+lora (default: class tokens + UNet LoRA) | ti | lora."),
    rank: Optional[int] = typer.Option(None, help="LoRA rank (default 10)."),
    lr: Optional[float] = typer.Option(None, help="LoRA learning rate (default 5e-5)."),
    ti_lr: Optional[float] = typer.Option(None, help="Class-token embedding learning rate (default 5e-5)."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (default 35000, the reference's)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per worker per step (default 2)."),
    workers: Optional[int] = typer.Option(None, help="Data-parallel training workers (default 1)."),
    gpus_per_worker: Optional[float] = typer.Option(None, help="GPUs per worker. Default: 1 when the Ray cluster has GPUs or its autoscaler can add them, else 0 (CPU, fp32)."),
    cpus_per_worker: Optional[float] = typer.Option(None, help="CPUs per worker (= torch threads on CPU; default 1)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps (default 5000)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the LoRA init and the noise (default 42)."),
    initializer_token: Optional[str] = typer.Option(
        None, help="Word every class token starts from; must be one token (default 'ktn', averaged over its pieces "
                   "if the tokenizer splits it)."),
    prompt_template: Optional[str] = typer.Option(None, help="Training prompt with {token} and {super_class} "
                                                             "(default 'a photo of a {token} {super_class}')."),
    class_balanced: Optional[bool] = typer.Option(None, "--class-balanced/--no-class-balanced",
                                                  help="Draw images with p ∝ 1/n_c, every class equally often in "
                                                       "expectation (default: on for long-tailed datasets, the "
                                                       "paper's; off otherwise)."),
    token_schedule: Optional[str] = typer.Option(None, help="joint (default: one AdamW over every token each step, "
                                                 "the Diff-Mix reference) | per-class (--mode ti: each step one "
                                                 "class, only its token updated: DA-Fusion's separate runs)."),
    gradient_checkpointing: Optional[bool] = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute the UNet's activations in backward: less GPU memory, slower steps (default off)."),
    compile_unet: Optional[bool] = typer.Option(
        None, "--compile/--no-compile",
        help="torch.compile the UNet: compiles during the first steps, then runs faster ones (default off)."),
    overwrite: bool = typer.Option(False, help="Delete a different run found at --out and start again."),
    resume: bool = typer.Option(False, help="Insist on resuming the run at --out (fail if it holds none)."),
):
    """Learn one token per class plus a UNet LoRA (Ray Train, DDP) and write the concept bank `generate` uses."""
    from .. import config as cfgmod
    from .config import FinetuneConfig
    from .run import run_finetune

    cfg = cfgmod.build(FinetuneConfig, config, dict(
        dataset=dataset, model=model, out=out, mode=mode, rank=rank, lr=lr, ti_lr=ti_lr, max_steps=max_steps,
        batch_size=batch_size, workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
        checkpoint_every=checkpoint_every, seed=seed, initializer_token=initializer_token,
        prompt_template=prompt_template, class_balanced=class_balanced, token_schedule=token_schedule,
        gradient_checkpointing=gradient_checkpointing, compile=compile_unet))
    run_finetune(cfg, overwrite=overwrite, resume=resume)
