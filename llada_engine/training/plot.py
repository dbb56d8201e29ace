"""The loss curve of a run as a PNG, drawn with numpy and written with zlib (no plotting library).

    write_loss_png(path, train=[(step, loss)], valid=[(step, loss)], phase_starts=[step])

Steps are 1-based (a record's step counts the steps done); phase_starts are 0-based step indices.

Train loss in blue, validation loss in red (with dots), a grey vertical line at the start of each phase,
a light grid at every tenth of each axis, the loss range written at the ends of the y axis and the step
range at the ends of the x axis (a 3x5 pixel digit font). The metrics JSONL holds the numbers.
"""
import struct
import zlib
from pathlib import Path

import numpy as np

WIDTH, HEIGHT, MARGIN = 800, 480, 40
BLUE, RED, GREY, LIGHT, BLACK = (31, 119, 180), (214, 39, 40), (150, 150, 150), (232, 232, 232), (0, 0, 0)


_DIGITS = {  # 3x5 glyphs, rows top to bottom, 3 bits each
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
}


def _text(image, x, y, text, scale=2):
    """Draws digits, '.' and '-' with the top-left corner at (x, y)."""
    for char in text:
        glyph = np.array([int(b) for b in _DIGITS[char]], dtype=bool).reshape(5, 3)
        block = np.kron(glyph, np.ones((scale, scale), dtype=bool))
        h, w = block.shape
        region = image[y:y + h, x:x + w]
        region[block[:region.shape[0], :region.shape[1]]] = BLACK
        x += w + scale


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray, text: dict) -> bytes:
    """PNG bytes of an RGB uint8 image [H, W, 3] with tEXt entries."""
    h, w, _ = image.shape
    raw = np.concatenate([np.zeros((h, 1), dtype=np.uint8), image.reshape(h, w * 3)], axis=1).tobytes()
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    for key, value in text.items():
        out += _chunk(b"tEXt", key.encode("latin-1") + b"\0" + str(value).encode("latin-1"))
    return out + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def _line(image, x0, y0, x1, y1, color):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.linspace(x0, x1, n).round().astype(int)
    ys = np.linspace(y0, y1, n).round().astype(int)
    ok = (xs >= 0) & (xs < image.shape[1]) & (ys >= 0) & (ys < image.shape[0])
    image[ys[ok], xs[ok]] = color


def write_loss_png(path, train: list, valid: list, phase_starts: list) -> None:
    image = np.full((HEIGHT, WIDTH, 3), 255, dtype=np.uint8)
    points = train + valid
    steps = [s for s, _ in points] or [0, 1]
    losses = [v for _, v in points] or [0.0, 1.0]
    s_lo, s_hi = min(steps), max(max(steps), min(steps) + 1)
    l_lo, l_hi = min(losses), max(losses)
    if l_hi - l_lo < 1e-9:
        l_lo, l_hi = l_lo - 0.5, l_hi + 0.5

    def px(step, loss):
        x = MARGIN + (step - s_lo) / (s_hi - s_lo) * (WIDTH - 2 * MARGIN)
        y = HEIGHT - MARGIN - (loss - l_lo) / (l_hi - l_lo) * (HEIGHT - 2 * MARGIN)
        return x, y

    for i in range(11):
        x = MARGIN + i * (WIDTH - 2 * MARGIN) / 10
        y = MARGIN + i * (HEIGHT - 2 * MARGIN) / 10
        _line(image, x, MARGIN, x, HEIGHT - MARGIN, LIGHT)
        _line(image, MARGIN, y, WIDTH - MARGIN, y, LIGHT)
    for start in phase_starts:
        if s_lo <= start + 0.5 <= s_hi:
            x, _ = px(start + 0.5, l_lo)
            _line(image, x, MARGIN, x, HEIGHT - MARGIN, GREY)
    _line(image, MARGIN, HEIGHT - MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN, BLACK)
    _line(image, MARGIN, MARGIN, MARGIN, HEIGHT - MARGIN, BLACK)
    for series, color in ((train, BLUE), (valid, RED)):
        xy = [px(s, v) for s, v in series]
        for (xa, ya), (xb, yb) in zip(xy, xy[1:]):
            _line(image, xa, ya, xb, yb, color)
        if series is valid:
            for x, y in xy:
                image[max(int(y) - 2, 0):int(y) + 3, max(int(x) - 2, 0):int(x) + 3] = color
    _text(image, 2, MARGIN - 12, f"{l_hi:.3f}")
    _text(image, 2, HEIGHT - MARGIN + 2, f"{l_lo:.3f}")
    _text(image, MARGIN, HEIGHT - MARGIN + 14, str(s_lo))
    _text(image, WIDTH - MARGIN - 8 * len(str(s_hi)), HEIGHT - MARGIN + 14, str(s_hi))
    text = {"Title": "loss curve (blue: train, red: validation, grey: phase starts)",
            "Steps": f"{s_lo}..{s_hi}", "Loss": f"{l_lo:.4f}..{l_hi:.4f}"}
    Path(path).write_bytes(encode_png(image, text))
