"""The embedded synthetic dataset: small cluttered images of four shape classes in VOC layout.

It is the default data of the whole pipeline (no download needed) and the fixture of the tests,
so it is built to be

* **detectable**: every object is a saturated, textured shape (class-specific hue range,
  shape and texture) on a muted background, so selective search finds it and conv features
  separate the classes;
* **not trivial**: the background is a noisy gradient with muted distractor lines and blobs,
  objects vary in size (about 30-150 px) and aspect ratio, may occlude each other a little and
  may be cut by the image border (``truncated``); tiny objects are marked ``difficult``, as in
  VOC;
* **deterministic**: one seeded ``np.random.Generator`` drives everything, so a seed gives the
  same bytes (same Pillow/libjpeg build);
* **safe to interrupt**: the dataset is written into a temporary folder beside ``root`` and
  renamed into place when complete; ``synthetic.json`` records the settings, and an existing
  complete dataset with the same settings is reused.

Boxes are written as VOC 1-based inclusive pixel indices of the *visible* pixels of each object
(VOC's own rule: the box encloses the visible part).
"""
from __future__ import annotations

import colorsys
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..errors import CacheError, DatasetError
from ..io.jsonfile import read_json, write_json

__all__ = ["SYNTHETIC_CLASSES", "SYNTHETIC_VERSION", "CROWDED_LAYOUT", "make_synthetic_voc", "render_object_image"]

log = logging.getLogger(__name__)

#: Bump when the rendering changes, so old datasets on disk are rebuilt instead of reused.
SYNTHETIC_VERSION = 2
SYNTHETIC_CLASSES = ("circle", "square", "star", "triangle")  # sorted: VOCDataset infers this order
#: Hue centre (HSV, 0-1) of each class; +-HUE_JITTER around it. Far apart so colour alone is a
#: strong cue (selective search groups by colour), shape and texture add the rest.
_CLASS_HUE = {"circle": 0.0, "square": 0.62, "star": 0.13, "triangle": 0.33}
HUE_JITTER = 0.035
#: Objects: long side log-uniform in [30, 150] px, as asked for VOC-like scale variation at
#: ~320x240; 8% are tiny (12-22 px) and, like VOC's hard cases, marked difficult.
SIZE_RANGE = (30.0, 150.0)
TINY_RANGE = (12.0, 22.0)
TINY_PROB = 0.08
DIFFICULT_MAX_SIDE = 24  # visible box long side below this -> difficult
ASPECT_RANGE = (0.6, 1.67)  # width / height, log-uniform
TRUNCATE_PROB = 0.1  # chance an object may hang over the image border (marked truncated)
MAX_OBJECTS = 4
#: Occlusion limit: a new object is rejected if any earlier object would keep less than this
#: fraction of its pixels visible, so every object stays recognisable.
MIN_VISIBLE = 0.6
PLACEMENT_TRIES = 30
JPEG_QUALITY = 92  # high enough that JPEG artefacts do not blur the small shapes
# JPEGs are saved without chroma subsampling (4:4:4): with 4:2:0 the one-pixel tips of stars and
# triangles lose their colour and the visible object no longer reaches its box.


@dataclass(frozen=True)
class _Layout:
    """How many objects an image holds, of which classes, how large and how hidden."""

    num_objects: tuple[int, int] = (1, MAX_OBJECTS)          # inclusive range, uniform
    class_probs: tuple[float, ...] | None = None             # None: uniform over SYNTHETIC_CLASSES
    size_range: tuple[float, float] = SIZE_RANGE
    min_visible: float = MIN_VISIBLE


#: The crowded variant (crowds of cells, cars, people): 12-16 smaller objects per image (14 on
#: average), three classes of which circles hold 2/3 of the boxes (stars never appear), and more
#: occlusion allowed (each object keeps at least 45 % of its pixels visible).
CROWDED_LAYOUT = _Layout(num_objects=(12, 16), class_probs=(2 / 3, 1 / 6, 0.0, 1 / 6), size_range=(20.0, 70.0),
                         min_visible=0.45)


@dataclass(frozen=True)
class _Object:
    name: str
    box: tuple[int, int, int, int]  # VOC 1-based inclusive xmin, ymin, xmax, ymax
    truncated: bool
    difficult: bool


