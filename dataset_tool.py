"""Check, convert and split a skin dataset folder.

    python dataset_tool.py validate datasets/skins                # every row checked, problems listed by file:line
    python dataset_tool.py convert datasets/skins out/skins_if --to imagefolder
    python dataset_tool.py split datasets/skins --val_fraction 0.1 --seed 0

`validate` decodes every image and exits with status 1 when a row is bad (every problem listed at once);
status 2 when the dataset cannot be read at all or has no rows. `convert` writes a new folder and never touches the source.
`split` rewrites train.jsonl + validation.jsonl in place (or in a copy with --out); a row's split depends only on
its image path and the seed, so adding rows later does not move existing ones.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from skingen.config import parse_args_with_config
from skingen.data.dataset import existing_splits, find_dataset_files
from skingen.data.ops import LINK_MODES, convert_dataset, split_dataset, validate_dataset
from skingen.errors import run_cli

LISTED_BAD_ROWS = 20
LISTED_SIZES = 8


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="check every row and print a report")
    validate.add_argument("dataset_dir")
    validate.add_argument("--image_column", default=None, help="row key of the target image path")
    validate.add_argument("--conditioning_image_column", default=None, help="row key of the conditioning image path")
    validate.add_argument("--caption_column", default=None, help="row key of the caption")

    convert = commands.add_parser("convert", help="write the dataset to a new folder in another form")
    convert.add_argument("dataset_dir")
    convert.add_argument("out_dir")
    convert.add_argument("--to", required=True, choices=["jsonl", "imagefolder"])
    convert.add_argument("--link", default="copy", choices=LINK_MODES, help="how image files get into the new folder")
    convert.add_argument("--on_bad_sample", default="error", choices=["error", "skip"])

    split = commands.add_parser("split", help="hash-based train/validation split of a train.jsonl dataset")
    split.add_argument("dataset_dir")
    split.add_argument("--val_fraction", type=float, default=0.1)
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--out", default=None, help="split a copy in this new folder instead of in place")
    return parse_args_with_config(parser, argv)


def print_report(report: dict) -> None:
    print(f"{report['file']} ({report['form']} form, {report['split']} split)")
    print(f"  rows: {report['rows']}   ok: {report['ok']}   bad: {len(report['bad'])}")
    if report["problem_counts"]:
        print("  problems: " + ", ".join(f"{kind} x{count}" for kind, count in report["problem_counts"].items()))
    for bad in report["bad"][:LISTED_BAD_ROWS]:
        for problem in bad["problems"]:
            print(f"    {bad['where']}: {problem}")
    if len(report["bad"]) > LISTED_BAD_ROWS:
        print(f"    ... and {len(report['bad']) - LISTED_BAD_ROWS} more")
    print(f"  rows with text boxes: {report['rows_with_boxes']} ({report['boxes']} boxes)")
    for label, key in (("image sizes", "image_sizes"), ("conditioning sizes", "conditioning_image_sizes")):
        sizes = list(report[key].items())
        shown = ", ".join(f"{size} x{count}" for size, count in sizes[:LISTED_SIZES])
        print(f"  {label}: {shown or '-'}" + (f", ... ({len(sizes)} sizes)" if len(sizes) > LISTED_SIZES else ""))
    if report["size_mismatches"]:
        print(f"  note: {report['size_mismatches']} row(s) whose conditioning image size differs from the image's")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "validate":
        columns = {
            "image_column": args.image_column,
            "conditioning_image_column": args.conditioning_image_column,
            "caption_column": args.caption_column,
        }
        splits = existing_splits(args.dataset_dir) or [find_dataset_files(args.dataset_dir).split]
        reports = [validate_dataset(args.dataset_dir, split=split, **columns) for split in splits]
        for report in reports:
            print_report(report)
        return 1 if any(report["bad"] for report in reports) else 0
    if args.command == "convert":
        summary = convert_dataset(
            args.dataset_dir, args.out_dir, to=args.to, link=args.link, on_bad_sample=args.on_bad_sample
        )
        counts = ", ".join(
            f"{split}: {info['rows']} rows ({info['skipped']} skipped)" for split, info in summary["splits"].items()
        )
        print(f"wrote {summary['dataset']} in {summary['form']} form; {counts}")
        return 0
    summary = split_dataset(args.dataset_dir, val_fraction=args.val_fraction, seed=args.seed, dst=args.out)
    print(
        f"{summary['dataset']}: train.jsonl {summary['train']} rows, validation.jsonl {summary['validation']} rows "
        f"(val_fraction {summary['val_fraction']}, seed {summary['seed']})"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
