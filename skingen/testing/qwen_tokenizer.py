"""A small local Qwen tokenizer (``Qwen2Tokenizer``) for the tiny Z-Image and Qwen-Image pipelines; nothing is
downloaded.

Both pipelines call the real Qwen tokenizers in ways a tiny one must reproduce: Z-Image's applies the chat template
(``apply_chat_template(..., add_generation_prompt=True, enable_thinking=True)``), Qwen-Image's wraps the prompt in
its own ``<|im_start|>system ...`` template and drops the first 34 tokens (``prompt_template_encode_start_idx``),
which is exactly the template's prefix under the real Qwen2 tokenizer. So this tokenizer is byte-level BPE (every
string, CJK included, tokenizes, as with the real one), carries Qwen's special tokens (``<|endoftext|>`` pads,
``<|im_end|>`` ends) and a chat template with Qwen3's output for user turns, and has merges that make each word
of the two templates one token, so Qwen-Image's prefix is 34 tokens here too.
"""

from __future__ import annotations

import re

from .tiny_sdxl import _byte_level_symbols

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
MODEL_MAX_LENGTH = 131072  # Qwen2.5-VL's / Qwen3's tokenizer_config

# Qwen3's chat template, reduced to what a text-to-image prompt uses: plain-text turns and the generation prompt,
# with the empty thinking block that enable_thinking=False adds.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# The words of Qwen-Image's prompt template and of the chat turns, which the real tokenizer keeps whole.
TEMPLATE_TEXT = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:\nuser\nassistant\n"
)


def _template_words() -> list[str]:
    """Byte-level forms of the template's words (a leading space becomes ``Ġ``), longest pieces merged last."""
    symbols = _byte_level_symbols()
    words = []
    for word in re.findall(r" ?[A-Za-z]+", TEMPLATE_TEXT):
        encoded = "".join(symbols[b] for b in word.encode("utf-8"))
        if encoded not in words:
            words.append(encoded)
    return words


def build_qwen_tokenizer():
    """The tokenizer: 256 byte symbols, the template words and their prefixes (built by left-to-right merges),
    then the special tokens; padding on the right, as the pipelines' masks expect."""
    from transformers import Qwen2Tokenizer

    symbols = _byte_level_symbols()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    merges = []
    for word in _template_words():
        for end in range(2, len(word) + 1):
            merged = word[:end]
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((word[: end - 1], word[end - 1]))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", errors="replace", model_max_length=MODEL_MAX_LENGTH)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.padding_side = "right"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
