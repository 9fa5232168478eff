"""A BLIP captioning model with random weights and a small WordPiece tokenizer, saved like a hub download, so
``caption.py --captioner blip --model DIR`` runs offline (tests: ``tiny``; the multi-process bench: ``small``,
whose per-image cost is closer to a real BLIP's)."""

from __future__ import annotations

from pathlib import Path

WORDS = "a keyboard skin of with the and pink blue cat flower girl hair long on white black".split()

# (hidden size, layers, heads, image size, patch size) of the text decoder and the vision encoder
PRESETS = {"tiny": (32, 2, 2, 32, 8), "small": (384, 6, 6, 224, 16)}


def build_random_blip(out: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    hidden, layers, heads, image_size, patch = PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n",
                                   encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(str(out))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's decoder start token, as in the real tokenizer
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=64, encoder_hidden_size=hidden,
            bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch),
        projection_dim=hidden,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    # Random weights could stop at once ([SEP]) or emit special tokens that decoding drops; forbid them so
    # every caption continues the prompt by exactly max_new_tokens words.
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[tokenizer.all_special_ids] = -1e4
    model.save_pretrained(out)
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}), tokenizer=tokenizer
    ).save_pretrained(out)
    return out
