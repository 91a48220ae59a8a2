"""Pixel readers: a game's score, lives and game-over read from its frame, for games that expose no
variable (desktop binaries; web games that keep their state in module scope).

A reader looks at one region of the game's frame at its native resolution (`region` is
[x0, y0, x1, y1] as fractions of the width and height) and is one of:

    {color: [r, g, b], tolerance: 40, min_fraction: 0.3}   true when at least that share of the
                                                           region's pixels is within `tolerance`
                                                           (max channel difference) of the colour
    {template: gameover.png, threshold: 0.8}               true when the image is found in the region
                                                           (OpenCV normalised cross-correlation)
    {digits: digits/, threshold: 0.8}                      a number: digit images 0.png ... 9.png found
                                                           left to right in the region
    {count: [r, g, b], tolerance: 40, min_pixels: 4}       a number: separate blobs of the colour
                                                           (lives drawn as icons)

Template and digit files are relative to the spec that names them. A reader whose region is empty
or whose images are missing or larger than its region is refused when the spec loads; a reader
that finds nothing gives false / no number, which the env reports as the game's problem.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Region = tuple[float, float, float, float]


class _Reader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    region: Region = (0.0, 0.0, 1.0, 1.0)
    """[x0, y0, x1, y1] as fractions of the frame's width and height."""

    @field_validator("region")
    @classmethod
    def _valid_region(cls, r: Region) -> Region:
        x0, y0, x1, y1 = r
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise ValueError(f"region {list(r)} must be [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        return r

    def crop(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        x0, y0, x1, y1 = self.region
        return frame[int(y0 * h): max(int(y0 * h) + 1, round(y1 * h)), int(x0 * w): max(int(x0 * w) + 1, round(x1 * w))]


class ColorReader(_Reader):
    color: tuple[int, int, int]
    tolerance: int = Field(40, ge=0, le=255)
    min_fraction: float = Field(0.3, gt=0.0, le=1.0)

    def read(self, frame: np.ndarray) -> bool:
        return bool(_mask(self.crop(frame), self.color, self.tolerance).mean() >= self.min_fraction)


class CountReader(_Reader):
    count: tuple[int, int, int]
    tolerance: int = Field(40, ge=0, le=255)
    min_pixels: int = Field(4, ge=1)

    def read(self, frame: np.ndarray) -> float:
        import cv2

        mask = _mask(self.crop(frame), self.count, self.tolerance).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        return float(sum(1 for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= self.min_pixels))


class _ImageReader(_Reader):
    """A reader matching image files that lie relative to its spec (checked, and cached, on load)."""

    threshold: float = Field(0.8, gt=0.0, le=1.0)
    base_dir: Path = Field(Path("."), exclude=True)

    def image_paths(self) -> list[str]:
        raise NotImplementedError

    @model_validator(mode="after")
    def _images_exist(self):
        for path in self.image_paths():
            _image(path)
        return self


class TemplateReader(_ImageReader):
    template: str

    def image_paths(self) -> list[str]:
        return [str(self.base_dir / self.template)]

    def read(self, frame: np.ndarray) -> bool:
        return _best_match(self.crop(frame), _image(self.image_paths()[0])) >= self.threshold


class DigitsReader(_ImageReader):
    digits: str

    def image_paths(self) -> list[str]:
        return [str(self.base_dir / self.digits / f"{d}.png") for d in range(10)]

    def read(self, frame: np.ndarray) -> float | None:
        """The number the digit images spell in the region, left to right; None when none is found."""
        import cv2

        region = _gray(self.crop(frame))
        hits = []  # (x, width, score, digit)
        for d, path in enumerate(self.image_paths()):
            tpl = _image(path)
            if tpl.shape[0] > region.shape[0] or tpl.shape[1] > region.shape[1]:
                continue
            scores = cv2.matchTemplate(region, tpl, cv2.TM_CCOEFF_NORMED)
            for y, x in zip(*np.nonzero(scores >= self.threshold)):
                hits.append((int(x), tpl.shape[1], float(scores[y, x]), d))
        chosen: list[tuple[int, int, float, int]] = []
        for hit in sorted(hits, key=lambda h: -h[2]):  # best first; a digit's cell holds one digit
            if all(hit[0] + hit[1] <= c[0] or c[0] + c[1] <= hit[0] for c in chosen):
                chosen.append(hit)
        if not chosen:
            return None
        return float("".join(str(c[3]) for c in sorted(chosen)))


READER_KINDS = {"color": ColorReader, "count": CountReader, "template": TemplateReader, "digits": DigitsReader}


def parse_reader(raw: object, base_dir: Path, name: str) -> _Reader:
    """One reader from its spec mapping; ValueError naming the problem (the spec loader adds the file)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{name}: a pixel reader is a mapping with one of {', '.join(READER_KINDS)}")
    kinds = [k for k in READER_KINDS if k in raw]
    if len(kinds) != 1:
        raise ValueError(f"{name}: a pixel reader needs exactly one of {', '.join(READER_KINDS)} (got "
                         f"{', '.join(map(str, raw)) or 'none'})")
    cls = READER_KINDS[kinds[0]]
    extra = {"base_dir": base_dir} if issubclass(cls, _ImageReader) else {}
    return cls.model_validate({**raw, **extra})


BOOLEAN_VARIABLES = ("game_over", "failure")
NUMBER_VARIABLES = ("score", "lives")


def check_reader_kind(name: str, reader: _Reader) -> None:
    numeric = isinstance(reader, (DigitsReader, CountReader))
    if name in BOOLEAN_VARIABLES and numeric:
        raise ValueError(f"{name}: a yes/no variable needs a color or template reader, not a number reader")
    if name in NUMBER_VARIABLES and not numeric:
        raise ValueError(f"{name}: a number needs a digits or count reader, not a yes/no reader")


def _mask(pixels: np.ndarray, color: tuple[int, int, int], tolerance: int) -> np.ndarray:
    return (np.abs(pixels[..., :3].astype(np.int16) - np.asarray(color, np.int16)).max(axis=-1) <= tolerance)


def _gray(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)


@functools.lru_cache(maxsize=64)
def _image(path: str) -> np.ndarray:
    """A template image as grayscale uint8 (cached: read once per process)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"image {p} not found")
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"{p} is not an image file PIL can read") from None


def _best_match(region: np.ndarray, template: np.ndarray) -> float:
    import cv2

    gray = _gray(region)
    if template.shape[0] > gray.shape[0] or template.shape[1] > gray.shape[1]:
        return 0.0
    if float(template.std()) == 0.0:  # a flat template: compare its level directly (CCOEFF is undefined)
        return float(1.0 - np.abs(gray.astype(np.float32) - float(template.flat[0])).mean() / 255.0)
    return float(cv2.matchTemplate(gray, template, cv2.TM_CCOEFF_NORMED).max())
