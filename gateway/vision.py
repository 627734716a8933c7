"""Vision requests: finding image parts, checking them, and which models may take them.

A request is a vision request when a chat message has an ``image_url`` part, a Responses API
input item has an ``input_image`` part, or it comes to ``vision/analyze``. Every image is checked
before anything goes upstream: only ``http(s)://`` URLs and ``data:image/...;base64,`` URLs, the
latter at most ``[vision] max_image_bytes`` once decoded; image parts only in user messages; and
only for models matching ``[vision] models``. Each refusal is a 400 whose ``param`` is the path
of the offending field (``messages[0].content[1].image_url.url``).
"""

from __future__ import annotations

import fnmatch
from typing import Any

from .errors import InvalidRequest
from .request_body import kind_of
from .settings import VisionSettings

DETAILS = ("auto", "low", "high")


def _bad(param: str, message: str, code: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def check_image_url(url: Any, param: str, max_bytes: int) -> None:
    """An image reference the upstream can fetch or decode, within the size limit."""
    if not isinstance(url, str):
        raise _bad(param, f"'{param}' must be a string (an https:// or data: URL), "
                          f"not {kind_of(url)}")
    if url.startswith(("https://", "http://")):
        return
    if not url.startswith("data:"):
        raise _bad(param, f"'{param}' must be an http(s) URL or a data: URL",
                   code="invalid_image_url")
    header, comma, payload = url.partition(",")
    media, _, encoding = header[5:].partition(";")
    if not comma or encoding != "base64" or not media.startswith("image/"):
        raise _bad(param, f"'{param}' must be a base64 data: URL of an image "
                          "(data:image/png;base64,...)", code="invalid_image_url")
    # Decoded size without decoding: 3 bytes per 4 characters, less the padding.
    size = len(payload) * 3 // 4 - payload[-2:].count("=")
    if size > max_bytes:
        raise _bad(param, f"The image in '{param}' is {size} bytes; the limit is {max_bytes} "
                          "bytes", code="image_too_large")


def chat_images(messages: list[Any], max_bytes: int) -> list[str]:
    """The paths of the image parts in chat ``messages``, each checked."""
    found: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, f"'{where}' must be an object, not {kind_of(message)}")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _bad(f"{where}.content", f"'{where}.content' must be a string or an array "
                                           f"of content parts, not {kind_of(content)}")
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = _part_type(part, at)
            if kind != "image_url":
                continue
            if message.get("role") != "user":
                raise _bad(at, f"'{at}': image parts are only allowed in user messages",
                           code="image_not_allowed")
            image = part.get("image_url")
            if not isinstance(image, dict):
                raise _bad(f"{at}.image_url", f"'{at}.image_url' must be an object with a "
                                              f"'url', not {kind_of(image)}")
            check_image_url(image.get("url"), f"{at}.image_url.url", max_bytes)
            check_detail(image.get("detail"), f"{at}.image_url.detail")
            found.append(at)
    return found


def responses_images(items: Any, max_bytes: int) -> list[str]:
    """The paths of the ``input_image`` parts in a Responses API ``input``, each checked."""
    if items is None or isinstance(items, str):
        return []
    if not isinstance(items, list):
        raise _bad("input", f"'input' must be a string or an array of input items, "
                            f"not {kind_of(items)}")
    found: list[str] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(where, f"'{where}' must be an object, not {kind_of(item)}")
        content = item.get("content")
        if not isinstance(content, list):
            continue  # text content, or an item of another kind (function_call_output, ...)
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            if _part_type(part, at) != "input_image":
                continue
            if item.get("role", "user") != "user":
                raise _bad(at, f"'{at}': images are only allowed in user input",
                           code="image_not_allowed")
            if part.get("image_url") is not None or part.get("file_id") is None:
                check_image_url(part.get("image_url"), f"{at}.image_url", max_bytes)
            check_detail(part.get("detail"), f"{at}.detail")
            found.append(at)
    return found


def _part_type(part: Any, at: str) -> Any:
    if not isinstance(part, dict):
        raise _bad(at, f"'{at}' must be an object, not {kind_of(part)}")
    kind = part.get("type")
    if not isinstance(kind, str):
        raise _bad(f"{at}.type", f"'{at}.type' must be a string, not {kind_of(kind)}")
    return kind


def check_detail(detail: Any, param: str) -> None:
    if detail is not None and detail not in DETAILS:
        raise _bad(param, f"'{param}' must be one of {', '.join(DETAILS)}")


def sees_images(settings: VisionSettings, *models: str) -> bool:
    return any(fnmatch.fnmatchcase(m, p) for m in models for p in settings.models)


def require_vision_model(settings: VisionSettings, model: str, upstream: str,
                         param: str) -> None:
    """Refuse an image for a model that cannot take one; ``param`` names the image."""
    if not sees_images(settings, model, upstream):
        raise _bad(param, f"Model '{model}' does not accept images ('{param}'); vision models "
                          f"are those matching {', '.join(settings.models)}",
                   code="model_not_vision_capable")


def analyze_to_chat(body: dict[str, Any], upstream: str) -> dict[str, Any]:
    """A ``vision/analyze`` request as the chat completion it stands for. Fields other than the
    vision ones (``max_tokens``, ``temperature``, ``stream_options``, ...) go along as they are."""
    image: dict[str, Any] = {"url": body["image"]}
    if body.get("detail") is not None:
        image["detail"] = body["detail"]
    rest = {k: v for k, v in body.items() if k not in ("image", "prompt", "detail")}
    return {**rest, "model": upstream, "messages": [{"role": "user", "content": [
        {"type": "text", "text": body["prompt"]},
        {"type": "image_url", "image_url": image}]}]}
