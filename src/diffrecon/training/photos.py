"""Grey-scale photographs and micrographs that ship inside installed packages (no download).

Split (see benchmarks/external.py): ``TEST_PHOTOS`` are held out for the independent
evaluation and never returned by :func:`training_photos`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

SKIMAGE_TRAIN = ("coffee", "rocket", "coins", "moon", "text", "page", "horse", "clock", "brick",
                 "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
                 "stereo_motorcycle", "retina", "cell", "colorwheel", "logo")
TEST_PHOTOS = ("camera", "astronaut", "chelsea", "china")  # skimage's `cat` is `chelsea`


def _grey(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 3:
        img = img[..., :3].astype(np.float64) @ np.array([0.2125, 0.7154, 0.0721])
        img = img / (255.0 if img.max() > 1.5 else 1.0)
    elif img.dtype == bool:
        img = img.astype(np.float64)
    else:
        img = img.astype(np.float64) / (255.0 if img.max() > 1.5 else 1.0)
    return img.astype(np.float32)


def _skimage(name: str) -> np.ndarray | None:
    from skimage import data

    fn = getattr(data, name, None)
    try:
        img = None if fn is None else fn()
        if isinstance(img, tuple):   # stereo pairs: the left image
            img = img[0]
        return None if img is None else _grey(img)
    except Exception:  # noqa: BLE001 - an image that needs a download is simply skipped
        return None


@functools.lru_cache(maxsize=1)
def training_photos() -> tuple[np.ndarray, ...]:
    """The training photographs, grey float32 in [0, 1], at least 128 px on each side."""
    out = [img for name in SKIMAGE_TRAIN if (img := _skimage(name)) is not None]
    import matplotlib
    from PIL import Image

    extra = [Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"]
    try:
        import sklearn

        extra.append(Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg")
    except ImportError:
        pass
    out += [_grey(np.asarray(Image.open(p))) for p in extra if p.is_file()]
    return tuple(img for img in out if min(img.shape) >= 128)


def test_photo(name: str) -> np.ndarray:
    """One held-out test photograph, grey float32 in [0, 1]."""
    if name not in TEST_PHOTOS:
        raise ValueError(f"unknown test photo {name!r}; valid: {', '.join(TEST_PHOTOS)}")
    if name == "china":
        import sklearn
        from PIL import Image

        path = Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg"
        return _grey(np.asarray(Image.open(path)))
    return _skimage(name)
