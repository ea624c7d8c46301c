"""Video input for sampling: the frames of a folder of images or of a video file, one at a time.

A folder: every image file in it (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.webp``, ``.tif``, ``.tiff``; not
recursive, hidden files skipped), in name order with numbers compared as numbers (``f2`` before ``f10``); a
frame is named by its file's stem. A video file: read through imageio (``imageio.v3.imiter``; mp4 and most
formats need the ``video`` extra, imageio-ffmpeg; an animated GIF needs nothing more), frame i named
``{stem}_f{i:04d}``. Frames are read lazily, so a long video is never held in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from wt_model.data import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def natural_key(name: str) -> list:
    """Sort key comparing runs of digits as numbers: ``f2`` < ``f10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def frame_files(folder: Path) -> list[Path]:
    """The image files of ``folder`` in frame order."""
    files = [p for p in folder.iterdir()
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"frames {folder}: no image files ({', '.join(s[1:] for s in IMAGE_SUFFIXES)})")
    return sorted(files, key=lambda p: natural_key(p.name))


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError):
        raise DataError(f"frames {path}: not a readable image file") from None


def _video_frames(path: Path) -> Iterator[np.ndarray]:
    try:
        import imageio.v3 as iio
    except ImportError:
        raise DataError(f"video {path}: reading video files needs imageio (pip install 'world-tracing[video]'); "
                        "or pass a folder of frames") from None
    try:
        for frame in iio.imiter(path):
            frame = np.asarray(frame)
            if frame.ndim == 2:
                frame = np.repeat(frame[..., None], 3, axis=-1)
            yield np.ascontiguousarray(frame[..., :3]).astype(np.uint8, copy=False)
    except Exception as e:  # imageio raises many types: no plugin for the format, a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"video {path}: cannot be read ({first}); mp4 and most formats need imageio-ffmpeg "
                        "(pip install 'world-tracing[video]'), or pass a folder of frames") from None


def iter_frames(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, (H,W,3) uint8 frame) of a folder of images or a video file, in order, one at a time. All frames
    must have the first frame's size (one-line :class:`DataError` otherwise)."""
    path = Path(path)
    if path.is_dir():
        frames = ((p.stem, _read_image(p)) for p in frame_files(path))
    elif path.is_file():
        frames = ((f"{path.stem}_f{i:04d}", f) for i, f in enumerate(_video_frames(path)))
    else:
        raise DataError(f"video {path}: no such file or folder")
    size, count = None, 0
    for name, frame in frames:
        if size is None:
            size = frame.shape[:2]
        elif frame.shape[:2] != size:
            raise DataError(f"video {path}: frame {name} is {frame.shape[1]}x{frame.shape[0]}, the first frame is "
                            f"{size[1]}x{size[0]}; a clip needs one size")
        count += 1
        yield name, frame
    if count == 0:
        raise DataError(f"video {path}: no frames")
