"""Uploads -> validated, decoded, preprocessed pixels, or a 4xx that names the image and the problem.

Everything a client sends passes through here before it reaches the model: the request is parsed by us (not by
BentoML's file/PIL types, which answer an undecodable upload with a 500 and fetch URLs given as text), sizes are
checked before bytes are decoded, only the listed image formats may run a decoder, and every failure becomes a
``serving.errors.RequestError`` with a 4xx status, so one bad image costs its own request and nothing else.

The work a request may cause is bounded before any pixel is decoded: bodies by Content-Length (JSON far lower than
multipart, since JSON is held in memory whole), then every image's header is read (``inspect``) for its pixels,
side lengths and aspect ratio, and the request's total pixels against its budget. Only then are images decoded,
one job per image, on the service's fair pool (``serving.fair``).

Two request shapes are accepted, each with the same fields:

- ``multipart/form-data``: one or more ``images`` file parts, optional ``k`` (curl ``-F images=@a.jpg -F k=5``);
- ``application/json``: ``{"images": ["<base64>", ...], "k": 5}``; a ``data:image/...;base64,`` prefix is allowed.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import numpy as np
import torch
from starlette.datastructures import UploadFile
from starlette.requests import Request

from mae.images import ImageError, ImageTooLargeError, Preprocessing, decode_image
from serving.errors import RequestError
from serving.settings import Limits

# PIL decoders that may run on bytes from the network. Formats that shell out (EPS -> Ghostscript) or are rarely
# seen and less hardened are refused with a clear message instead.
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
MAX_K = 100


@dataclass
class Upload:
    """One image as received: where it came from (for messages) and its encoded bytes."""

    label: str
    data: bytes
    filename: str | None = None
    """The client's file name (multipart uploads), kept for files the server stores (``POST /items``)."""


@dataclass
class ImagesRequest:
    """A parsed request: the uploads in order and the options that came with them."""

    uploads: list[Upload]
    k: int = 5
    fields: dict[str, Any] = field(default_factory=dict)
    """Other fields the endpoint takes (``extra``): a list of strings per multipart field, the value in JSON."""


@dataclass(frozen=True)
class Header:
    """What an image's header says, read without decoding it."""

    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


class _BodyTooLarge(Exception):
    pass


def _capped(request: Request, cap: int) -> Request:
    """The same request, whose body stream stops with ``_BodyTooLarge`` once it passes ``cap`` bytes.

    A Content-Length over the cap is refused before reading; a chunked upload is cut off as soon as it passes it,
    so neither memory nor the temporary files multipart parsing spools to can be filled by one request.
    """
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise _BodyTooLarge
    seen = 0
    receive = request.receive

    async def counting_receive() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > cap:
                raise _BodyTooLarge
        return message

    return Request(request.scope, counting_receive)


