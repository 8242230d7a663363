"""An offline synthetic industrial-defect detection dataset in YOLO format, drawn on scikit-image's real textures.

``make_defect_dataset(root)`` writes ``root/images/{train,val}/*.png``, ``root/labels/{train,val}/*.txt`` (one
``cls cx cy w h`` line per defect, normalised to [0, 1]) and ``root/data.yaml``, the file any Ultralytics
``data=`` argument takes. Nothing is downloaded: the backgrounds are crops, rotations, flips, brushing and
re-lighting of the brick, grass and gravel photographs bundled in the scikit-image wheel, and four defect classes
are painted on them:

- ``scratch``: thin, long, gently curved strokes, lighter or darker than the surface, fading at their ends;
- ``crack``: jagged dark polylines that branch and taper;
- ``spot``: stains with soft, irregular edges (rust, oil, residue) through which the texture still shows;
- ``hole``: dark round or elliptic pits with a lit rim on one side and a shadow on the other.

Sizes span a few pixels to about a quarter of the image, and some images hold no defect at all. Each box bounds
exactly the pixels its defect changed by more than ``VISIBLE_CHANGE`` (then widened to ``MIN_BOX_PIXELS`` if
thinner), so labels never claim untouched pixels nor miss changed ones; a defect that changes no pixel by
``MIN_PEAK_CHANGE`` (too faint, or off the image) is not drawn at all.

Every image is drawn from its own random stream, keyed by ``(seed, split, index)``: the same settings give
byte-identical files on the same numpy and Pillow, and train image 7 is the same whatever ``num_val`` is. This
module needs only numpy, Pillow and scikit-image; it does not import Ultralytics.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from dilateformer.files import atomic_path, atomic_write

DEFECT_CLASSES: tuple[str, ...] = ("scratch", "crack", "spot", "hole")
TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel")  # bundled in the scikit-image wheel: no pooch download
SPLITS: tuple[str, ...] = ("train", "val")
# A pixel belongs to a defect when the defect moved one of its channels by more than this (on a 0..1 scale, ~10/255).
VISIBLE_CHANGE = 0.04
# A defect is kept only if it moves some pixel by this much (~38/255): fainter ones would be labels nobody can see.
MIN_PEAK_CHANGE = 0.15
# Boxes thinner than this are widened about their centre: Ultralytics' augmentation drops boxes under 2 px.
MIN_BOX_PIXELS = 3
MAX_DEFECTS = 6
MAX_IMAGE_SIZE = 2048  # above this a typo is likelier than a plan: 300 such images are ~3 GB of PNG
MARKER = ".dilateformer-defects.json"  # written last inside the temp dir: a root holding it is complete
FORMAT_VERSION = 1
SMALL_AREA = 32 * 32  # COCO's "small" object: under 32 x 32 pixels of area
MEDIUM_AREA = 96 * 96


@dataclass(frozen=True)
class Box:
    """One defect's tight pixel box: columns ``x0 <= x < x1``, rows ``y0 <= y < y1``."""

    cls: int
    x0: int
    y0: int
    x1: int
    y1: int

    def yolo_line(self, size: int) -> str:
        cx, cy = (self.x0 + self.x1) / (2 * size), (self.y0 + self.y1) / (2 * size)
        w, h = (self.x1 - self.x0) / size, (self.y1 - self.y0) / size
        return f"{self.cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


# -------------------------------------------------------------------------------------------------- drawing


