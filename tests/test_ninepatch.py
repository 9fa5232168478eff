"""9-patch parsing and stretching on hand-made 9-patches with known pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from skingen.errors import SkingenError
from skingen.skins.ninepatch import parse_ninepatch, stretch

BLACK = (0, 0, 0, 255)


def make_ninepatch(content: np.ndarray, stretch_x, stretch_y, pad_x=None, pad_y=None) -> Image.Image:
    """Wrap RGBA ``content`` in a 1-px border with black markers on the given content ranges."""
    h, w = content.shape[:2]
    pixels = np.zeros((h + 2, w + 2, 4), np.uint8)
    pixels[1:-1, 1:-1] = content
    for a, b in stretch_x:
        pixels[0, 1 + a : 1 + b] = BLACK
    for a, b in stretch_y:
        pixels[1 + a : 1 + b, 0] = BLACK
    if pad_x:
        pixels[-1, 1 + pad_x[0] : 1 + pad_x[1]] = BLACK
    if pad_y:
        pixels[1 + pad_y[0] : 1 + pad_y[1], -1] = BLACK
    return Image.fromarray(pixels, "RGBA")


def coded_content(w: int, h: int) -> np.ndarray:
    """Every pixel a distinct opaque colour: red = column, green = row."""
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs * 10, ys * 10, np.full_like(xs, 77), np.full_like(xs, 255)], -1).astype(np.uint8)


def test_corners_stay_pixel_exact_and_only_marked_band_stretches():
    content = coded_content(10, 8)
    ninepatch = parse_ninepatch(make_ninepatch(content, stretch_x=[(4, 5)], stretch_y=[(3, 4)]))
    assert ninepatch.stretch_x == ((4, 5),) and ninepatch.stretch_y == ((3, 4),)
    assert np.array_equal(np.asarray(ninepatch.image), content)

    out = np.asarray(stretch(ninepatch, (25, 17)))
    assert out.shape == (17, 25, 4)
    # Fixed corners: 4 columns left / 5 right of the 1-px band, 3 rows above / 4 below.
    assert np.array_equal(out[:3, :4], content[:3, :4])
    assert np.array_equal(out[:3, -5:], content[:3, -5:])
    assert np.array_equal(out[-4:, :4], content[-4:, :4])
    assert np.array_equal(out[-4:, -5:], content[-4:, -5:])
    # The marked column (4) fills columns 4..19, the marked row (3) fills rows 3..12.
    for col in range(4, 20):
        assert np.array_equal(out[:3, col], content[:3, 4])
    for row in range(3, 13):
        assert np.array_equal(out[row, :4], content[3, :4])


def test_several_stretch_ranges_share_extra_space_in_proportion():
    # Columns 2 (length 1) and 6..9 (length 3) stretch; 8 extra pixels split 2 : 6.
    content = coded_content(12, 4)
    content[:, 6:9] = (200, 0, 0, 255)  # the long band one colour, so its stretched width can be counted
    ninepatch = parse_ninepatch(make_ninepatch(content, stretch_x=[(2, 3), (6, 9)], stretch_y=[(0, 4)]))
    out = np.asarray(stretch(ninepatch, (20, 4)))
    row = out[0]
    assert sum(np.array_equal(px, content[0, 2]) for px in row) == 3
    assert sum(np.array_equal(px, (200, 0, 0, 255)) for px in row) == 9
    # The fixed icon between the bands (columns 3..5) is kept at its size, shifted right by the first band's growth.
    assert np.array_equal(out[:, 5:8], content[:, 3:6])
    assert np.array_equal(out[:, -3:], content[:, -3:])


def test_target_smaller_than_fixed_parts_shrinks_fixed_parts_and_drops_bands():
    content = coded_content(10, 4)
    content[:, 4:6] = (0, 200, 0, 255)  # the band, which must vanish
    ninepatch = parse_ninepatch(make_ninepatch(content, stretch_x=[(4, 6)], stretch_y=[(0, 4)]))
    out = np.asarray(stretch(ninepatch, (4, 4)))
    left = Image.fromarray(content[:, :4]).resize((2, 4), Image.Resampling.LANCZOS)
    right = Image.fromarray(content[:, 6:]).resize((2, 4), Image.Resampling.LANCZOS)
    assert np.array_equal(out[:, :2], np.asarray(left))
    assert np.array_equal(out[:, 2:], np.asarray(right))


def test_padding_is_read_from_right_and_bottom_edges():
    content = coded_content(12, 10)
    ninepatch = parse_ninepatch(
        make_ninepatch(content, stretch_x=[(3, 9)], stretch_y=[(3, 7)], pad_x=(2, 10), pad_y=(1, 8))
    )
    assert ninepatch.padding == (2, 1, 2, 2)
    no_padding = parse_ninepatch(make_ninepatch(content, stretch_x=[(3, 9)], stretch_y=[(3, 7)]))
    assert no_padding.padding is None


def test_plain_image_falls_back_to_a_whole_resize():
    plain = Image.fromarray(coded_content(6, 6), "RGBA")
    assert np.array_equal(np.asarray(stretch(plain, (6, 6))), np.asarray(plain))
    assert np.array_equal(np.asarray(stretch(plain, (12, 9))), np.asarray(plain.resize((12, 9), Image.Resampling.LANCZOS)))


def test_grey_marker_pixel_is_a_clear_error():
    image = make_ninepatch(coded_content(8, 8), stretch_x=[(3, 5)], stretch_y=[(3, 5)])
    image.putpixel((2, 0), (128, 128, 128, 255))
    with pytest.raises(SkingenError) as err:
        parse_ninepatch(image, source="skins/a: 'key.9.png'")
    message = str(err.value)
    assert "skins/a: 'key.9.png'" in message and "top border pixel at (x=2, y=0)" in message
    assert "(128, 128, 128, 255)" in message


def test_missing_stretch_marker_and_broken_padding_line_are_errors():
    content = coded_content(8, 8)
    with pytest.raises(SkingenError, match="no stretch marker on the left border"):
        parse_ninepatch(make_ninepatch(content, stretch_x=[(3, 5)], stretch_y=[]))
    broken = make_ninepatch(content, stretch_x=[(3, 5)], stretch_y=[(3, 5)], pad_x=(1, 3))
    broken.putpixel((6, 9), BLACK)
    with pytest.raises(SkingenError, match="bottom border .* one unbroken line"):
        parse_ninepatch(broken)
    with pytest.raises(SkingenError, match="only 2x2"):
        parse_ninepatch(Image.new("RGBA", (2, 2)))


def test_encode_parse_and_unstretch_invert_stretch():
    from skingen.skins.ninepatch import encode_ninepatch, insets_to_ranges, unstretch

    content = coded_content(10, 8)
    content[:, 4:6] = (90, 90, 90, 255)  # uniform bands, as 9-patch bands are
    content[3:5, :] = (30, 60, 90, 255)
    encoded = encode_ninepatch(Image.fromarray(content, "RGBA"), ((4, 6),), ((3, 5),), (1, 1, 2, 2))
    parsed = parse_ninepatch(encoded)
    assert parsed.stretch_x == ((4, 6),) and parsed.stretch_y == ((3, 5),) and parsed.padding == (1, 1, 2, 2)
    wide = stretch(parsed, (37, 23))
    back = unstretch(wide, (10, 8), parsed.stretch_x, parsed.stretch_y)
    assert np.array_equal(np.asarray(back), content)
    assert insets_to_ranges((80, 104), (12, 12, 12, 12)) == (((12, 68),), ((12, 92),))
    assert insets_to_ranges((10, 10), (8, 8, 8, 8)) == (((8, 9),), ((8, 9),))  # always at least one band
