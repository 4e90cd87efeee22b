"""finetune benchmark: training steps/s and images/s of the real `finetune` path (Ray Train + Ray
Data ingest) with 1 and 2 workers on this CPU, the `bench` model preset, and where each worker's
time goes: waiting for data, the training step (forward, backward, optimizer) and reporting
(checkpoints). The phases are timed inside the loop (loop.PhaseTimes) and read back from the
final metrics of rank 0.

    .venv/bin/python bench/bench_finetune.py [--steps 30] [--batch-size 2] [--threads 1]

Prints figures and writes them to bench/results/ (--json); asserts nothing. Each worker gets
--threads torch threads (default 1): on a busy 2-core machine a 2-thread worker ran 18x slower per
step than a 1-thread one (0.28 s vs 5.0 s, OpenMP threads fighting other processes), which would
measure the machine, not the code."""

from __future__ import annotations

import json
import os
import tempfile
import time

from _harness import Bench  # beside this file
from _inputs import sample_dataset


def one_run(dataset: str, out: str, workers: int, steps: int, batch_size: int, threads: int) -> dict:
    from diffmix_ray.finetune.config import FinetuneConfig
    from diffmix_ray.finetune.run import run_finetune

    cfg = FinetuneConfig(dataset=dataset, out=out, model="bench", max_steps=steps, batch_size=batch_size,
                         workers=workers, cpus_per_worker=threads, checkpoint_every=max(1, steps // 3),
                         log_every=steps, seed=0)
    t0 = time.perf_counter()
    bank = run_finetune(cfg)
    wall = time.perf_counter() - t0
    m = bank.train_config["final_metrics"]
    loop_s = m["time_data_s"] + m["time_step_s"] + m["time_report_s"]
    steady_s = loop_s - m["time_first_batch_s"]  # without the data pipeline's start-up wait
    return {
        "workers": workers, "threads_per_worker": cfg.cpus_per_worker, "steps": steps,
        "global_batch": batch_size * workers, "wall_s": round(wall, 1), "loop_s": round(loop_s, 2),
        "steps_per_s": round(steps / loop_s, 3), "images_per_s": round(steps * batch_size * workers / loop_s, 2),
        "steady_steps_per_s": round((steps - 1) / steady_s, 3) if steady_s > 0 else None,
        "steady_images_per_s": round((steps - 1) * batch_size * workers / steady_s, 2) if steady_s > 0 else None,
        "first_batch_wait_s": round(m["time_first_batch_s"], 2),
        "share_data_wait": round(m["time_data_s"] / loop_s, 3),
        "share_data_wait_steady": round((m["time_data_s"] - m["time_first_batch_s"]) / steady_s, 3),
        "share_report_checkpoint": round(m["time_report_s"] / loop_s, 3),
        "share_outside_step": round((loop_s - m["time_step_s"]) / loop_s, 3),
        "share_outside_step_steady": round((steady_s - m["time_step_s"]) / steady_s, 3),
        "overhead_outside_loop_s": round(wall - loop_s, 1),  # Ray start-up, worker group, model load, bank
    }


bench = Bench("finetune", __doc__)
bench.parser.add_argument("--steps", type=int, default=30)
bench.parser.add_argument("--batch-size", type=int, default=2)
bench.parser.add_argument("--threads", type=int, default=1)
bench.parser.add_argument("--per-class", type=int, default=16)


def measure(args, results) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    results.update(model="bench (128 px, ~24M-param UNet)", cores=os.cpu_count(), runs=[])
    with tempfile.TemporaryDirectory() as tmp:
        # Logical CPUs = 2 x cores: the training workers and Ray Data's decode tasks both get a share.
        from diffmix_ray.runtime.local_ray import start_private_ray

        start_private_ray(num_cpus=2 * (os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
                          _temp_dir=os.path.join("/tmp", f"bench-ft-ray-{os.getpid()}"))
        try:
            ds = sample_dataset(tmp, 4, args.per_class, 160, val_fraction=0.1)
            for w in (1, 2):
                run = one_run(ds, os.path.join(tmp, f"ft-{w}"), w, args.steps, args.batch_size, args.threads)
                results.update(runs=results.data["runs"] + [run])
        finally:
            ray.shutdown()
    print(json.dumps({k: results.data[k] for k in ("model", "cores", "runs")}, indent=2))


if __name__ == "__main__":
    bench.main(measure)
