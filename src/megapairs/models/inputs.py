"""What a retriever accepts from a user, normalised to plain lists.

Images are given as a path (`str` or `os.PathLike`), a PIL image, or a list of
either; texts as a string or a list of strings. A single item becomes a list of
one. Nothing is broadcast: a composed query needs exactly one image per text, and
`check_batch_lengths` refuses lists of different lengths rather than repeating a
lone image or text.

Images are made upright and RGB the way the pipeline's own decoder does it
(`megapairs.corpus.images`: EXIF orientation, alpha composited on white), so an
image gives the same pixels whether it is passed as a path or as a PIL image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias, TypeGuard

from PIL import Image

from megapairs.corpus.images import ImageRejected, normalise, open_rgb

ImageInput: TypeAlias = str | os.PathLike[str] | Image.Image
ImagesInput: TypeAlias = ImageInput | Sequence[ImageInput]
TextsInput: TypeAlias = str | Sequence[str]


class ImageLoadError(OSError):
    """An image file that cannot be opened or decoded; the message names the file."""


def as_image_list(images: ImagesInput) -> list[ImageInput]:
    """`images` as a list of paths and PIL images, none opened yet (for lazy batching)."""
    items: list[object] = list(images) if _is_sequence(images) else [images]
    for position, item in enumerate(items):
        if not isinstance(item, str | os.PathLike | Image.Image):
            raise TypeError(
                f"image {position} is a {type(item).__name__}; expected a path "
                "(str or pathlib.Path) or a PIL.Image.Image"
            )
    return items  # type: ignore[return-value]  # checked item by item above


def load_image(image: ImageInput) -> Image.Image:
    """One upright RGB image from a path or a PIL image (a PIL image is copied, not changed)."""
    if isinstance(image, Image.Image):
        return normalise(image.copy())
    path = Path(image)
    try:
        return open_rgb(path.read_bytes())
    except (OSError, ImageRejected) as err:
        raise ImageLoadError(f"cannot open image {str(path)!r}: {err}") from err


def load_images(images: ImagesInput) -> list[Image.Image]:
    """Every image of `images` (a path, a PIL image or a list of either), upright and RGB."""
    return [load_image(image) for image in as_image_list(images)]


def as_text_list(text: TextsInput) -> list[str]:
    """`text` (a string or a list of strings) as a list of strings."""
    texts: list[object] = list(text) if _is_sequence(text) else [text]
    for position, item in enumerate(texts):
        if not isinstance(item, str):
            raise TypeError(f"text {position} is a {type(item).__name__}; expected a str")
    return texts  # type: ignore[return-value]  # checked item by item above


def check_batch_lengths(images: Sequence[object] | None, texts: Sequence[object] | None) -> None:
    """Refuse a composed batch whose image and text lists differ in length.

    Either may be None (an image-only or text-only batch). A single image is never
    repeated for several texts, nor a single text for several images: pass lists of
    equal length."""
    if images is None or texts is None or len(images) == len(texts):
        return
    raise ValueError(
        f"got {len(images)} image(s) and {len(texts)} text(s): a composed query needs "
        "exactly one image per text; repeat the image or the text yourself if that is meant"
    )


def _is_sequence(value: object) -> TypeGuard[Sequence[Any]]:
    """A list-like of items, not a single item (a string is one text or one path)."""
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)
