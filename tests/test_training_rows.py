"""The rows training reads (skingen.data.training_rows): one scan for every conditioning column, sizes from the
checked rows, the hub adapter, and training samples that are exactly the rows' images placed at training size."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps
from repo_scripts import tiny_training_argv

import datasets
from skingen.backbones import backbone_class
from skingen.data.caches import TextEmbeddingCache
from skingen.data.dataset import normalized_rows
from skingen.data.images import header_size
from skingen.data.training_rows import TrainingRows
from skingen.errors import SkingenError
from skingen.train.batches import TrainingSamples, load_training_rows, row_placements
from skingen.train.buckets import bucket_placement, bucket_sizes, nearest_bucket
from skingen.train.loop import build_arg_parser, parse_training_args

COLUMNS = ("conditioning_image", "conditioning_image_canny")


def _png_rotated_after_its_pixels(path: Path, size: tuple[int, int], colour) -> None:
    """A PNG whose EXIF orientation 6 (shown turned 90 degrees) is an eXIf chunk after the pixel data."""
    image = Image.new("RGB", size, colour)
    ImageDraw.Draw(image).rectangle((0, 0, size[0] // 3, size[1] // 2), fill=(250, 250, 250))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    data = buffer.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6
    payload = exif.tobytes().removeprefix(b"Exif\x00\x00")
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + payload) & 0xFFFFFFFF)
    end = data.rindex(b"IEND") - 4
    path.write_bytes(data[:end] + chunk + data[end:])


def _jpeg_rotated(path: Path, size: tuple[int, int], colour) -> None:
    image = Image.new("RGB", size, colour)
    ImageDraw.Draw(image).rectangle((0, 0, size[0] // 2, size[1] // 3), fill=(10, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes(), quality=95)


def _two_column_dataset(root: Path) -> Path:
    """5 rows of several aspect ratios and forms (an EXIF-rotated JPEG, a PNG rotated by a late eXIf chunk), two
    conditioning columns, a text box each."""
    for folder in ("images", "conditioning_images", "canny"):
        (root / folder).mkdir(parents=True)
    rows = []
    for i, (width, height) in enumerate([(96, 48), (48, 96), (64, 64), (80, 40), (40, 72)]):
        colour = (30 * i, 140, 220 - 35 * i)
        if i == 3:
            _jpeg_rotated(root / "images" / f"{i}.jpg", (width, height), colour)
            image_path, (width, height) = f"images/{i}.jpg", (height, width)
        elif i == 4:
            _png_rotated_after_its_pixels(root / "images" / f"{i}.png", (width, height), colour)
            image_path, (width, height) = f"images/{i}.png", (height, width)
        else:
            image = Image.new("RGB", (width, height), colour)
            ImageDraw.Draw(image).ellipse((2, 3, width // 2, height // 2), fill=(255, 255, 255))
            image.save(root / "images" / f"{i}.png")
            image_path = f"images/{i}.png"
        box = (width // 5, height // 4, width // 2 + 1, height // 2 + 3)
        for folder, fill in (("conditioning_images", None), ("canny", (255, 255, 255))):
            control = Image.new("RGB", (width, height), (i, 2 * i, 3 * i))
            ImageDraw.Draw(control).rectangle(box, outline=(255, 255, 255), fill=fill)
            control.save(root / folder / f"{i}.png")
        x0, y0, x1, y1 = box
        rows.append({"text": f"a keyboard skin {i}", "image": image_path,
                     "conditioning_image": f"conditioning_images/{i}.png", "conditioning_image_canny": f"canny/{i}.png",
                     "box": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1]]], "texts": [f"key{i}"]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def _args(tiny_sdxl_dir, dataset, tmp_path, *extra):
    return parse_training_args(build_arg_parser(), tiny_training_argv(
        tiny_sdxl_dir, dataset, tmp_path / "out", "--resolution", 32, "--enable_bucket", "--min_bucket_reso", 16,
        "--max_bucket_reso", 64, "--bucket_reso_steps", 8, "--conditioning_image_column", *COLUMNS, *extra))


def _shown(path: Path) -> Image.Image:
    """The image as a viewer shows it, decoded here independently of the loader."""
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")


def _placed(image: Image.Image, placement) -> np.ndarray:
    (resized_h, resized_w), (top, left), (height, width) = placement.resized, placement.crop, placement.target
    resized = image.resize((resized_w, resized_h), Image.BILINEAR) if image.size != (resized_w, resized_h) else image
    return np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32) / 255.0


@pytest.mark.usefixtures("one_torch_thread")
def test_two_column_samples_are_each_rows_images_placed_in_its_bucket_with_its_boxes(tiny_sdxl_dir, tmp_path):
    root = _two_column_dataset(tmp_path / "ds")
    args = _args(tiny_sdxl_dir, root, tmp_path)
    rows = load_training_rows(args)
    placements = row_placements(args, rows)
    raw = [json.loads(line) for line in (root / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row.row_id for row in rows] == [r["image"] for r in raw]
    assert [row.where for row in rows] == [f"{root / 'train.jsonl'}:{n}" for n in range(1, 6)]
    assert [ref["path"] for ref in rows.image_refs()] == [str(root / r["image"]) for r in raw]  # latent cache keys

    captions = [r["text"] for r in raw]
    text_cache = TextEmbeddingCache(tmp_path / "cache", "test")
    text_cache.compute(captions, lambda chunk: {"prompt_embeds": torch.arange(len(chunk) * 6.0).reshape(-1, 2, 3)})
    backbone = backbone_class("sdxl")(args)
    samples = TrainingSamples(rows, resolution=32, text_cache=text_cache, latent_cache=None, latent_keys=None,
                              latent_shape=(4, 4, 4), backbone=backbone, proportion_empty_prompts=0.0,
                              load_pixel_values=True, placements=placements, bucketed=True, resample=Image.BILINEAR)
    buckets = bucket_sizes(32, 16, 64, 8)
    for index, record in enumerate(raw):
        image = _shown(root / record["image"])
        width, height = image.size
        placement = bucket_placement(width, height, nearest_bucket(width, height, buckets))
        assert placements[index] == placement
        sample = samples.sample(index, seed=1000 + index)
        expected_pixels = torch.from_numpy(_placed(image, placement)).permute(2, 0, 1) * 2.0 - 1.0
        assert torch.equal(sample["pixel_values"], expected_pixels)
        controls = [torch.from_numpy(_placed(_shown(root / record[c]), placement)).permute(2, 0, 1) for c in COLUMNS]
        assert torch.equal(sample["conditioning_pixel_values"], torch.cat(controls))
        assert sample["conditioning_pixel_values"].shape[0] == 6 and not torch.equal(controls[0], controls[1])
        (height_r, width_r), (top, left) = placement.resized, placement.crop
        quad = torch.tensor(record["box"], dtype=torch.float32)
        quad[..., 0] = quad[..., 0] * (width_r / width) - left
        quad[..., 1] = quad[..., 1] * (height_r / height) - top
        assert torch.equal(sample["boxes"], quad) and sample["texts"] == record["texts"]
        assert sample["time_ids"].tolist() == [height, width, top, left, *placement.target]
        assert sample["captions"] == record["text"] and sample["row_ids"] == record["image"]
        generator = torch.Generator().manual_seed(1000 + index)
        torch.rand((), generator=generator)
        assert torch.equal(sample["timesteps"], backbone.draw_timestep(generator))
        assert torch.equal(sample["noise"], torch.randn((4, *(s // 8 for s in placement.target)), generator=generator))


def test_a_png_turned_by_exif_after_its_pixels_is_checked_at_its_displayed_size(tmp_path):
    _png_rotated_after_its_pixels(tmp_path / "late.png", (40, 20), (1, 2, 3))
    assert header_size(lambda: tmp_path / "late.png") == _shown(tmp_path / "late.png").size == (20, 40)


def test_one_scan_checks_every_conditioning_column(tiny_sdxl_dir, tmp_path, capsys):
    root = _two_column_dataset(tmp_path / "ds")
    lines = (root / "train.jsonl").read_text(encoding="utf-8").splitlines()
    second = json.loads(lines[1])
    del second["conditioning_image_canny"]
    lines[1] = json.dumps(second)
    (root / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SkingenError) as err:
        load_training_rows(_args(tiny_sdxl_dir, root, tmp_path))
    assert f"{root / 'train.jsonl'}: 1 bad row(s) of 5 (1 missing key)" in str(err.value)
    assert f"{root / 'train.jsonl'}:2: missing 'conditioning_image_canny'" in str(err.value)

    # skip: the row is listed once, and --max_train_samples counts the rows usable in every column
    rows = load_training_rows(_args(tiny_sdxl_dir, root, tmp_path, "--on_bad_sample", "skip",
                                    "--max_train_samples", 3))
    assert [row.row_id for row in rows] == ["images/0.png", "images/2.png", "images/3.jpg"]
    assert all(len(row.conditioning_images) == 2 for row in rows)
    err_text = capsys.readouterr().err
    assert err_text.count("skipped 1 bad row(s) of 4") == 1 and ":2: missing 'conditioning_image_canny'" in err_text


def test_an_imagefolder_names_every_conditioning_column_with_its_file_name_suffix(tiny_sdxl_dir, tmp_path):
    root = _two_column_dataset(tmp_path / "ds")
    records = [json.loads(line) for line in (root / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    (root / "train.jsonl").unlink()
    (root / "metadata.jsonl").write_text("".join(json.dumps({
        "file_name": r["image"], "conditioning_image_file_name": r["conditioning_image"],
        "conditioning_image_canny_file_name": r["conditioning_image_canny"], "text": r["text"]}) + "\n"
        for r in records), encoding="utf-8")
    rows = load_training_rows(_args(tiny_sdxl_dir, root, tmp_path))
    assert [ref.rel for ref in rows[1].conditioning_images] == ["conditioning_images/1.png", "canny/1.png"]


def _hub_style(root: Path) -> datasets.Dataset:
    """The folder's rows as an in-memory dataset with Image columns holding the files' bytes, as from the hub."""
    records = [json.loads(line) for line in (root / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    columns = {key: [{"bytes": (root / r[key]).read_bytes(), "path": None} for r in records]
               for key in ("image", *COLUMNS)}
    features = datasets.Features({key: datasets.Image() for key in columns} | {"text": datasets.Value("string")})
    return datasets.Dataset.from_dict({**columns, "text": [r["text"] for r in records]}, features=features)


def test_a_hub_dataset_with_two_conditioning_columns_reads_its_images_from_the_dataset(tmp_path):
    root = _two_column_dataset(tmp_path / "ds")
    stored, checked = normalized_rows(_hub_style(root), source="user/skins (train)",
                                      extra_conditioning_columns=("conditioning_image_canny",))
    rows = TrainingRows(checked, stored)
    assert len(rows) == 5 and rows.conditioning_count == 2
    assert all(ref.path["bytes"] is None for row in rows for ref in (row.image, *row.conditioning_images))
    assert [row.row_id for row in rows] == [f"row-{i:08d}" for i in range(5)]
    for index in (1, 3, 4):
        record = json.loads((root / "train.jsonl").read_text(encoding="utf-8").splitlines()[index])
        assert rows.sizes[index] == rows.image(index).size == _shown(root / record["image"]).size
        assert [np.asarray(image).tolist() for image in rows.conditioning_images(index)] == [
            np.asarray(_shown(root / record[column])).tolist() for column in COLUMNS]
    records = [json.loads(line) for line in (root / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    # The latent cache identifies an image by its stored bytes
    assert [ref["bytes"] for ref in rows.image_refs()] == [(root / r["image"]).read_bytes() for r in records]
    assert stored.column_names[:3] == ["image", "conditioning_image", "conditioning_image_1"]
    with pytest.raises(SkingenError, match=r"no column 'edges' \(--conditioning_image_column\)"):
        normalized_rows(_hub_style(root), extra_conditioning_columns=("edges",))


def test_a_conditioning_image_that_no_longer_decodes_names_its_row(tiny_sdxl_dir, tmp_path):
    root = _two_column_dataset(tmp_path / "ds")
    rows = load_training_rows(_args(tiny_sdxl_dir, root, tmp_path))
    data = (root / "canny" / "2.png").read_bytes()
    (root / "canny" / "2.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SkingenError, match=rf"^{root / 'train.jsonl'}:3: canny/2.png: does not decode \(.*"
                                           r"dataset_tool.py validate"):
        rows.conditioning_images(2)
    assert rows.image(2).size == (64, 64)
