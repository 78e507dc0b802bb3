"""`torch2flax make-tfrecords`: build a Flower-schema TFRecord set from images."""
from __future__ import annotations

import argparse
import json
import os


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "make-tfrecords",
        help="write a Flower-schema TFRecord set (image, class, id) from an image folder or a CSV",
        description="Write Kaggle Flower-schema TFRecords (`image` JPEG bytes, `class` int64, "
        "`id` bytes) from SRC: a folder with one sub-folder per class (class index = sorted "
        "folder order, saved to classes.json), or a CSV of path,label[,id].",
    )
    p.add_argument("src", metavar="SRC", help="image folder, or CSV file (path,label[,id])")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the shards")
    p.add_argument("--csv", action="store_true", help="SRC is a CSV (implied when SRC is a file)")
    p.add_argument("--size", type=int, default=None, metavar="S",
                   help="resize the shorter side to S and centre-crop to SxS (default: keep)")
    p.add_argument("--shards", type=int, default=16, metavar="N", help="number of shards (default 16)")
    p.add_argument("--no-labels", action="store_true",
                   help="test split: no `class` feature (folder: every image under SRC)")
    p.add_argument("--quality", type=int, default=95, metavar="Q",
                   help="JPEG quality for re-encoded images (default 95)")
    p.add_argument("--prefix", default="", metavar="P", help="shard file name prefix")
    p.add_argument("--shuffle", action="store_true",
                   help="shuffle the records across shards (seeded by --seed)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.set_defaults(func=_make_tfrecords)


def _make_tfrecords(args: argparse.Namespace) -> int:
    import numpy as np

    from torch2flax.errors import ConfigError, DataError, MissingFileError, UserError
    from torch2flax.loaders.writer import Source, csv_examples, image_folder_examples, write_tfrecords

    labels = not args.no_labels
    is_csv = args.csv or os.path.isfile(args.src)
    try:
        if not os.path.exists(args.src):
            raise MissingFileError(f"{args.src}: no such file or folder")
        if is_csv:
            if os.path.isdir(args.src):
                raise ConfigError(f"{args.src}: --csv given but SRC is a folder")
            source, classes = csv_examples(args.src, labels=labels, quality=args.quality)
            skipped: list[str] = []
        else:
            source, classes, skipped = image_folder_examples(args.src, labels=labels,
                                                             quality=args.quality)
        if args.shuffle:
            order = np.random.default_rng(args.seed).permutation(len(source))
            source = Source([source.paths[i] for i in order],
                            None if source.labels is None else [source.labels[i] for i in order],
                            [source.ids[i] for i in order], args.quality)
        files = write_tfrecords(source, args.out, num_shards=args.shards, prefix=args.prefix,
                                image_size=args.size, quality=args.quality)
    except UserError:
        raise
    except FileNotFoundError as e:  # a path the OS could not find (an image a CSV names, say)
        raise MissingFileError(str(e)) from e
    except OSError as e:  # an unreadable or unwritable path (permissions, a full disk): a user's error
        raise DataError(str(e)) from e
    if skipped:
        print(f"skipped {len(skipped)} non-image file(s), e.g. {skipped[0]}")
    if source.reencoded:
        print(f"re-encoded {source.reencoded} non-JPEG image(s) to JPEG (quality {args.quality})")
    if classes:
        path = os.path.join(args.out, "classes.json")
        with open(path, "w") as f:
            json.dump(classes, f, indent=1)
        print(f"wrote {len(classes)} class names to {path}")
    print(f"wrote {len(source)} records in {len(files)} shards to {args.out}")
    return 0
