"""Filling the text-embedding and latent caches before training, shared over the processes (each encodes its
share; the main process decides what is missing)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..backbones.base import Backbone
from ..data.caches import LatentCache, TextEmbeddingCache, fill_sharded, image_signature, model_fingerprint
from ..data.training_rows import TrainingRows
from ..errors import SkingenError
from .batches import latent_cache_tag

logger = logging.getLogger(__name__)


def main_process_value(accelerator, compute: Callable[[], Any]) -> Any:
    """``compute()`` on the main process, the same value on every process."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([compute() if accelerator.is_main_process else None])[0]


def cache_text_embeddings(args, accelerator, backbone: Backbone, captions: set[str], dtype, cache_root: Path):
    encoders = backbone.text_encoders
    cache = TextEmbeddingCache(cache_root, model_fingerprint(
        args.pretrained_model_name_or_path,
        {name: encoder for name, encoder in zip(backbone.text_subfolders[len(encoders):], encoders)},
        dtype=dtype, revision=args.revision, variant=args.variant, subfolders=backbone.text_subfolders,
        settings=backbone.text_settings(),
    ))
    missing = main_process_value(accelerator, lambda: cache.missing(captions))
    if missing:
        for encoder in encoders:
            place_model(encoder, accelerator.device, dtype)
        fill_sharded(accelerator, missing, lambda shard: cache.compute(
            shard, backbone.encode_prompts, progress=accelerator.is_local_main_process))
        if cache.missing(captions):
            raise SkingenError(f"{cache.folder}: some text embeddings were not written; is the folder shared by all processes?")
    return cache, {"text_embeddings_computed": len(missing), "text_embeddings_reused": len(captions) - len(missing)}


def report_truncated_captions(backbone: Backbone, captions: Sequence[str], accelerator) -> None:
    """One warning line (and a log entry) when captions are longer than a text encoder reads."""
    if not accelerator.is_main_process:
        return
    counts = {name: count for name, count in backbone.count_truncated(captions).items() if count}
    if counts:
        logger.warning(f"{max(counts.values())} of {len(captions)} distinct captions are longer than the text "
                       "encoders read and are cut: " + ", ".join(f"{n} over {name}" for name, n in counts.items())
                       + " (shorten them, e.g. caption.py --max_writing_texts)")


def cache_latents(args, accelerator, rows: TrainingRows, backbone, dtype, cache_root: Path, sizes: Sequence,
                  load_pixels):
    vae = backbone.vae

    separate_vae = args.pretrained_vae_model_name_or_path is not None
    cache = LatentCache(cache_root, model_fingerprint(
        args.pretrained_vae_model_name_or_path or args.pretrained_model_name_or_path, {"vae": vae}, dtype=dtype,
        revision=args.revision, variant=None if separate_vae else args.variant,
        subfolders=() if separate_vae else ("vae",),
    ), latent_cache_tag(args))
    row_ids = [row.row_id for row in rows]
    keys = [LatentCache.key(row_id, image_signature(ref)) for row_id, ref in zip(row_ids, rows.image_refs())]
    missing = main_process_value(accelerator, lambda: [i for i, key in enumerate(keys) if not cache.is_cached(key)])
    if missing:
        place_model(vae, accelerator.device, dtype)
        for size in sorted(set(sizes)):  # the VAE encodes one training size at a time (aspect-ratio buckets)
            fill_sharded(accelerator, [i for i in missing if sizes[i] == size], lambda shard: cache.compute(
                [(keys[i], row_ids[i], i) for i in shard], load_pixels, backbone.latent_space.encode_parameters,
                batch_size=args.train_batch_size, progress=accelerator.is_local_main_process))
        if any(not cache.is_cached(key) for key in keys):
            raise SkingenError(f"{cache.folder}: some latents were not written; is the folder shared by all processes?")
    return cache, keys, {"latents_computed": len(missing), "latents_reused": len(keys) - len(missing)}


def place_model(model, device, dtype: torch.dtype | None = None):
    """Move a model, casting only when the dtype changes (diffusers warns on every cast, even a no-op one)."""
    model.to(device)
    if dtype is not None and model.dtype != dtype:
        model.to(dtype=dtype)
    return model
