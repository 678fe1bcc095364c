"""Write difflora's two sample style sets, drawn from code so they are free of anyone's rights (CC0).

    python samples/make_samples.py            # writes samples/pixel-sunsets/ and samples/ink-waves/

* ``pixel-sunsets/``: 24 blocky pixel-art sunsets (a 16 × 16 scene in a small palette, each cell a 4 × 4 block),
  captions in kohya-style ``.txt`` files, trigger word ``pixsun``;
* ``ink-waves/``: 24 ink-wash drawings (brush strokes of waves, moons and ripples on cream paper, drawn at 4× and
  reduced so the strokes are soft), captions in a Hugging Face ``metadata.jsonl``, trigger word ``inkwave``.

Every caption is written from the parameters the picture was drawn with, so it says what is in it. The output
depends only on SEED (numpy's PCG64 and Pillow's drawing are deterministic), so running the script again gives the
same files.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SEED = 20240601
SIZE = 64
COUNT = 24
HERE = Path(__file__).resolve().parent

# ----- pixel-sunsets ------------------------------------------------------------------------------------------------

CELLS = 16  # the scene is 16 × 16 cells; each becomes a 4 × 4 block of the 64 × 64 image
# Sky bands from the top of the picture down to the horizon, then the sun's colour.
SKIES: dict[str, tuple[list[str], str]] = {
    "orange": (["#5b2a5e", "#b8463a", "#e8772e", "#f7b44a"], "#fff2a8"),
    "pink": (["#3d2b6b", "#8e3f8f", "#e0668f", "#f9a3a3"], "#fff0c8"),
    "purple": (["#1f1a45", "#45286e", "#7b3f9e", "#c070b8"], "#ffd27a"),
    "red": (["#3a1020", "#7d1c28", "#c8352c", "#ef6a3a"], "#ffd86b"),
    "golden": (["#6b4a7a", "#c77d52", "#f0b452", "#fbe08a"], "#fffbe0"),
    "teal and orange": (["#12404f", "#2f7a7f", "#e08a4a", "#f8c36a"], "#fff6c0"),
}
CLOUD = "#f4d0c0"


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))


def _sky(cells: np.ndarray, horizon: int, bands: list[str]) -> None:
    """Flat bands from the top down to ``horizon``; the last band goes on below it, behind whatever stands there."""
    for row in range(CELLS):
        cells[row, :] = _hex(bands[min(len(bands) - 1, row * len(bands) // horizon)])


def _sun(cells: np.ndarray, centre: tuple[float, float], radius: float, colour: str) -> None:
    rows, cols = np.mgrid[0:CELLS, 0:CELLS]
    cells[(rows + 0.5 - centre[1]) ** 2 + (cols + 0.5 - centre[0]) ** 2 <= radius**2] = _hex(colour)


def _hills(cells: np.ndarray, rng: np.random.Generator) -> str:
    cols = np.arange(CELLS)
    for colour, base, amplitude in (("#3c2f5a", 9.5, 2.0), ("#1f3b2c", 12.0, 1.5)):  # far ridge, then near ridge
        phase, frequency = rng.uniform(0, 2 * math.pi), rng.uniform(0.25, 0.5)
        tops = np.round(base + amplitude * np.sin(cols * frequency + phase)).astype(int)
        for col, top in zip(cols, tops):
            cells[top:, col] = _hex(colour)
    return "rolling hills"


def _sea(cells: np.ndarray, rng: np.random.Generator, sun_x: float, sun_colour: str) -> str:
    horizon = 10
    for row in range(horizon, CELLS):
        cells[row, :] = _hex("#1d2f5c" if row % 2 else "#274079")
    for row in range(horizon + 1, CELLS, 2):  # the sun's reflection: short broken stripes under it
        width = int(rng.integers(1, 4))
        start = round(sun_x) - width // 2 + int(rng.integers(-1, 2))
        cells[row, max(0, start) : max(0, start + width)] = _hex(sun_colour)
    return "the sea"


def _mountains(cells: np.ndarray, rng: np.random.Generator) -> str:
    cols = np.arange(CELLS)
    peaks = [(rng.uniform(1, 6), rng.uniform(4, 6)), (rng.uniform(8, 14), rng.uniform(3, 6))]
    tops = np.min([height + np.abs(cols - x) * 1.2 for x, height in peaks], axis=0)
    for col in cols:
        top = round(float(tops[col]))
        cells[top:, col] = _hex("#2a2440")
        cells[top : top + 1, col] = _hex("#f0e6f0") if top < 7 else _hex("#2a2440")  # snow on the high peaks
    cells[13:, :] = _hex("#1b1830")
    return "snowy mountains"


def _city(cells: np.ndarray, rng: np.random.Generator) -> str:
    col = 0
    while col < CELLS:
        width, top = int(rng.integers(2, 4)), int(rng.integers(6, 12))
        cells[top:, col : col + width] = _hex("#1a1530")
        for row in range(top + 1, CELLS - 1, 2):  # lit windows in every other row
            for window in range(col, min(col + width, CELLS)):
                if rng.random() < 0.35:
                    cells[row, window] = _hex("#ffd45a")
        col += width
    return "a city skyline"


def pixel_sunset(index: int) -> tuple[Image.Image, str]:
    """One scene: the sky and subject come from ``index`` (each pairing once), the rest from the seeded rng."""
    rng = np.random.default_rng([SEED, 1, index])
    sky_name = list(SKIES)[index // 4]
    bands, sun_colour = SKIES[sky_name]
    cells = np.zeros((CELLS, CELLS, 3), dtype=np.uint8)
    _sky(cells, 11, bands)
    clouds = rng.random() < 0.5
    if clouds:
        for _ in range(int(rng.integers(2, 4))):
            row, start, length = int(rng.integers(1, 6)), int(rng.integers(0, 12)), int(rng.integers(3, 7))
            cells[row, start : start + length] = _hex(CLOUD)
    large = rng.random() < 0.5
    sun_x, radius = rng.uniform(4, 12), 3.6 if large else 2.3
    _sun(cells, (sun_x, rng.uniform(7.5, 9.5)), radius, sun_colour)
    subject = index % 4
    if subject == 0:
        scene = _hills(cells, rng)
    elif subject == 1:
        scene = _sea(cells, rng, sun_x, sun_colour)
    elif subject == 2:
        scene = _mountains(cells, rng)
    else:
        scene = _city(cells, rng)
    image = Image.fromarray(cells, "RGB").resize((SIZE, SIZE), Image.Resampling.NEAREST)
    details = ["a large sun" if large else "a small sun"] + (["pink clouds"] if clouds else [])
    return image, f"pixsun style, a sunset over {scene}, {sky_name} sky, {', '.join(details)}"


# ----- ink-waves ----------------------------------------------------------------------------------------------------

SCALE = 4  # drawn at 256 × 256 and reduced, so strokes get soft edges like ink on paper
PAPER = np.array([243, 236, 220], dtype=np.float64)
INKS = {"black": (24, 22, 26), "sepia": (92, 56, 30), "indigo": (30, 38, 84)}


def _brush_line(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], width: float, density: int) -> None:
    """A stroke whose width swells in the middle and tapers at both ends, like a brush pressed and lifted."""
    for step, (x, y) in enumerate(points):
        pressure = math.sin(math.pi * (step + 0.5) / len(points)) ** 0.6
        radius = max(0.6, width * pressure) * SCALE / 2
        draw.ellipse((x * SCALE - radius, y * SCALE - radius, x * SCALE + radius, y * SCALE + radius), fill=density)


def _wave(draw, rng, y: float, amplitude: float, width: float) -> None:
    frequency, phase = rng.uniform(0.12, 0.22), rng.uniform(0, 2 * math.pi)
    points = [(x, y + amplitude * math.sin(x * frequency + phase)) for x in np.linspace(-2, SIZE + 2, 160)]
    _brush_line(draw, points, width, 255)


def _waves(draw, rng, top: float, rows: int) -> None:
    for row in range(rows):
        _wave(draw, rng, top + row * (SIZE - 4 - top) / rows, rng.uniform(1.2, 3.0), rng.uniform(1.2, 2.4))


def _circle(draw, x: float, y: float, radius: float, width: float, fill: int | None = None) -> None:
    box = ((x - radius) * SCALE, (y - radius) * SCALE, (x + radius) * SCALE, (y + radius) * SCALE)
    draw.ellipse(box, outline=255, width=max(1, round(width * SCALE)), fill=fill)


def _moon_scene(draw, wash, rng) -> str:
    _circle(draw, rng.uniform(14, 50), rng.uniform(10, 16), rng.uniform(5, 8), 1.2)
    _waves(draw, rng, 32, int(rng.integers(3, 5)))
    return "waves under a moon"


def _sun_scene(draw, wash, rng) -> str:
    x, radius = rng.uniform(18, 46), rng.uniform(8, 11)
    _circle(wash, x, 30, radius, 0.5, fill=150)  # a grey wash disc cut by the horizon below
    wash.rectangle((0, 30 * SCALE, SIZE * SCALE, SIZE * SCALE), fill=0)
    _brush_line(draw, [(x, 30.0) for x in np.linspace(2, SIZE - 2, 120)], 1.2, 255)
    _waves(draw, rng, 38, 3)
    return "waves and a rising sun"


def _rolling_scene(draw, wash, rng) -> str:
    rows = int(rng.integers(6, 9))
    for row in range(rows):
        _wave(draw, rng, 8 + row * 50 / rows, rng.uniform(2, 4), rng.uniform(0.8, 1.4))
    return "rolling waves"


def _great_wave_scene(draw, wash, rng) -> str:
    x, y, radius = rng.uniform(26, 38), rng.uniform(20, 25), rng.uniform(9, 12)
    # The crest: a spiral from the wave's back over the top and inwards (angles grow clockwise on screen, y is down).
    angles = np.linspace(math.pi, 4.4 * math.pi, 200)
    shrink = 1 - 0.72 * (angles - math.pi) / (3.4 * math.pi)
    crest = [(x + radius * s * math.cos(a), y + radius * s * math.sin(a)) for a, s in zip(angles, shrink)]
    _brush_line(draw, crest, 2.4, 255)
    back = [(-2 + (x - radius + 2) * t, 46 - (46 - y) * t**2) for t in np.linspace(0, 1, 60)]  # rises to the crest
    front = [(x + radius * (0.85 + 0.6 * t), y + (46 - y) * t**0.8) for t in np.linspace(0, 1, 50)]  # the face
    _brush_line(draw, back, 2.2, 255)
    _brush_line(draw, front, 1.6, 255)
    _waves(draw, rng, 48, 2)
    return "a great curling wave"


def _ripple_scene(draw, wash, rng) -> str:
    x, y = rng.uniform(24, 40), rng.uniform(26, 38)
    _circle(wash, x, y, 2.2, 0.5, fill=255)
    for ring in range(1, int(rng.integers(4, 6)) + 1):
        _circle(draw, x, y, 2 + ring * 5.5, max(0.5, 1.8 - ring * 0.25))
    return "ripples around a stone"


def _mountain_scene(draw, wash, rng) -> str:
    peak_x, peak_y = rng.uniform(18, 46), rng.uniform(8, 16)
    outline = [(0, 34), (peak_x, peak_y), (SIZE, 30)]
    wash.polygon([(x * SCALE, y * SCALE) for x, y in outline + [(SIZE, 36), (0, 36)]], fill=110)
    for (x0, y0), (x1, y1) in itertools.pairwise(outline):
        _brush_line(draw, [(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t) for t in np.linspace(0, 1, 80)], 1.6, 255)
    _waves(draw, rng, 42, 3)
    return "waves below a mountain"


INK_SCENES: list[Callable] = [
    _moon_scene, _sun_scene, _rolling_scene, _great_wave_scene, _ripple_scene, _mountain_scene
]


def ink_wave(index: int) -> tuple[Image.Image, str]:
    """One drawing: the scene and ink come from ``index`` (each scene in every ink), the shapes from the seeded rng."""
    rng = np.random.default_rng([SEED, 2, index])
    ink_name = ["black", "black", "sepia", "indigo"][index // len(INK_SCENES)]
    big = (SIZE * SCALE, SIZE * SCALE)
    strokes, washes = Image.new("L", big, 0), Image.new("L", big, 0)
    scene = INK_SCENES[index % len(INK_SCENES)](ImageDraw.Draw(strokes), ImageDraw.Draw(washes), rng)
    # Wet ink bleeds a little into the paper: blur the strokes slightly, the washes more.
    strokes = strokes.filter(ImageFilter.GaussianBlur(SCALE * 0.35))
    washes = washes.filter(ImageFilter.GaussianBlur(SCALE * 1.2))
    density = np.maximum(np.asarray(strokes, np.float64) * 0.92, np.asarray(washes, np.float64) * 0.45) / 255
    ink = np.array(INKS[ink_name], dtype=np.float64)
    pixels = PAPER * (1 - density[..., None]) + ink * density[..., None]
    image = Image.fromarray(pixels.round().astype(np.uint8), "RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    return image, f"inkwave style, {scene}, {ink_name} ink on paper"


# ----- writing ------------------------------------------------------------------------------------------------------


def _clear(folder: Path, patterns: tuple[str, ...]) -> None:
    """Remove what an earlier run wrote (only our own file names), so a changed COUNT leaves no stale files."""
    folder.mkdir(parents=True, exist_ok=True)
    for pattern in patterns:
        for path in folder.glob(pattern):
            path.unlink()


def write_pixel_sunsets(folder: Path) -> None:
    _clear(folder, ("pixsun_*.png", "pixsun_*.txt"))
    for index in range(COUNT):
        image, caption = pixel_sunset(index)
        image.save(folder / f"pixsun_{index:02d}.png", optimize=True)
        (folder / f"pixsun_{index:02d}.txt").write_text(caption + "\n", encoding="utf-8")


def write_ink_waves(folder: Path) -> None:
    _clear(folder, ("inkwave_*.png", "metadata.jsonl"))
    lines = []
    for index in range(COUNT):
        image, caption = ink_wave(index)
        image.save(folder / f"inkwave_{index:02d}.png", optimize=True)
        lines.append(json.dumps({"file_name": f"inkwave_{index:02d}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    write_pixel_sunsets(HERE / "pixel-sunsets")
    write_ink_waves(HERE / "ink-waves")
    total = sum(path.stat().st_size for name in ("pixel-sunsets", "ink-waves") for path in (HERE / name).iterdir())
    print(f"wrote {2 * COUNT} images to {HERE} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
