"""prepare throughput on a 2,000-image fixture: local -> local, local -> S3 and S3 -> local, the
S3 side being a moto server on 127.0.0.1 (protocol-real, not network-real).

    .venv/bin/python bench/bench_prepare.py [--images 2000] [--size 256]

Prints figures and writes them to bench/results/ (--json); asserts nothing."""

from __future__ import annotations

import io
import json
import os
import tempfile

import numpy as np
from PIL import Image

from _harness import Bench, timed  # beside this file


def make_fixture(root: str, images: int, classes: int, size: int) -> int:
    rng = np.random.default_rng(0)
    total = 0
    for i in range(images):
        folder = os.path.join(root, f"class {i % classes:03d}")
        os.makedirs(folder, exist_ok=True)
        # Smooth noise: compresses like a photo (~20-40 KB at 256 px), not like white noise.
        small = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        with open(os.path.join(folder, f"{i:05d}.jpg"), "wb") as f:
            f.write(buf.getvalue())
        total += len(buf.getvalue())
    return total


bench = Bench("prepare", __doc__)
bench.parser.add_argument("--images", type=int, default=2000)
bench.parser.add_argument("--classes", type=int, default=20)
bench.parser.add_argument("--size", type=int, default=256)


def measure(args, results) -> None:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from diffmix_ray import storage
    from diffmix_ray.data.prepare import PrepareConfig, prepare

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_EC2_METADATA_DISABLED="true")
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="bench")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "raw")
            nbytes = make_fixture(raw, args.images, args.classes, args.size)
            fs, _ = storage.filesystem("s3://bench")
            fs.put(raw, "bench/raw", recursive=True)
            cfg = PrepareConfig("imagefolder", raw, super_class="thing")
            results.update(images=args.images, fixture_mib=round(nbytes / 2**20, 1))
            for name, run in (
                ("local_to_local", lambda: prepare(cfg, os.path.join(tmp, "out"), show_progress=False)),
                ("local_to_s3", lambda: prepare(cfg, "s3://bench/out", show_progress=False)),
                ("s3_to_local", lambda: prepare(PrepareConfig("imagefolder", "s3://bench/raw", super_class="thing"),
                                                os.path.join(tmp, "out2"), show_progress=False)),
            ):
                seconds = timed(run)
                figures = {"seconds": round(seconds, 2), "images_per_s": round(args.images / seconds, 1)}
                results.update(**{name: figures})
        print(json.dumps({k: v for k, v in results.data.items() if k != "run"}, indent=2))
    finally:
        server.stop()


if __name__ == "__main__":
    bench.main(measure)
