"""PNG text chunks: embed the signed manifest (iTXt `sameseed.manifest`) and A1111 `parameters`.

Chunks are inserted before the first IDAT by rewriting the chunk list only: the image data
chunks are copied byte for byte, so the decoded pixels (and their pixel_sha256) cannot change.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

from app.provenance.manifest import canonical_json

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MANIFEST_KEYWORD = "sameseed.manifest"
PARAMETERS_KEYWORD = "parameters"
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
MAX_TEXT_BYTES = 4 << 20
"""Decompressed text one PNG may hold, all zTXt/iTXt chunks together (a signed manifest is a few KB).

A compressed chunk inflates ~1,000x, so the budget is for the whole PNG, and inflating stops at
the first chunk that would pass it: any upload then costs at most its size plus this in memory.
"""

# AUTOMATIC1111's display names, so its PNG Info tab and tools reading `parameters` recognise them.
A1111_SAMPLER_NAMES: Mapping[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "ddim": "DDIM",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "pndm": "PLMS",
    "lms": "LMS",
    "heun": "Heun",
    "unipc": "UniPC",
}


class PngError(ValueError):
    """The bytes are not a well-formed PNG (bad signature, truncated chunk, CRC mismatch)."""


def chunks(png: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield (type, data) of every chunk, checking lengths and CRCs; PngError on malformed input."""
    if not png.startswith(PNG_SIGNATURE):
        raise PngError("not a PNG file (bad signature)")
    offset = len(PNG_SIGNATURE)
    while offset < len(png):
        if offset + 8 > len(png):
            raise PngError("truncated PNG chunk header")
        length, kind = struct.unpack(">I4s", png[offset : offset + 8])
        end = offset + 8 + length + 4
        if end > len(png):
            raise PngError(f"truncated PNG chunk {kind!r}")
        data = png[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", png[end - 4 : end])
        if zlib.crc32(kind + data) != crc:
            raise PngError(f"CRC mismatch in PNG chunk {kind!r}")
        yield kind, data
        offset = end
        if kind == b"IEND":
            return
    raise PngError("PNG has no IEND chunk")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


class TextBudget:
    """How many decompressed text bytes a PNG may still produce; PngError naming the limit once spent."""

    def __init__(self, limit: int = MAX_TEXT_BYTES) -> None:
        self.limit = limit
        self.left = limit

    def inflate(self, kind: bytes, keyword: bytes, data: bytes) -> bytes:
        """Decompress one chunk's text, never producing more than the budget left."""
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(data, self.left + 1)
        except zlib.error as exc:
            raise PngError(f"undecodable {kind.decode()} chunk {keyword!r}: {exc}") from None
        if len(out) > self.left:
            raise PngError(
                f"the PNG's compressed text chunks inflate beyond {self.limit >> 20} MiB "
                f"(the limit per PNG), at {kind.decode()} chunk {keyword!r}"
            )
        if not inflater.eof:
            raise PngError(f"undecodable {kind.decode()} chunk {keyword!r}: truncated compressed data")
        self.left -= len(out)
        return out


def text_chunk(keyword: str, text: str, *, compress: bool = False) -> bytes:
    """One text chunk: tEXt when the text is Latin-1 and uncompressed, else iTXt (UTF-8)."""
    key = keyword.encode("latin-1")
    if not compress:
        try:
            return _chunk(b"tEXt", key + b"\0" + text.encode("latin-1"))
        except UnicodeEncodeError:
            pass
    body = text.encode("utf-8")
    flag = b"\1\0" if compress else b"\0\0"
    payload = zlib.compress(body, 9) if compress else body
    return _chunk(b"iTXt", key + b"\0" + flag + b"\0" + b"\0" + payload)


def _parse_text(kind: bytes, data: bytes, budget: TextBudget) -> tuple[str, str]:
    keyword, sep, rest = data.partition(b"\0")
    if not sep:
        raise PngError(f"{kind.decode()} chunk without a keyword separator")
    if kind == b"tEXt":
        return keyword.decode("latin-1"), rest.decode("latin-1")
    if kind == b"zTXt":
        if rest[:1] != b"\0":  # 0 (zlib) is the only compression method PNG defines
            raise PngError(f"zTXt chunk {keyword!r} has no or an unknown compression method")
        return keyword.decode("latin-1"), budget.inflate(kind, keyword, rest[1:]).decode("latin-1")
    if len(rest) < 2:
        raise PngError("truncated iTXt chunk")
    compressed, rest = rest[0], rest[2:]
    _language, _, rest = rest.partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    try:
        return keyword.decode("latin-1"), (budget.inflate(kind, keyword, text) if compressed else text).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PngError(f"undecodable iTXt chunk {keyword!r}: {exc}") from None


def read_texts(png: bytes) -> dict[str, str]:
    """Every tEXt/zTXt/iTXt keyword and its text (the first chunk wins for a repeated keyword)."""
    texts: dict[str, str] = {}
    budget = TextBudget()
    for kind, data in chunks(png):
        if kind in _TEXT_CHUNKS:
            keyword, text = _parse_text(kind, data, budget)
            texts.setdefault(keyword, text)
    return texts


def embed_texts(png: bytes, texts: Mapping[str, str], *, compressed: frozenset[str] = frozenset()) -> bytes:
    """Return the PNG with these text chunks before the first IDAT (same keywords replaced); pixels unchanged."""
    out = [PNG_SIGNATURE]
    inserted = False
    budget = TextBudget()
    for kind, data in chunks(png):
        if kind in _TEXT_CHUNKS and _parse_text(kind, data, budget)[0] in texts:
            continue
        if kind == b"IDAT" and not inserted:
            out.extend(text_chunk(k, v, compress=k in compressed) for k, v in texts.items())
            inserted = True
        out.append(_chunk(kind, data))
    if not inserted:
        raise PngError("PNG has no IDAT chunk")
    return b"".join(out)


def _quote(value: str) -> str:
    # A1111's infotext quoting: values holding a separator are JSON strings.
    return canonical_json(value).decode("utf-8") if any(c in value for c in ",:\n") else value


_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")  # every break str.splitlines() knows


def prompt_text(prompt: str) -> str:
    """A prompt as A1111 `parameters` holds it: as-is, or a JSON string when a reader could misread it.

    A reader splits `parameters` into lines and takes a line starting `Negative prompt:` (or a last
    line of settings) for what it says, so a prompt with a line break, or one starting so, could
    forge settings; such a prompt (and one starting with a quote) is written as one JSON string.
    """
    if any(c in _LINE_BREAKS for c in prompt) or prompt.lstrip().startswith(('"', "Negative prompt:")):
        return json.dumps(prompt)  # ASCII escapes: no raw line break of any kind survives
    return prompt


def model_hash(files: Mapping[str, str]) -> str:
    """A1111-style short model hash: a single file's sha256[:10] (A1111's AutoV2), else of the files map."""
    if len(files) == 1:
        return next(iter(files.values()))[:10]
    return hashlib.sha256(canonical_json(dict(sorted(files.items())))).hexdigest()[:10]


def a1111_parameters(manifest: Mapping[str, Any], index: int) -> str:
    """The AUTOMATIC1111 `parameters` text of image `index`: prompt, negative prompt, then one settings line."""
    request, model = manifest["request"], manifest["model"]
    image = next(i for i in manifest["images"] if i["index"] == index)
    settings = {
        "Steps": str(request["steps"]),
        "Sampler": A1111_SAMPLER_NAMES.get(request["sampler"], request["sampler"]),
        "CFG scale": f"{request['guidance_scale']:g}",
        "Seed": str(image["seed"]),
        "Size": f"{image['width']}x{image['height']}",
        "Model hash": model_hash(model["files"]),
        "Model": model["id"],
        "Version": f"sameseed {manifest['service']['version']}",
        "Sameseed id": manifest["id"],
    }
    lines = [prompt_text(request["prompt"])]
    if request["negative_prompt"]:
        lines.append(f"Negative prompt: {prompt_text(request['negative_prompt'])}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in settings.items()))
    return "\n".join(lines)


def embed_provenance(png: bytes, signed_manifest: Mapping[str, Any], index: int) -> bytes:
    """Embed the signed manifest (compressed iTXt) and the A1111 `parameters` text of image `index`."""
    return embed_texts(
        png,
        {
            PARAMETERS_KEYWORD: a1111_parameters(signed_manifest, index),
            MANIFEST_KEYWORD: canonical_json(signed_manifest).decode("utf-8"),
        },
        compressed=frozenset({MANIFEST_KEYWORD}),
    )
