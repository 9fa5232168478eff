"""Caption every row of a dataset folder's train.jsonl (fills ``text``; every other field is kept).

    python caption.py --dataset_dir datasets/keyboard_332_512 --model /models/blip-image-captioning-large
    python caption.py --dataset_dir datasets/keyboard_332_512 --captioner template   # no weights needed

A caption is the captioner's description (BLIP continues ``--prompt``), then ``--trigger_word``, then
``writing "..."`` with the row's ``texts``. Rows that already have a caption are kept unless
``--overwrite``; each finished batch is kept as a part file under ``.parts/`` and merged into train.jsonl at
the end (and on Ctrl-C), so an interrupted run resumes where it stopped (temp files a killed run left are
removed first). Launched on several processes (``accelerate launch``, ``torchrun``, ``srun``; docs/cluster.md),
each captions its share of the rows on its own device and train.jsonl comes out the same.
"""

from __future__ import annotations

import argparse
import sys

from skingen import sharding
from skingen.config import parse_args_with_config
from skingen.data.dataset import read_checked_rows, write_rows
from skingen.data.rows import CAPTION
from skingen.errors import SkingenError, run_cli
from skingen.fileio import remove_stale_temp_files
from skingen.prep.captioning import (
    CAPTIONERS,
    DEFAULT_BLIP_MODEL,
    DEFAULT_PROMPT,
    DTYPES,
    TRIGGER_WORD,
    build_captioner,
    caption_rows,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True, help="dataset folder holding train.jsonl")
    parser.add_argument(
        "--captioner", choices=CAPTIONERS, default="blip", help="blip (model weights) or template (no weights)"
    )
    parser.add_argument(
        "--model", default=DEFAULT_BLIP_MODEL, help="BLIP: a local folder, or a hub id when there is internet"
    )
    parser.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        help="text every caption starts with (BLIP's conditional prefix); '' for none",
    )
    parser.add_argument("--trigger_word", default=TRIGGER_WORD, help="appended to every caption; '' to leave it out")
    parser.add_argument(
        "--max_writing_texts",
        type=int,
        default=8,
        help='at most this many texts in writing "...", largest boxes first (SDXL reads 77 tokens); 0 = all',
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="BLIP weights dtype; auto = float16 on cuda, float32 on cpu"
    )
    parser.add_argument(
        "--max_new_tokens", type=int, default=30, help="BLIP: longest continuation of the prompt, in tokens"
    )
    parser.add_argument("--num_beams", type=int, default=1, help="BLIP: beam search width (1 = greedy)")
    parser.add_argument("--overwrite", action="store_true", help="recaption rows that already have a caption")
    parser.add_argument("--save_every", type=int, default=None,
                        help="accepted for older command lines and configs: every finished batch is now kept "
                             "(--batch_size sets how much a kill can redo)")
    sharding.add_shard_arguments(parser)
    args = parse_args_with_config(parser, argv)
    if args.max_new_tokens < 1 or args.num_beams < 1:
        raise SkingenError("--max_new_tokens and --num_beams must be >= 1")
    sharding.check_shard_arguments(args)
    if args.overwrite and args.num_shards > 1:
        raise SkingenError("--overwrite with --num_shards: run the --overwrite pass without --num_shards")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = read_checked_rows(args.dataset_dir, CAPTION)
    settings = {name: getattr(args, name) for name in ("captioner", "model", "prompt", "dtype", "max_new_tokens", "num_beams")}
    group = sharding.process_group()
    if args.num_shards == 1:  # job-array tasks run side by side: leave another task's temp files alone
        group.on_main(lambda: remove_stale_temp_files(args.dataset_dir))
    launched_device = group.device if group.size > 1 else None  # each process its own GPU
    captioner = build_captioner(
        args.captioner,
        model_name_or_path=args.model,
        prompt=args.prompt,
        device=args.device or (launched_device and str(launched_device)),
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
    )
    stats = caption_rows(
        rows,
        args.dataset_dir,
        captioner,
        save=lambda updated: write_rows(args.dataset_dir, [row.raw for row in updated]),
        trigger_word=args.trigger_word,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        max_writing_texts=args.max_writing_texts,
        captioner_settings=settings,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
    )
    if not group.is_main or args.num_shards > 1:
        return 0
    print(f"{args.dataset_dir}: captioned {stats.captioned} of {stats.total} rows, kept {stats.kept} existing captions")
    for row in rows[:3]:
        print(f"  {row.image.rel}: {row.raw.get('text', '')}")
    if stats.rows_with_texts_cut:
        print(
            f"warning: {stats.rows_with_texts_cut} caption(s) name only their {args.max_writing_texts} largest texts "
            f"(--max_writing_texts); {stats.texts_left_out} text(s) left out of writing \"...\" (kept in 'texts')",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    run_cli(main)
