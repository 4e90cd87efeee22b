"""What the generate pipeline costs per pair apart from translation, over >= 640k pairs: what a
6.4M-pair ImageNet-sized run pays for its machinery.

  machinery   the driver (plan, resume bookkeeping, blocks) and Ray Data (tasks, blocks, the source
              reads by row group, the shard writes) with a no-op translator and no-op image codecs
              (target <= 0.05 ms per pair on a 2-core machine: 6.4M pairs cost minutes, not hours)
  codecs      the same with the real CPU stages on 8x8-pixel JPEGs: + PIL's fixed cost per image

    .venv/bin/python bench/bench_generate_overhead.py [--pairs 640000] [--codec-pairs 64000]

Prints seconds per phase and ms per pair and writes them to bench/results/ (--json). Asserts nothing
about timing; exits 1 if the shards do not hold exactly the plan."""

from __future__ import annotations

import dataclasses
import os
import time

from _harness import Bench, rounded, workdir  # beside this file
from _inputs import sample_dataset

RESOLUTION = 8  # pixels per side everywhere: decoding, "translating" and encoding cost ~nothing


def noop_before(batch, files, resolution, chunk_rows):
    """prepare_sources without decoding: the same row-group reads, zero pixels."""
    import numpy as np

    from diffmix_ray.generate import cpu_stages as cs

    data = cs.read_sources(batch, files)
    for start in range(0, batch.num_rows, chunk_rows):
        chunk = batch.slice(start, chunk_rows)
        n = chunk.num_rows
        yield cs._plan_columns(chunk) | {
            cs.COL_PIXELS: np.zeros((n, resolution, resolution, 3), np.uint8),
            cs.COL_SOURCE_W: np.full(n, resolution, np.int32), cs.COL_SOURCE_H: np.full(n, resolution, np.int32),
            cs.COL_ERROR: np.full(n, "", dtype=object), "_bytes": np.array([len(d or b"") for d in data[start:start + n]])}


def noop_after(batch, failed_uri, jpeg_quality):
    """finish_images without encoding: the same shard rows, a constant image."""
    import pyarrow as pa

    from diffmix_ray.contracts import PLAN_SCHEMA, SHARD_SCHEMA
    from diffmix_ray.generate import cpu_stages as cs

    n = len(batch["pair_id"])
    rows = list(range(n))
    columns = {f.name: cs._column(batch[f.name], rows, f.type) for f in PLAN_SCHEMA}
    columns.update({"image": pa.array([b"\xff\xd8"] * n, pa.binary()), "width": pa.array([8] * n, pa.int32()),
                    "height": pa.array([8] * n, pa.int32()), "prompt": pa.array(["no-op"] * n, pa.string())})
    return pa.table([columns[f.name] for f in SHARD_SCHEMA], schema=SHARD_SCHEMA)


class NoOpTranslator:
    """The translation actor's contract (uint8 pixels in, uint8 pixels + prompt out) without a model."""

    def __init__(self, **_):
        pass

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from diffmix_ray.contracts import COL_PROMPT

        out = dict(batch)
        out[COL_PROMPT] = np.full(len(batch["pair_id"]), "no-op", dtype=object)
        return out


def run_case(name: str, dataset: str, work: str, pairs: int, train_images: int, batch_size: int, noop_codecs: bool,
             results):
    from diffmix_ray import exactly_once, storage
    from diffmix_ray.contracts import COL_PAIR_ID, SHARDS_DIR
    from diffmix_ray.generate import run
    from diffmix_ray.generate.config import GenerateConfig

    cfg = GenerateConfig(dataset=dataset, model="tiny", out=os.path.join(work, name), mode="real-mix",
                         multiplier=pairs / train_images, batch_size=batch_size, gpus_per_actor=0.0)
    times = {}
    t = time.perf_counter()
    inputs = dataclasses.replace(run.resolve_inputs(cfg), resolution=RESOLUTION)
    plan = run.build_plan(inputs)
    times["plan"] = time.perf_counter() - t
    t = time.perf_counter()
    run.write_plan(inputs.out, plan)
    exactly_once.scan_files(storage.join(inputs.out, SHARDS_DIR))
    todo, files = run._todo(inputs, plan, set())
    times["resume bookkeeping"] = time.perf_counter() - t
    block, chunk = run.block_rows(todo.num_rows, cfg, RESOLUTION)
    stages = dict(before=noop_before, after=noop_after) if noop_codecs else {}
    t = time.perf_counter()
    run._ray_pipeline(inputs, todo, files, 0.0, translator=NoOpTranslator, **stages)
    times["pipeline"] = time.perf_counter() - t
    t = time.perf_counter()
    found, _ = exactly_once.scan_files(storage.join(inputs.out, SHARDS_DIR))
    times["verify"] = time.perf_counter() - t
    done = [i for ids in found.values() for i in ids]
    exact = sorted(done) == sorted(plan.column(COL_PAIR_ID).to_pylist())
    n = plan.num_rows
    print(f"{name}: {n} pairs from {train_images} train images; blocks of {block} rows ({-(-n // block)} blocks), "
          f"chunks of {chunk}; {len(found)} shards; exact: {exact}")
    for phase, seconds in times.items():
        print(f"  {phase:<20} {seconds:7.1f} s   {1000 * seconds / n:.4f} ms/pair")
    per_pair = 1000 * sum(times.values()) / n
    print(f"  per pair {per_pair:.4f} ms; 6.4M pairs: {per_pair * 6.4e6 / 60_000:.1f} min", flush=True)
    results.update(**{name: {"pairs": n, "blocks": -(-n // block), "block_rows": block, "chunk_rows": chunk,
                             "shards": len(found), "exact": exact, "seconds": rounded(times, 2),
                             "ms_per_pair": round(per_pair, 5)}})
    if not exact:
        raise SystemExit(f"FAIL: {name}: the shards do not hold exactly the plan")
    return per_pair


bench = Bench("generate-overhead", __doc__)
bench.parser.add_argument("--pairs", type=int, default=640_000, help="pairs of the machinery run")
bench.parser.add_argument("--codec-pairs", type=int, default=64_000, help="pairs of the run with codecs (0: skip)")
bench.parser.add_argument("--train-images", type=int, default=6_400)
bench.parser.add_argument("--batch-size", type=int, default=16)
bench.parser.add_argument("--work", default=None)


def measure(args, results) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("DIFFMIX_RAY_DASHBOARD", "0")

    from diffmix_ray.runtime.local_ray import init_ray

    with workdir(args.work, "bench-overhead-") as work:
        dataset = sample_dataset(work, 4, args.train_images // 4, RESOLUTION)
        t = time.perf_counter()
        init_ray(min_cpus=1)
        print(f"Ray started in {time.perf_counter() - t:.1f} s (not counted)")
        machinery = run_case("machinery", dataset, work, args.pairs, args.train_images, args.batch_size, True, results)
        print(f"machinery overhead per pair: {machinery:.4f} ms   (target <= 0.05)")
        if args.codec_pairs:
            run_case("codecs", dataset, work, args.codec_pairs, args.train_images, args.batch_size, False, results)


if __name__ == "__main__":
    bench.main(measure)