async def parse_request(request: Request, limits: Limits, allow_k: bool = True,
                        extra: Sequence[str] = ()) -> ImagesRequest:
    """Read the images (and ``k`` where ``allow_k``, and the ``extra`` fields) out of a multipart or JSON request;
    problems are 4xx errors."""
    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    cap = limits.body_cap(media_type)
    try:
        capped = _capped(request, cap)
        if media_type == "multipart/form-data":
            parsed = await _parse_multipart(capped, limits, allow_k, extra)
        elif media_type in ("application/json", ""):
            parsed = await _parse_json(capped, limits, allow_k, extra)
        else:
            raise RequestError(f"unsupported Content-Type {media_type!r}: send multipart/form-data with image files "
                               "(curl -F images=@photo.jpg) or application/json with base64 strings "
                               '({"images": ["..."]})', HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    except _BodyTooLarge:
        hint = ("; send large images as multipart files (curl -F images=@photo.jpg)"
                if cap < limits.body_cap("multipart/form-data") else "")
        raise RequestError(f"request body is over the limit of {cap} bytes for "
                           f"{media_type or 'application/json'}{hint}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE) from None
    if not parsed.uploads:
        raise RequestError("the request has no images: send one or more 'images' (multipart files or base64 strings)")
    if len(parsed.uploads) > limits.max_images:
        raise RequestError(f"{len(parsed.uploads)} images is over the limit of {limits.max_images} per request",
                           HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    return parsed


def _parse_k(value: Any) -> int:
    if isinstance(value, str):
        value = value.strip()
        if re.fullmatch(r"[+-]?\d+", value):
            value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_K:
        raise RequestError(f"k must be an integer from 1 to {MAX_K}, got {value!r}")
    return value


def _fields(allow_k: bool, extra: Sequence[str] = ()) -> str:
    optional = (["'k'"] if allow_k else []) + [f"'{name}'" for name in extra]
    return "'images'" + (f" and optionally {', '.join(optional)}" if optional else "")


def _too_big(label: str, size: int, limits: Limits) -> RequestError:
    return RequestError(f"{label}: {size} bytes is over the limit of {limits.max_image_bytes} bytes per image",
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


async def _parse_multipart(request: Request, limits: Limits, allow_k: bool, extra: Sequence[str] = ()
                           ) -> ImagesRequest:
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        form = await request.form(max_files=limits.max_images + 1, max_fields=8 + 2 * limits.max_images * len(extra),
                                  max_part_size=64 * 1024)
    except (MultiPartException, HTTPException) as e:
        message = getattr(e, "message", None) or getattr(e, "detail", None) or str(e)
        if "Too many files" in message:
            raise RequestError(f"more than {limits.max_images} images in one request is over the limit",
                               HTTPStatus.REQUEST_ENTITY_TOO_LARGE) from e
        raise RequestError(f"malformed multipart body: {message}") from e
    except _BodyTooLarge:
        raise
    except Exception as e:  # the multipart parser's own errors on garbage input
        raise RequestError(f"malformed multipart body ({type(e).__name__}: {e})") from e
    try:
        uploads: list[Upload] = []
        k = 5
        fields: dict[str, list[str]] = {}
        for key, value in form.multi_items():
            if key == "images":
                label = f"image {len(uploads) + 1}"
                if not isinstance(value, UploadFile):
                    raise RequestError(f"{label}: the 'images' field holds text, not a file; upload the file itself "
                                       "(curl -F images=@photo.jpg) or send JSON with base64 strings")
                if value.filename:
                    label += f" {value.filename!r}"
                if value.size is not None and value.size > limits.max_image_bytes:
                    raise _too_big(label, value.size, limits)
                uploads.append(Upload(label, await value.read(), value.filename or None))
                if len(uploads) > limits.max_images:
                    break
            elif key == "k" and allow_k:
                k = _parse_k(value if isinstance(value, str) else (await value.read()).decode("utf-8", "replace"))
            elif key in extra:
                text = value if isinstance(value, str) else (await value.read()).decode("utf-8", "replace")
                fields.setdefault(key, []).append(text)
            else:
                raise RequestError(f"unknown field {key!r}; this endpoint takes {_fields(allow_k, extra)}")
    finally:
        await form.close()
    return ImagesRequest(uploads, k, fields)


_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[\w=.+-]+)*;base64,", re.IGNORECASE)


async def _parse_json(request: Request, limits: Limits, allow_k: bool, extra: Sequence[str] = ()) -> ImagesRequest:
    """Read the body, then decode it on a worker thread: JSON and base64 decoding grow with the body (up to
    ``Limits.max_json_bytes``), and nothing that grows with a request's input runs on the event loop."""
    import anyio

    body = b"".join([chunk async for chunk in request.stream()])
    return await anyio.to_thread.run_sync(_json_request, body, limits, allow_k, extra)


def _json_request(body: bytes, limits: Limits, allow_k: bool, extra: Sequence[str]) -> ImagesRequest:
    if not body.strip():
        raise RequestError('empty body: send {"images": ["<base64>", ...]} or multipart image files')
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not valid JSON ({e})") from e
    except RecursionError:
        raise RequestError("the body is not valid JSON for this API: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise RequestError(f"the body is not valid JSON for this API ({e})") from None
    if not isinstance(payload, dict):
        raise RequestError(f'the JSON body must be an object like {{"images": ["<base64>"]}}, '
                           f'got {type(payload).__name__}')
    unknown = sorted(set(payload) - ({"images", "k"} if allow_k else {"images"}) - set(extra))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; this endpoint takes {_fields(allow_k, extra)}")
    images = payload.get("images")
    if images is None:
        raise RequestError('the JSON body has no "images": send {"images": ["<base64>", ...]}')
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list):
        raise RequestError(f'"images" must be a list of base64 strings, got {type(images).__name__}')
    if len(images) > limits.max_images:
        raise RequestError(f"{len(images)} images is over the limit of {limits.max_images} per request",
                           HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    uploads = [Upload(f"image {i + 1}", _b64decode(s, f"image {i + 1}", limits)) for i, s in enumerate(images)]
    return ImagesRequest(uploads, _parse_k(payload.get("k", 5)), {key: payload[key] for key in extra if key in payload})


def _b64decode(value: Any, label: str, limits: Limits) -> bytes:
    if not isinstance(value, str):
        raise RequestError(f"{label}: expected a base64 string, got {type(value).__name__}")
    text = _DATA_URL.sub("", value.strip(), count=1)
    text = re.sub(r"\s+", "", text)
    if len(text) * 3 // 4 > limits.max_image_bytes + 2:
        raise _too_big(label, len(text) * 3 // 4, limits)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{label}: not valid base64 ({e})") from e
    if len(data) > limits.max_image_bytes:
        raise _too_big(label, len(data), limits)
    if not data:
        raise RequestError(f"{label}: empty image")
    return data


def inspect(upload: Upload, limits: Limits) -> Header:
    """Read an image's header (no pixels) and check it against the per-image limits; 4xx errors name the image.

    Pixels bound memory; side lengths and aspect ratio bound the resize, whose output grows with the long side
    once the short side is scaled to the model's input (a 100000x1 image becomes 36 x 3.6 million pixels).
    """
    from PIL import Image, UnidentifiedImageError

    if not upload.data:
        raise RequestError(f"{upload.label}: empty file")
    try:
        with Image.open(io.BytesIO(upload.data), formats=list(ALLOWED_FORMATS)) as im:
            header = Header(int(im.width), int(im.height))
    except Image.DecompressionBombError as e:
        raise RequestError(f"{upload.label}: too many pixels ({e})", HTTPStatus.REQUEST_ENTITY_TOO_LARGE) from None
    except UnidentifiedImageError:
        raise RequestError(f"{upload.label}: not a recognised image format "
                           f"(accepted: {', '.join(ALLOWED_FORMATS)})") from None
    except Exception as e:  # a damaged header: PIL raises OSError, SyntaxError, struct.error, ...
        raise RequestError(f"{upload.label}: corrupt or truncated image ({type(e).__name__}: {e})") from None
    size = f"{header.width}x{header.height} pixels"
    too_large = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    if min(header.width, header.height) < 1:
        raise RequestError(f"{upload.label}: {size}: an image needs at least one pixel each way")
    if header.pixels > limits.max_image_pixels:
        raise RequestError(f"{upload.label}: {size} is over the limit of {limits.max_image_pixels}", too_large)
    if max(header.width, header.height) > limits.max_image_side:
        raise RequestError(f"{upload.label}: {size}: a side over the limit of {limits.max_image_side} pixels",
                           too_large)
    ratio = max(header.width, header.height) / min(header.width, header.height)
    if ratio > limits.max_aspect_ratio:
        raise RequestError(f"{upload.label}: {size}: aspect ratio {ratio:.0f}:1 is over the limit of "
                           f"{limits.max_aspect_ratio}:1", too_large)
    return header


def inspect_all(uploads: Sequence[Upload], limits: Limits) -> list[Header]:
    """``inspect`` every upload, then hold the request to its decode budget (the sum of its images' pixels)."""
    headers = [inspect(u, limits) for u in uploads]
    total = sum(h.pixels for h in headers)
    if total > limits.max_request_pixels:
        raise RequestError(f"the {len(uploads)} images hold {total} pixels in all, over the limit of "
                           f"{limits.max_request_pixels} per request: send fewer or smaller images per request",
                           HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    return headers


def decode(upload: Upload, limits: Limits) -> np.ndarray:
    """Bytes -> uint8 (H, W[, C]) array, or a 4xx naming the image: 413 over a size limit, 400 otherwise."""
    inspect(upload, limits)  # a header read: whoever calls decode gets the side and aspect limits too
    try:
        return decode_image(upload.data, name=upload.label, max_pixels=limits.max_image_pixels,
                            formats=ALLOWED_FORMATS)
    except ImageTooLargeError as e:
        raise RequestError(str(e), HTTPStatus.REQUEST_ENTITY_TOO_LARGE) from e
    except ImageError as e:
        raise RequestError(str(e)) from e
    except Exception as e:  # a decoder bug on hostile bytes must still answer 4xx, not take the request down as 500
        raise RequestError(f"{upload.label}: could not be decoded ({type(e).__name__}: {e})") from e


def preprocess(upload: Upload, limits: Limits, preprocessing: Preprocessing) -> torch.Tensor:
    """One upload -> float32 (C, H, W), exactly what ``Embedder.preprocess`` makes of the same image."""
    array = decode(upload, limits)
    try:
        return preprocessing(array)
    except ImageError as e:
        raise RequestError(f"{upload.label}: {e}") from e


def to_pixels(uploads: Sequence[Upload], limits: Limits, preprocessing: Preprocessing) -> np.ndarray:
    """Check the request's budget, then decode and preprocess every upload in turn: float32 (N, C, H, W).

    The service runs the same steps as separate jobs on its fair pool; this is the in-process form.
    """
    inspect_all(uploads, limits)
    return torch.stack([preprocess(u, limits, preprocessing) for u in uploads]).numpy()  # (N, C, H, W)
