"""Convert a segmentation dataset folder into csl-ray's Parquet shards, or verify a converted dataset root.

    python jobs/prepare_data.py voc --root VOCdevkit/VOC2012 --out data/voc_1464 \\
        --labeled splits/pascal/1464/labeled.txt --unlabeled splits/pascal/1464/unlabeled.txt
    python jobs/prepare_data.py cityscapes --root cityscapes --out data/city --labeled splits/city/1_16/labeled.txt
    python jobs/prepare_data.py coco --root coco --out data/coco --labeled splits/coco/1_512/labeled.txt
    python jobs/prepare_data.py folder --root my_data --out data/mine --labeled lab.txt --val val.txt
    python jobs/prepare_data.py --verify data/voc_1464

Layouts:
  voc         JPEGImages/*.jpg, SegmentationClass/*.png (palette PNGs; the palette index is the class id),
              optional SegmentationClassAug/*.png (SBD); default val: ImageSets/Segmentation/val.txt.
  cityscapes  leftImg8bit/{train,val}/CITY/*_leftImg8bit.png with gtFine/.../*_gtFine_labelTrainIds.png, or
              *_gtFine_labelIds.png mapped to the 19 train ids; default val: leftImg8bit/val.
  coco        UniMatch's layout: train2017/, val2017/ and masks/{train2017,val2017}/*.png (81 classes);
              default val: val2017.
  folder      images/*, masks/<image stem>.png (uint8 class ids, 255 = ignore), classes.txt (a name a line).

Split lists are UniMatch-style: a line `IMAGE MASK` (paths relative to --root) or a bare id. Without --unlabeled
the unlabelled split is the layout's training images that are neither labelled nor in val. The output is written
to a temp folder and renamed into place only if every image and mask is valid; re-running with unchanged inputs
does nothing. Exit status 0 on success, 1 on any error (each error names its file).
"""

from __future__ import annotations

import argparse
import sys

from csl_ray.data.convert import ConversionError, convert, format_summary
from csl_ray.data.layouts import LAYOUTS
from csl_ray.data.shards import ShardError, verify


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("layout", nargs="?", choices=LAYOUTS, help="source folder layout (omit with --verify)")
    parser.add_argument("--root", help="source dataset folder")
    parser.add_argument("--out", help="dataset root to write (manifest.json + labeled/ unlabeled/ val/ shards)")
    parser.add_argument("--labeled", help="split list of the labelled images (required)")
    parser.add_argument("--unlabeled", help="split list of the unlabelled images (default: the rest of the pool)")
    parser.add_argument("--val", help="split list of the validation images (default: the layout's val split)")
    parser.add_argument("--name", help="dataset name stored in the manifest (default: the layout)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different dataset already at --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    parser.add_argument("--verify", metavar="ROOT", help="re-check ROOT's files against its manifest checksums")
    args = parser.parse_args(argv)
    if args.verify is None and (args.layout is None or args.root is None or args.out is None):
        parser.error("give a layout with --root and --out, or --verify ROOT")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.verify is not None:
            report = verify(args.verify)
            print(f"{args.verify}: ok ({report['files']} files, {report['bytes']:,} bytes, rows {report['splits']})")
        else:
            summary = convert(
                args.layout, args.root, args.out, labeled=args.labeled, unlabeled=args.unlabeled, val=args.val,
                name=args.name, workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress,
            )  # fmt: skip
            print(format_summary(summary))
    except (ConversionError, ShardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
