"""Parsed records/s: loaders.TFRecordDataset vs the `tfrecord` package, same files, one run.

Writes a Flower-like set (512x512 JPEGs of ~80-100 KB: smooth colour fields plus
blurred and fine noise, which compress like photos), then reads every record as a
parsed dict {image bytes, class int, id} with:
  - ours, in order and in random order, CRC checks on and off;
  - the tfrecord package's `tfrecord_loader` (sequential only: it has no random access);
  - both again on gzip copies of the files.
Files are in the page cache for every reader (each pass is repeated, best kept), so
this measures the parsing/framing overhead, not the disk. A second table times
JPEG decoding (PIL vs OpenCV) on the same images, which picked `decode_image`'s decoder.

    python benchmarks/tfrecord_read.py [--records 512] [--shards 4] [--repeat 3]
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import sys
import tempfile
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.images import flower_like  # noqa: E402

FEATURES = {"image": "bytes", "class": "int", "id": "str"}


def best_rate(fn, n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        count = fn()
        best = min(best, time.perf_counter() - t)
        assert count == n, (count, n)
    return n / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=512)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    from importlib.metadata import version

    import PIL
    from PIL import Image
    from tfrecord.reader import tfrecord_loader

    from torch2flax.loaders import TFRecordDataset, write_tfrecords
    from torch2flax.loaders.image import decode_image

    n = args.records
    print(f"# tfrecord_read: {n} records, {args.size}x{args.size} JPEG, {args.shards} shards")
    print(f"# loadavg (1, 5, 15 min): {tuple(round(x, 2) for x in os.getloadavg())}, "
          f"cpus: {os.cpu_count()}, tfrecord {version('tfrecord')}, "
          f"opencv {cv2.__version__}, pillow {PIL.__version__}")
    tmp = tempfile.mkdtemp(prefix="tfrecord_read_")
    try:
        rng = np.random.default_rng(0)
        images = [flower_like(rng, args.size) for _ in range(min(n, 64))]
        jpegs = [cv2.imencode(".jpg", im[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
                 for im in images]
        examples = [{"image": jpegs[i % len(jpegs)], "class": i % 104, "id": f"{i:08x}"}
                    for i in range(n)]
        files = write_tfrecords(examples, os.path.join(tmp, "plain"), num_shards=args.shards)
        gz_dir = os.path.join(tmp, "gzip")
        os.makedirs(gz_dir)
        gz_files = []
        for path in files:
            dst = os.path.join(gz_dir, os.path.basename(path) + ".gz")
            with open(path, "rb") as src, gzip.open(dst, "wb", compresslevel=6) as out:
                shutil.copyfileobj(src, out)
            gz_files.append(dst)
        mb = sum(os.path.getsize(f) for f in files) / 2**20
        print(f"# mean JPEG {np.mean([len(j) for j in jpegs]) / 1024:.0f} KB, {mb:.0f} MB in total; "
              "files in page cache")

        t = time.perf_counter()
        TFRecordDataset(files, FEATURES)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        TFRecordDataset(files, FEATURES)
        warm = time.perf_counter() - t
        t = time.perf_counter()
        TFRecordDataset(gz_files, FEATURES)
        gz_cold = time.perf_counter() - t
        print(f"# index: built from headers in {cold * 1e3:.1f} ms, loaded from sidecars in "
              f"{warm * 1e3:.1f} ms ({n} records); gzip: one-time decompress + index "
              f"{gz_cold * 1e3:.0f} ms (not in the rates below)\n")

        order = np.random.default_rng(0).permutation(n)

        def ours(paths, verify, idx):
            ds = TFRecordDataset(paths, FEATURES, verify=verify)

            def run():
                return sum(1 for i in idx if ds[int(i)]["class"] >= 0)
            return run

        def theirs(paths, ctype):
            def run():
                count = 0
                for path in paths:
                    for r in tfrecord_loader(path, None, {"image": "byte", "class": "int", "id": "byte"},
                                             compression_type=ctype):
                        r["id"] = r["id"].decode()
                        count += int(r["class"][0]) >= 0
                return count
            return run

        rows = []
        for label, paths, ctype in (("plain", files, None), ("gzip", gz_files, "gzip")):
            base = best_rate(theirs(paths, ctype), n, args.repeat)
            rows.append((label, "tfrecord package, sequential (no CRC check)", base, 1.0))
            for access, idx in (("sequential", range(n)), ("random", order)):
                for verify in (True, False):
                    rate = best_rate(ours(paths, verify, idx), n, args.repeat)
                    rows.append((label, f"ours, {access}, verify={verify}", rate, rate / base))
        print(f"| {'file':5} | {'reader':45} | {'records/s':>10} | {'vs tfrecord':>11} |")
        print(f"|{'-' * 7}|{'-' * 47}|{'-' * 12}|{'-' * 13}|")
        for label, name, rate, ratio in rows:
            print(f"| {label:5} | {name:45} | {rate:10.0f} | {ratio:10.2f}x |")

        print("\n# JPEG decode to RGB uint8, ms per image (best of runs); "
              f"cv2.getNumThreads() = {cv2.getNumThreads()}")

        def pil(data, reduce):
            im = Image.open(io.BytesIO(data))
            if reduce > 1:
                im.draft("RGB", (im.width // reduce, im.height // reduce))
            return np.asarray(im.convert("RGB"))

        reduced = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}

        def cv_bgr_cvt(data, reduce):
            img = cv2.imdecode(np.frombuffer(data, np.uint8), reduced[reduce])
            return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

        def ours_decode(data, reduce):
            return decode_image(data, reduce=reduce)

        decoders = (("PIL Image.open+convert (draft)", pil),
                    ("cv2.imdecode BGR + cvtColor", cv_bgr_cvt),
                    ("decode_image (cv2 IMREAD_COLOR_RGB)", ours_decode))
        sample = jpegs[:16]
        print(f"| {'decoder':37} | {'reduce=1':>8} | {'reduce=2':>8} | {'reduce=4':>8} |")
        print(f"|{'-' * 39}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
        for name, fn in decoders:
            cells = []
            for reduce in (1, 2, 4):
                times = []
                for _ in range(args.repeat + 2):
                    t = time.perf_counter()
                    for data in sample:
                        fn(data, reduce)
                    times.append((time.perf_counter() - t) / len(sample))
                cells.append(f"{min(times) * 1e3:8.2f}")
            print(f"| {name:37} | " + " | ".join(cells) + " |")
        print(f"\n# loadavg after: {tuple(round(x, 2) for x in os.getloadavg())}")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