def _muted_colour(rng: np.random.Generator, lo: float = 60, hi: float = 200) -> tuple[int, int, int]:
    """A low-saturation colour: background and distractors never look like an object."""
    h = rng.uniform(0, 1)
    s = rng.uniform(0.0, 0.3)
    v = rng.uniform(lo, hi) / 255.0
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def _object_colour(rng: np.random.Generator, name: str) -> np.ndarray:
    h = (_CLASS_HUE[name] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    s = rng.uniform(0.65, 1.0)
    v = rng.uniform(0.6, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Noisy two-colour gradient with muted distractor lines and blobs (not objects)."""
    c0 = np.array(_muted_colour(rng), np.float64)
    c1 = np.array(_muted_colour(rng), np.float64)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    t = (xx * math.cos(angle) + yy * math.sin(angle))
    t = (t - t.min()) / max(np.ptp(t), 1e-9)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    img += rng.normal(0.0, 10.0, size=img.shape)  # sensor-like noise, sigma 10 grey levels
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(3, 9))):  # distractor lines
        pts = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(2)]
        draw.line(pts, fill=_muted_colour(rng, 30, 230), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(2, 7))):  # distractor blobs: irregular muted polygons
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(5, 22)
        k = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * math.pi, k))
        radii = r * rng.uniform(0.5, 1.0, k)
        pts = [(float(cx + rr * math.cos(a)), float(cy + rr * math.sin(a))) for a, rr in zip(angles, radii)]
        draw.polygon(pts, fill=_muted_colour(rng, 30, 230))
    return pil


def _shape_mask(name: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """bool array[h, w]: the class's shape filling a w x h box."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    if name == "circle":
        d.ellipse([0, 0, w - 1, h - 1], fill=255)
    elif name == "square":
        d.rectangle([0, 0, w - 1, h - 1], fill=255)
    elif name == "triangle":
        apex = rng.uniform(0.2, 0.8) * (w - 1)  # varied triangles, apex anywhere on the top edge
        d.polygon([(apex, 0), (0, h - 1), (w - 1, h - 1)], fill=255)
    elif name == "star":
        cx, cy = (w - 1) / 2, (h - 1) / 2
        rot = rng.uniform(0, 2 * math.pi / 5)
        inner = rng.uniform(0.4, 0.55)  # inner/outer radius ratio: a clearly pointed star
        pts = []
        for i in range(10):
            a = rot + i * math.pi / 5 - math.pi / 2
            r = 1.0 if i % 2 == 0 else inner
            pts.append((cx + r * cx * math.cos(a), cy + r * cy * math.sin(a)))
        d.polygon(pts, fill=255)
    else:  # pragma: no cover - the class list is fixed
        raise ValueError(name)
    return np.asarray(m) > 127


def _texture(name: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """float array[h, w, 3]: class colour with a class-specific texture."""
    colour = _object_colour(rng, name)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if name == "circle":  # radial shading, bright centre
        r = np.hypot((xx - w / 2) / max(w, 1), (yy - h / 2) / max(h, 1))
        shade = 1.0 - 0.7 * r
    elif name == "square":  # diagonal stripes
        period = rng.uniform(6, 12)
        shade = np.where(((xx + yy) // period) % 2 == 0, 1.0, 0.65)
    elif name == "star":  # vertical gradient
        shade = 0.7 + 0.3 * yy / max(h - 1, 1)
    else:  # triangle: solid with a speckle
        shade = 1.0 - 0.15 * (rng.random((h, w)) < 0.15)
    tex = colour[None, None] * shade[..., None]
    return tex + rng.normal(0.0, 6.0, size=tex.shape)


def _render_image(rng: np.random.Generator, width: int, height: int,
                  layout: _Layout = _Layout()) -> tuple[Image.Image, list[_Object]]:
    """One image and its objects (visible-extent boxes, VOC 1-based)."""
    canvas = np.asarray(_background(rng, width, height), dtype=np.float64).copy()
    owner = np.full((height, width), -1, np.int32)  # which object is visible at each pixel
    full_count: list[int] = []
    names: list[str] = []
    truncated: list[bool] = []
    n_wanted = int(rng.integers(layout.num_objects[0], layout.num_objects[1] + 1))
    for _ in range(n_wanted):
        if layout.class_probs is None:
            name = SYNTHETIC_CLASSES[int(rng.integers(len(SYNTHETIC_CLASSES)))]
        else:
            name = SYNTHETIC_CLASSES[int(rng.choice(len(SYNTHETIC_CLASSES), p=layout.class_probs))]
        for _try in range(PLACEMENT_TRIES):
            lo, hi = TINY_RANGE if rng.random() < TINY_PROB else layout.size_range
            long_side = math.exp(rng.uniform(math.log(lo), math.log(min(hi, min(width, height) - 4))))
            aspect = math.exp(rng.uniform(math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])))
            w, h = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
            w, h = max(int(round(w)), 6), max(int(round(h)), 6)
            if rng.random() < TRUNCATE_PROB:  # may hang over the border by up to 40%
                x0 = int(rng.integers(-int(0.4 * w), width - int(0.6 * w)))
                y0 = int(rng.integers(-int(0.4 * h), height - int(0.6 * h)))
            else:
                x0 = int(rng.integers(0, width - w + 1))
                y0 = int(rng.integers(0, height - h + 1))
            mask = _shape_mask(name, w, h, rng)
            # Clip the object's box to the image.
            cx0, cy0 = max(x0, 0), max(y0, 0)
            cx1, cy1 = min(x0 + w, width), min(y0 + h, height)
            local = mask[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
            if local.sum() < 0.5 * mask.sum():
                continue
            new_owner = owner.copy()
            new_owner[cy0:cy1, cx0:cx1][local] = len(names)
            if any((new_owner == k).sum() < layout.min_visible * full_count[k] for k in range(len(names))):
                continue  # would hide too much of an earlier object
            tex = _texture(name, w, h, rng)[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
            region = canvas[cy0:cy1, cx0:cx1]
            region[local] = tex[local]
            owner = new_owner
            full_count.append(int(local.sum()))
            names.append(name)
            truncated.append(bool(local.sum() < mask.sum()))
            break
    # A thin muted line over everything now and then: clutter that crosses objects.
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        draw = ImageDraw.Draw(img)
        pts = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(2)]
        draw.line(pts, fill=_muted_colour(rng, 30, 230), width=1)
    objects = []
    for k, name in enumerate(names):
        ys, xs = np.nonzero(owner == k)
        box = (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)  # -> 1-based
        long_side = max(box[2] - box[0] + 1, box[3] - box[1] + 1)
        objects.append(_Object(name, box, truncated[k], long_side < DIFFICULT_MAX_SIDE))
    return img, objects


def render_object_image(rng: np.random.Generator, width: int, height: int, name: str,
                        long_side: float) -> Image.Image:
    """One image holding one whole object of class ``name`` whose longer side is ``long_side`` px
    (at a random aspect in ASPECT_RANGE, placed at random inside the image) on the cluttered
    background: the classification set whose object size is chosen by the caller."""
    if name not in SYNTHETIC_CLASSES:
        raise ValueError(f"unknown synthetic class {name!r}")
    canvas = np.asarray(_background(rng, width, height), dtype=np.float64).copy()
    aspect = math.exp(rng.uniform(math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])))
    w, h = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
    w, h = min(max(int(round(w)), 6), width), min(max(int(round(h)), 6), height)
    x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    mask = _shape_mask(name, w, h, rng)
    region = canvas[y0:y0 + h, x0:x0 + w]
    region[mask] = _texture(name, w, h, rng)[mask]
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def _annotation_xml(image_id: str, width: int, height: int, objects: list[_Object]) -> str:
    parts = [
        "<annotation>",
        "\t<folder>synthetic</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for o in objects:
        parts.append(
            "\t<object>\n"
            f"\t\t<name>{o.name}</name>\n\t\t<pose>Unspecified</pose>\n"
            f"\t\t<truncated>{int(o.truncated)}</truncated>\n\t\t<difficult>{int(o.difficult)}</difficult>\n"
            f"\t\t<bndbox>\n\t\t\t<xmin>{o.box[0]}</xmin>\n\t\t\t<ymin>{o.box[1]}</ymin>\n"
            f"\t\t\t<xmax>{o.box[2]}</xmax>\n\t\t\t<ymax>{o.box[3]}</ymax>\n\t\t</bndbox>\n"
            "\t</object>"
        )
    parts.append("</annotation>\n")
    return "\n".join(parts)


def _settings(num_trainval: int, num_test: int, image_size: tuple[int, int], seed: int, crowded: bool) -> dict:
    out = {"version": SYNTHETIC_VERSION, "num_trainval": num_trainval, "num_test": num_test,
           "image_size": [int(image_size[0]), int(image_size[1])], "seed": int(seed),
           "classes": list(SYNTHETIC_CLASSES), "jpeg_quality": JPEG_QUALITY}
    if crowded:        # only when set: the datasets written before the option are still reused
        out["crowded"] = True
        out["classes"] = [c for c, p in zip(SYNTHETIC_CLASSES, CROWDED_LAYOUT.class_probs) if p > 0]
    return out


def _is_complete(root: Path, settings: dict) -> bool:
    meta = root / "synthetic.json"
    if not meta.is_file():
        return False
    try:
        return read_json(meta) == settings
    except CacheError:   # damaged: generate again
        return False


def make_synthetic_voc(root: str | os.PathLike, num_trainval: int = 120, num_test: int = 60,
                       image_size: tuple[int, int] = (320, 240), seed: int = 0, progress: bool = False,
                       crowded: bool = False) -> Path:
    """Write (or reuse) a synthetic VOC-layout dataset at ``root``.

    Layout: ``Annotations/<id>.xml`` (1-based inclusive boxes), ``JPEGImages/<id>.jpg``,
    ``ImageSets/Main/{trainval,test}.txt`` and ``synthetic.json`` (the settings). Ids are
    ``000001 ...``, trainval first. Classes: :data:`SYNTHETIC_CLASSES`.

    Args:
        root: dataset folder. Reused as is when it holds a complete dataset made with the same
            settings; replaced when it holds a synthetic dataset made with other settings;
            a non-empty folder that is not a synthetic dataset is refused (DatasetError).
        num_trainval, num_test: number of images per split (each >= 1).
        image_size: (width, height) of every image.
        seed: seed of the one ``np.random.Generator`` that draws everything.
        progress: show a tqdm bar while rendering.
        crowded: the crowded variant (:data:`CROWDED_LAYOUT`): 12-16 overlapping objects per
            image, three classes (circle, square, triangle), circles 2/3 of the boxes.
    Returns:
        The dataset root as a Path.
    """
    root = Path(root)
    width, height = int(image_size[0]), int(image_size[1])
    if num_trainval < 1 or num_test < 1:
        raise DatasetError(f"synthetic dataset {root}: num_trainval and num_test must be >= 1")
    if width < 64 or height < 64:  # objects are up to 150 px, capped by the image; 64 keeps room
        raise DatasetError(f"synthetic dataset {root}: image_size {image_size} is below 64x64")
    settings = _settings(num_trainval, num_test, (width, height), seed, crowded)
    if _is_complete(root, settings):
        log.info("reusing synthetic dataset %s", root)
        return root
    if root.exists() and not (root / "synthetic.json").is_file() and any(root.iterdir()):
        raise DatasetError(f"{root} exists and is not a synthetic dataset; refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        _write_dataset(tmp, settings, width, height, progress)
        _move_into_place(tmp, root, settings)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_dataset(tmp: Path, settings: dict, width: int, height: int, progress: bool) -> None:
    rng = np.random.default_rng(settings["seed"])
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp / sub).mkdir(parents=True)
    n_tv, n_te = settings["num_trainval"], settings["num_test"]
    ids = [f"{i:06d}" for i in range(1, n_tv + n_te + 1)]
    n_objects = 0
    for image_id in tqdm(ids, desc="synthetic images", disable=not progress):
        img, objects = _render_image(rng, width, height, CROWDED_LAYOUT if settings.get("crowded") else _Layout())
        img.save(tmp / "JPEGImages" / f"{image_id}.jpg", format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        (tmp / "Annotations" / f"{image_id}.xml").write_text(
            _annotation_xml(image_id, width, height, objects), encoding="utf-8")
        n_objects += len(objects)
    (tmp / "ImageSets/Main/trainval.txt").write_text("\n".join(ids[:n_tv]) + "\n", encoding="utf-8")
    (tmp / "ImageSets/Main/test.txt").write_text("\n".join(ids[n_tv:]) + "\n", encoding="utf-8")
    # synthetic.json is written last: its presence marks a complete dataset.
    write_json(tmp / "synthetic.json", settings)
    log.info("synthetic dataset: %d images, %d objects", len(ids), n_objects)


def _move_into_place(tmp: Path, root: Path, settings: dict) -> None:
    """Rename the finished dataset onto ``root``, replacing an older synthetic dataset there."""
    old = None
    if root.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old.", suffix=".tmp", dir=root.parent))
        os.rmdir(old)
        os.replace(root, old)
    try:
        os.replace(tmp, root)
    except OSError:
        # Another process finished the same dataset first: use theirs if it is complete.
        if not _is_complete(root, settings):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
