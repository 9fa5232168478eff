"""Disk caches of training inputs that frozen models compute: text embeddings and VAE latent distributions.

Both are computed once, stored as safetensors and reused by later runs. A cache folder is keyed by the
identity of the model that made it (source, configs, weight-file stats, dtype), so a different base model or
VAE never reads stale entries. Entries are written atomically, one file each, so several processes can fill
a cache at the same time without races: each rank computes its own shard, then all meet at a barrier.

- Text embeddings are stored per distinct caption string (the empty prompt included), so prompt dropout
  and caption choice stay per-step decisions instead of being frozen at cache time.
- Latents are stored as the VAE's distribution parameters (mean and log-variance), not as a sample, so
  every step still draws a fresh latent sample exactly as encoding the image again would.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from ..errors import SkingenError
from ..fileio import atomic_write_bytes


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _config_dict(model) -> dict:
    config = model.config
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # Paths and library versions say nothing about what the model computes.
    return {k: v for k, v in data.items() if not k.startswith("_") and k != "transformers_version"}


def model_fingerprint(
    source: str | os.PathLike,
    parts: dict[str, object],
    *,
    dtype: torch.dtype,
    revision: str | None = None,
    variant: str | None = None,
    subfolders: Sequence[str] = (),
    settings: dict | None = None,
) -> str:
    """A short hash of what makes a frozen model's outputs what they are.

    ``parts`` maps a name to a loaded model (its config is hashed). For a local folder, the size and
    modification time of every file in ``subfolders`` (weights, tokenizer files) are included, so rebuilding
    a model in place (same config, new weights) starts a new cache instead of reusing the old one. ``settings``
    are other values the outputs depend on (e.g. the T5 sequence length).
    """
    folder = Path(source).expanduser()
    identity: dict[str, object] = {
        "source": str(folder.resolve()) if folder.exists() else str(source),
        "revision": revision,
        "variant": variant,
        "dtype": str(dtype),
        "configs": {name: _config_dict(model) for name, model in parts.items()},
    }
    if settings:
        identity["settings"] = settings
    if folder.is_dir():
        files = {}
        for sub in subfolders or ("",):
            for path in sorted((folder / sub).glob("*")):
                if path.is_file():
                    stat = path.stat()
                    files[str(path.relative_to(folder))] = [stat.st_size, stat.st_mtime_ns]
        identity["files"] = files
    return _sha256(json.dumps(identity, sort_keys=True, default=str))[:16]


def _write_entry(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    data = safetensors_bytes({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def fill_sharded(accelerator, missing: Sequence, compute: Callable[[Sequence], None]) -> None:
    """Each process computes its share of ``missing`` (every num_processes-th item), then all wait for the rest."""
    shard = list(missing[accelerator.process_index :: accelerator.num_processes])
    if shard:
        compute(shard)
    accelerator.wait_for_everyone()


class _LRU(OrderedDict):
    """The most recently used entries: captions repeat every epoch, and thousands of them would not fit in memory."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def remember(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class TextEmbeddingCache:
    """A backbone's prompt embeddings per caption string: ``<root>/text/<fingerprint>/<sha[:2]>/<sha>.safetensors``.

    An entry holds whatever tensors the backbone's ``encode_prompts`` returns for the caption (SDXL:
    ``prompt_embeds`` and ``pooled_prompt_embeds``; SD3 and FLUX the same names with their own shapes).
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str, memory_entries: int = 256):
        self.folder = Path(root) / "text" / fingerprint
        self._memory = _LRU(memory_entries)

    def path(self, caption: str) -> Path:
        digest = _sha256(caption)
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def missing(self, captions: Iterable[str]) -> list[str]:
        return sorted({c for c in captions if not self.path(c).is_file()})

    def compute(self, captions: Sequence[str], encode: Callable[[list[str]], dict[str, torch.Tensor]], *,
                batch_size: int = 16, progress: bool = True):
        """Encode ``captions`` with ``encode`` (a batch of captions -> tensors with the caption as first dimension)
        and store one entry each (existing entries are overwritten with equal values)."""
        bar = tqdm(total=len(captions), desc="Caching text embeddings", disable=not progress)
        for start in range(0, len(captions), batch_size):
            chunk = list(captions[start : start + batch_size])
            encoded = encode(chunk)
            for i, caption in enumerate(chunk):
                _write_entry(self.path(caption), {name: value[i] for name, value in encoded.items()}, {"caption": caption})
            bar.update(len(chunk))
        bar.close()

    def load(self, caption: str) -> dict[str, torch.Tensor]:
        """The stored tensors of one caption (e.g. ``prompt_embeds`` (77, D) and ``pooled_prompt_embeds`` (P,))."""
        if caption in self._memory:
            return self._memory[caption]
        path = self.path(caption)
        try:
            entry = load_file(path)
        except FileNotFoundError:
            raise SkingenError(
                f"{path}: text-embedding cache entry for caption {caption!r} is missing; "
                "the cache folder was changed during training. Rerun to rebuild it."
            ) from None
        return self._memory.remember(caption, entry)


def image_signature(image_ref: dict) -> str:
    """What identifies an image's content: the bytes' hash when the dataset holds bytes, else file size + mtime."""
    data = image_ref.get("bytes")
    if data:
        return "sha256:" + hashlib.sha256(data).hexdigest()[:32]
    path = image_ref.get("path")
    if path and Path(path).is_file():
        stat = Path(path).stat()
        return f"stat:{stat.st_size}:{stat.st_mtime_ns}"
    raise SkingenError(f"{path or '<image>'}: image file not found while building the latent cache")


class LatentCache:
    """VAE latent distributions per training image at one resolution.

    ``<root>/latents/<vae fingerprint>-<resolution>/<sha[:2]>/<sha>.safetensors``, where ``sha`` hashes the
    row id and the image signature, so an edited image gets a new entry. Each entry holds ``latent_dist``
    (2*C, h, w: mean and log-variance) and, as metadata, the original image size and the crop offsets.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str, resolution: int):
        self.folder = Path(root) / "latents" / f"{fingerprint}-{resolution}"

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    @staticmethod
    def key(row_id: str, signature: str) -> str:
        return _sha256(f"{row_id}\0{signature}")

    def is_cached(self, key: str) -> bool:
        return self.path(key).is_file()

    @torch.no_grad()
    def compute(
        self,
        jobs: Sequence[tuple[str, str, int]],
        load_pixels: Callable[[int], tuple[torch.Tensor, tuple[int, int], tuple[int, int]]],
        encode: Callable[[torch.Tensor], torch.Tensor],
        *,
        batch_size: int = 8,
        progress: bool = True,
    ) -> None:
        """Encode and store each job ``(key, row_id, index)``; ``load_pixels(index)`` gives
        ``(pixel_values in [-1, 1], original (h, w), crop (top, left))``, ``encode(pixels)`` the latent
        distribution's parameters (the backbone's ``latent_space.encode_parameters``)."""
        # Closed also when an image fails to decode, so the error is printed on a line of its own.
        with tqdm(total=len(jobs), desc="Caching VAE latents", disable=not progress) as bar:
            for start in range(0, len(jobs), batch_size):
                chunk = list(jobs[start : start + batch_size])
                loaded = [load_pixels(index) for _, _, index in chunk]
                params = encode(torch.stack([p for p, _, _ in loaded]))
                for (key, row_id, _), (_, original, crop), latent_dist in zip(chunk, loaded, params):
                    _write_entry(
                        self.path(key),
                        {"latent_dist": latent_dist},
                        {"row_id": row_id, "original_size": json.dumps(list(original)),
                         "crop_top_left": json.dumps(list(crop))},
                    )
                bar.update(len(chunk))

    def load(self, key: str) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            raise SkingenError(
                f"{path}: latent cache entry is missing; the cache folder was changed during training. Rerun to rebuild it."
            )
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            latent_dist = f.get_tensor("latent_dist")
        return latent_dist, tuple(json.loads(meta["original_size"])), tuple(json.loads(meta["crop_top_left"]))