@cache
def _texture(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the defect dataset draws on scikit-image's textures: pip install scikit-image (or dilateformer[cli])",
            name=error.name,
        ) from error

    image = getattr(skimage.data, name)()
    if image.ndim == 3:
        image = image[..., :3].mean(axis=2)
    return np.ascontiguousarray(image, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A lit, tinted RGB crop of a random texture: (size, size, 3) float32 in [0, 1]."""
    from PIL import Image

    texture = _texture(TEXTURES[rng.integers(len(TEXTURES))])
    texture = np.rot90(texture, int(rng.integers(4)))
    if rng.random() < 0.5:
        texture = texture[:, ::-1]
    side = min(texture.shape)
    crop = int(rng.integers(max(96, side // 4), side + 1))  # zoom: coarse grain to fine grain
    y, x = (int(rng.integers(n - crop + 1)) for n in texture.shape)
    patch = Image.fromarray(np.ascontiguousarray(texture[y : y + crop, x : x + crop]), mode="F")
    gray = np.asarray(patch.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    if rng.random() < 0.35:
        # Brushed or rolled metal: a long 1-D box blur along the rows, mixed with some original grain.
        k = int(rng.integers(9, 31))
        padded = np.pad(gray, ((0, 0), (k, k)), mode="reflect")
        run = np.cumsum(padded, axis=1, dtype=np.float64)
        brushed = ((run[:, 2 * k :] - run[:, : -2 * k]) / (2 * k)).astype(np.float32)[:, :size]
        gray = 0.8 * brushed + 0.2 * gray
        if rng.random() < 0.5:
            gray = gray.T
    # Re-light: contrast about the mean, a brightness shift and a smooth illumination gradient.
    gray = (gray - gray.mean()) * rng.uniform(0.45, 1.0) + rng.uniform(0.35, 0.65)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    gray = gray + rng.uniform(0, 0.15) * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
    tint = 1.0 + rng.normal(0.0, 0.03, size=3).astype(np.float32)
    gray = gray + 0.012 * rng.standard_normal((size, size), dtype=np.float32)  # sensor noise
    image = gray[..., None] * tint
    return np.clip(image, 0.0, 1.0)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


@dataclass(frozen=True)
class _Window:
    """The part of the image a defect can touch: rows ``y0:y1``, columns ``x0:x1``."""

    y0: int
    y1: int
    x0: int
    x1: int

    @classmethod
    def around(cls, points: np.ndarray, pad: float, size: int) -> _Window | None:
        (x0, y0), (x1, y1) = points.min(axis=0) - pad, points.max(axis=0) + pad
        window = cls(max(0, int(y0)), min(size, int(np.ceil(y1)) + 1), max(0, int(x0)), min(size, int(np.ceil(x1)) + 1))
        return window if window.y1 > window.y0 and window.x1 > window.x0 else None

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def alpha(self, draw_fn, blur: float) -> np.ndarray:
        """Run ``draw_fn(ImageDraw, offset)`` on a black canvas the window's size, soften it: float32 in [0, 1]."""
        from PIL import Image, ImageDraw, ImageFilter

        canvas = Image.new("L", (self.x1 - self.x0, self.y1 - self.y0), 0)
        draw_fn(ImageDraw.Draw(canvas), np.array([self.x0, self.y0], dtype=np.float64))
        if blur > 0:
            canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
        return np.asarray(canvas, dtype=np.float32) / 255.0


# A painter draws one defect: it returns the window it touched and that window's new pixels, or None when the
# defect fell off the image. It must leave every pixel outside the window unchanged.
Painted = tuple[_Window, np.ndarray] | None


def _scratch(rng: np.random.Generator, image: np.ndarray) -> Painted:
    size = image.shape[0]
    length = _log_uniform(rng, 0.04 * size, 0.6 * size)
    start = rng.uniform(0, size, 2)
    theta = rng.uniform(0, np.pi)
    direction = np.array([np.cos(theta), np.sin(theta)])
    bend = np.array([-direction[1], direction[0]]) * rng.normal(0, 0.15) * length  # Bezier control, off the chord
    t = np.linspace(0, 1, max(8, int(length / 3)))[:, None]
    points = start + direction * length * t + 4 * t * (1 - t) * bend
    fade = np.sin(np.pi * np.clip(np.linspace(0, 1, len(points)) * rng.uniform(1.0, 1.4), 0, 1)) ** 0.5
    width = 1 if rng.random() < 0.7 else 2
    window = _Window.around(points, width + 3, size)
    if window is None:
        return None

    def draw(d, offset):
        for a, b, f in zip(points[:-1] - offset, points[1:] - offset, fade[1:], strict=True):
            d.line([tuple(a), tuple(b)], fill=int(255 * max(f, 0.15)), width=width)

    alpha = window.alpha(draw, 0.6)
    sign = 1.0 if rng.random() < 0.6 else -1.0  # scratches through a coating mostly catch the light
    return window, image[window.slices] + (sign * rng.uniform(0.25, 0.5) * alpha)[..., None]


def _walk(rng: np.random.Generator, start: np.ndarray, heading: float, length: float, step: float) -> np.ndarray:
    turns = heading + np.cumsum(rng.normal(0, 0.45, max(2, int(length / step))))
    steps = step * np.stack([np.cos(turns), np.sin(turns)], axis=1)
    return np.concatenate([start[None], start + np.cumsum(steps, axis=0)])


def _crack(rng: np.random.Generator, image: np.ndarray) -> Painted:
    size = image.shape[0]
    length = _log_uniform(rng, 0.05 * size, 0.45 * size)
    step = max(2.0, length / rng.uniform(8, 20))
    heading = rng.uniform(0, 2 * np.pi)
    trunk = _walk(rng, rng.uniform(0, size, 2), heading, length, step)
    # Branches leave the trunk at a sharp angle and are shorter and thinner.
    branches = []
    for _ in range(int(rng.integers(0, 4)) if length > 0.1 * size else 0):
        at = int(rng.integers(1, len(trunk) - 1))
        turn = rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
        branches.append(_walk(rng, trunk[at], heading + turn, length * rng.uniform(0.15, 0.45), step))
    base_width = 2 if length > 0.12 * size else 1
    window = _Window.around(np.concatenate([trunk, *branches]), base_width + 4, size)
    if window is None:
        return None

    def draw(d, offset):
        for line, width in [(trunk, base_width + 1), *[(b, base_width) for b in branches]]:
            for i, (a, b) in enumerate(zip(line[:-1] - offset, line[1:] - offset, strict=True)):
                taper = 1 - i / len(line)  # thinner towards the tip
                d.line([tuple(a), tuple(b)], fill=255, width=max(1, round(width * taper)))

    alpha = window.alpha(draw, 0.5)
    return window, image[window.slices] * (1 - rng.uniform(0.5, 0.8) * alpha)[..., None]


def _blob(rng: np.random.Generator, center: np.ndarray, radius: float, aspect: float, roughness: float) -> np.ndarray:
    """Vertices of a star-shaped blob: a rotated ellipse whose radius wobbles with a few low harmonics."""
    phi = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    wobble = np.ones_like(phi)
    for harmonic in range(2, 6):
        wobble += roughness / harmonic * rng.normal() * np.cos(harmonic * phi + rng.uniform(0, 2 * np.pi))
    x, y = radius * wobble * np.cos(phi), radius * aspect * wobble * np.sin(phi)
    angle = rng.uniform(0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    return center + np.stack([c * x - s * y, s * x + c * y], axis=1)


# Rust, oil, and a pale dried residue: stains are darker or lighter than most surfaces, never the same.
STAIN_COLOURS = np.array([[0.42, 0.22, 0.10], [0.10, 0.09, 0.08], [0.88, 0.87, 0.80]], np.float32)


def _spot(rng: np.random.Generator, image: np.ndarray) -> Painted:
    size = image.shape[0]
    radius = _log_uniform(rng, 2.0, 0.12 * size)
    polygon = _blob(rng, rng.uniform(0, size, 2), radius, rng.uniform(0.5, 1), 0.35)
    blur = max(0.8, 0.2 * radius)
    window = _Window.around(polygon, 3 * blur + 2, size)
    if window is None:
        return None
    alpha = window.alpha(lambda d, offset: d.polygon([tuple(p) for p in polygon - offset], fill=255), blur)
    patch = image[window.slices]
    # The surface's own grain shows through the stain, as it does through a real one.
    grain = patch.mean(axis=2)
    alpha = alpha * np.clip(0.8 + 0.8 * (grain - grain.mean()), 0.4, 1.0) * rng.uniform(0.5, 0.85)
    colour = STAIN_COLOURS[rng.integers(len(STAIN_COLOURS))] * rng.uniform(0.85, 1.15)
    return window, patch * (1 - alpha[..., None]) + colour * alpha[..., None]


def _hole(rng: np.random.Generator, image: np.ndarray) -> Painted:
    size = image.shape[0]
    radius = _log_uniform(rng, 1.5, 0.08 * size)
    aspect, angle = rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    center = rng.uniform(0, size, 2)
    window = _Window.around(center[None], 1.6 * radius + 2, size)
    if window is None:
        return None
    yy, xx = np.mgrid[window.y0 : window.y1, window.x0 : window.x1].astype(np.float32) + 0.5
    dx, dy = xx - center[0], yy - center[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * dx + s * dy) / radius, (-s * dx + c * dy) / (radius * aspect)
    rho = np.sqrt(u * u + v * v)
    inside = np.clip((1.0 - rho) * radius + 0.5, 0.0, 1.0)  # about one pixel of anti-aliasing on the edge
    light = rng.uniform(0, 2 * np.pi)  # the light's direction, in the image plane
    facing = (np.cos(light) * dx + np.sin(light) * dy) / (radius * np.maximum(rho, 1e-3))
    patch = image[window.slices]
    # The pit's floor: the surface, much darker, its far wall (facing the light) a little brighter than its near one.
    floor = patch * rng.uniform(0.15, 0.45) + (0.06 * np.clip(facing * rho, -1, 1))[..., None]
    rim = np.exp(-(((rho - 1.15) / 0.15) ** 2)) * (rho > 0.9)
    out = patch * (1 - inside[..., None]) + floor * inside[..., None]
    return window, out - (rng.uniform(0.1, 0.25) * rim * facing)[..., None]


PAINTERS = {"scratch": _scratch, "crack": _crack, "spot": _spot, "hole": _hole}


def _changed_box(window: _Window, before: np.ndarray, after: np.ndarray, cls: int, size: int) -> Box | None:
    change = np.abs(after - before).max(axis=2)
    changed = change > VISIBLE_CHANGE
    if changed.sum() < 4 or change.max() < MIN_PEAK_CHANGE:
        return None  # fell off the image, or too faint to see: the caller drops it, drawn nowhere
    rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
    y0, y1 = window.y0 + int(rows[0]), window.y0 + int(rows[-1]) + 1
    x0, x1 = window.x0 + int(cols[0]), window.x0 + int(cols[-1]) + 1

    def widen(lo: int, hi: int) -> tuple[int, int]:
        missing = MIN_BOX_PIXELS - (hi - lo)
        if missing <= 0:
            return lo, hi
        lo = max(0, lo - missing // 2)
        hi = min(size, lo + MIN_BOX_PIXELS)
        return hi - MIN_BOX_PIXELS, hi

    (x0, x1), (y0, y1) = widen(x0, x1), widen(y0, y1)
    return Box(cls, x0, y0, x1, y1)


def _render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, list[Box]]:
    """One image: (defective uint8 RGB, clean background uint8 RGB, its boxes)."""
    background = _background(rng, size)
    image = background.copy()
    boxes: list[Box] = []
    count = 0 if rng.random() < 0.1 else int(rng.integers(1, MAX_DEFECTS + 1))
    for _ in range(count):
        cls = int(rng.integers(len(DEFECT_CLASSES)))
        painted = PAINTERS[DEFECT_CLASSES[cls]](rng, image)
        if painted is None:
            continue
        window, after = painted
        after = np.clip(after, 0.0, 1.0)
        box = _changed_box(window, image[window.slices], after, cls, size)
        if box is not None:
            image[window.slices] = after
            boxes.append(box)

    def to_uint8(a: np.ndarray) -> np.ndarray:
        return np.round(a * 255.0).astype(np.uint8)

    return to_uint8(image), to_uint8(background), boxes


# -------------------------------------------------------------------------------------------------- writing


def _settings(seed: int, num_train: int, num_val: int, image_size: int) -> dict:
    return {
        "generator": "dilateformer.integrations.defects",
        "format": FORMAT_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "classes": list(DEFECT_CLASSES),
    }


def _read_marker(root: Path) -> dict | None:
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _yaml_text(root: Path) -> str:
    # JSON strings are valid YAML scalars: this quotes any ':' or '#' in the path without needing PyYAML.
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(DEFECT_CLASSES))
    return (
        "# Synthetic industrial defects, written by dilateformer.integrations.defects.make_defect_dataset\n"
        f"path: {json.dumps(str(root))}\ntrain: images/train\nval: images/val\nnc: {len(DEFECT_CLASSES)}\n"
        f"names:\n{names}\n"
    )


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _generate(directory: Path, settings: dict) -> None:
    from PIL import Image

    size = settings["image_size"]
    for split_index, split in enumerate(SPLITS):
        images, labels = directory / "images" / split, directory / "labels" / split
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for i in range(settings[f"num_{split}"]):
            rng = np.random.default_rng([settings["seed"], split_index, i])
            image, _, boxes = _render(rng, size)
            stem = f"{split}_{i:05d}"
            Image.fromarray(image).save(images / f"{stem}.png", compress_level=1)
            (labels / f"{stem}.txt").write_text("".join(box.yolo_line(size) + "\n" for box in boxes))


def _swap_in(new: Path, root: Path) -> None:
    """Replace the directory ``root`` by ``new``; if that fails, put the old ``root`` back."""
    old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    try:
        os.replace(root, old / "dataset")
        try:
            os.replace(new, root)
        except BaseException:
            os.replace(old / "dataset", root)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def make_defect_dataset(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    num_train: int = 240,
    num_val: int = 60,
    image_size: int = 256,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic industrial-defect dataset under ``root`` in YOLO format; return ``root/data.yaml``.

    Layout: ``root/images/{train,val}/{split}_NNNNN.png`` (RGB, ``image_size`` square), a matching
    ``root/labels/{train,val}/{split}_NNNNN.txt`` per image (``cls cx cy w h`` per line, normalised; empty for
    a defect-free image) and ``root/data.yaml`` (``path`` is ``root``'s absolute path; ``names`` are
    ``DEFECT_CLASSES``). Pass the YAML to Ultralytics as ``data=``.

    The dataset is built in a temporary directory next to ``root`` and moved into place only when complete, so
    an interrupted run never leaves a ``root`` that looks finished. Calling again with the same settings returns
    the existing YAML at once (nothing is regenerated). Other settings raise ``ValueError`` unless ``overwrite``
    is true, in which case the old dataset is replaced. A non-empty ``root`` that this function did not write is
    never touched: that raises ``ValueError`` whatever ``overwrite`` says.

    Args:
        root: the dataset directory; created if missing (its parent too).
        seed: non-negative; the same seed gives byte-identical images and labels.
        num_train: number of training images, >= 1.
        num_val: number of validation images, >= 1.
        image_size: image side in pixels, a multiple of 32 (YOLO's stride) in 64..``MAX_IMAGE_SIZE``.
        overwrite: replace a dataset this function wrote earlier with other settings.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a str or os.PathLike, got {type(root).__name__}")
    seed = _check_int("seed", seed, 0)
    num_train = _check_int("num_train", num_train, 1)
    num_val = _check_int("num_val", num_val, 1)
    image_size = _check_int("image_size", image_size, 64)
    if image_size % 32 or image_size > MAX_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be a multiple of 32 (YOLO's stride) in 64..{MAX_IMAGE_SIZE}, got {image_size}"
        )
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {type(overwrite).__name__}")

    root = Path(root).expanduser().resolve()
    settings = _settings(seed, num_train, num_val, image_size)
    yaml_path = root / "data.yaml"
    if root.exists() and not root.is_dir():
        raise ValueError(f"root {root} exists and is not a directory")
    ours = root.is_dir() and _read_marker(root) is not None
    if root.is_dir() and any(root.iterdir()) and not ours:
        raise ValueError(
            f"root {root} is a non-empty directory not written by make_defect_dataset; pick an empty or new one"
        )
    if ours:
        marker = _read_marker(root)
        if marker.get("settings") == settings:
            if marker.get("root") != str(root) or not yaml_path.is_file():
                atomic_write(yaml_path, _yaml_text(root))  # the dataset was moved: point its YAML here
            return yaml_path
        if not overwrite:
            held = marker.get("settings") or {}
            differ = ", ".join(f"{k}={held.get(k)!r} (asked {v!r})" for k, v in settings.items() if held.get(k) != v)
            raise ValueError(
                f"root {root} holds a defect dataset with other settings: {differ}; "
                "pass overwrite=True (--overwrite) to replace it, or pick another root"
            )

    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        _generate(work, settings)
        (work / "data.yaml").write_text(_yaml_text(root))
        stats = dataset_stats(work, image_size=image_size)
        (work / MARKER).write_text(json.dumps({"settings": settings, "root": str(root), "stats": stats}, indent=2))
        if ours:
            _swap_in(work, root)
        else:
            try:
                if root.is_dir():
                    root.rmdir()  # empty (checked above); os.replace onto a directory is not portable
                os.replace(work, root)
            except OSError:
                marker = _read_marker(root)
                if not (marker and marker.get("settings") == settings):
                    raise
                shutil.rmtree(work)  # a concurrent call with the same settings finished first: the same files
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return yaml_path


# ---------------------------------------------------------------------------------------------- inspecting


def _label_rows(path: Path) -> list[tuple[int, float, float, float, float]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            c, *xywh = line.split()
            rows.append((int(c), *map(float, xywh)))
    return rows


def dataset_stats(root: str | os.PathLike, *, image_size: int | None = None) -> dict:
    """Per split: image count, defect-free images, boxes per class, and box areas in COCO's size bins.

    Bins are by box area in pixels: ``small`` under 32 x 32, ``medium`` up to 96 x 96, ``large`` above.
    ``image_size`` defaults to the one recorded in ``root``'s completion marker.
    """
    root = Path(root)
    if image_size is None:
        marker = _read_marker(root)
        if marker is None:
            raise ValueError(f"root {root} holds no complete defect dataset; pass image_size to read it anyway")
        image_size = marker["settings"]["image_size"]
    stats: dict = {}
    for split in SPLITS:
        files = sorted((root / "labels" / split).glob("*.txt"))
        rows = [r for f in files for r in _label_rows(f)]
        areas = np.array([w * h for _, _, _, w, h in rows]) * image_size**2
        sides = np.sqrt(areas) if rows else np.zeros(1)
        stats[split] = {
            "images": len(files),
            "images_without_defects": sum(1 for f in files if not _label_rows(f)),
            "boxes": len(rows),
            "per_class": {name: sum(1 for r in rows if r[0] == i) for i, name in enumerate(DEFECT_CLASSES)},
            "small": int((areas < SMALL_AREA).sum()),
            "medium": int(((areas >= SMALL_AREA) & (areas < MEDIUM_AREA)).sum()),
            "large": int((areas >= MEDIUM_AREA).sum()),
            "box_side_px_quantiles": {
                q: round(float(np.quantile(sides, float(q))), 1) for q in ("0.05", "0.25", "0.5", "0.75", "0.95")
            },
        }
    return stats


CLASS_COLOURS = ((255, 60, 60), (255, 200, 0), (0, 200, 255), (200, 80, 255))


def sample_grid(
    root: str | os.PathLike, output_png: str | os.PathLike, *, n: int = 16, split: str = "train", columns: int = 4
) -> Path:
    """Draw the first ``n`` images of ``split`` in a grid, each box outlined and named; write ``output_png``."""
    from PIL import Image, ImageDraw, ImageFont

    n = _check_int("n", n, 1)
    columns = _check_int("columns", columns, 1)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    images = sorted((root / "images" / split).glob("*.png"))[:n]
    if not images:
        raise ValueError(f"root {root} holds no images under images/{split}")
    first = Image.open(images[0])
    size = first.width
    gap = 4
    rows = -(-len(images) // columns)
    cols = min(columns, len(images))
    grid = Image.new("RGB", (cols * (size + gap) - gap, rows * (size + gap) - gap), (255, 255, 255))
    font = ImageFont.load_default(size=max(9, size // 22))
    for k, path in enumerate(images):
        tile = Image.open(path).convert("RGB")
        draw = ImageDraw.Draw(tile)
        label = root / "labels" / split / f"{path.stem}.txt"
        for c, cx, cy, w, h in _label_rows(label) if label.is_file() else []:
            colour = CLASS_COLOURS[c % len(CLASS_COLOURS)]
            x0, y0 = (cx - w / 2) * size, (cy - h / 2) * size
            x1, y1 = (cx + w / 2) * size - 1, (cy + h / 2) * size - 1
            draw.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], outline=colour, width=1)
            name = DEFECT_CLASSES[c] if c < len(DEFECT_CLASSES) else str(c)
            text_y = y0 - font.size - 2 if y0 >= font.size + 2 else y1 + 2
            text_x = min(max(0, x0), size - draw.textlength(name, font=font) - 1)  # keep the name on its tile
            draw.text((text_x, text_y), name, fill=colour, font=font, stroke_width=1, stroke_fill=(0, 0, 0))
        grid.paste(tile, ((k % columns) * (size + gap), (k // columns) * (size + gap)))
    output_png = Path(output_png)
    output_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output_png) as tmp:
        grid.save(tmp, format="PNG")
    return output_png
