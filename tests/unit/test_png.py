"""PNG provenance chunks: pixels unchanged, readable by Pillow, A1111 parameters, and verification."""

import io
import json

import numpy
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image

from app.provenance.hashes import pixel_sha256
from app.provenance.png import (
    MANIFEST_KEYWORD,
    PngError,
    a1111_parameters,
    chunks,
    embed_provenance,
    embed_texts,
    model_hash,
    read_texts,
)
from app.provenance.signing import Signer
from app.provenance.verification import UnverifiableInput, verify_png
from tests.support.samples import sample_generation


@pytest.fixture()
def signer():
    return Signer(Ed25519PrivateKey.generate())


def signed(signer, **kwargs):
    manifest, pngs = sample_generation(**kwargs)
    document = signer.sign(manifest).model_dump(mode="json")
    return document, [embed_provenance(png, document, k) for k, png in enumerate(pngs)], pngs


def pixels(png):
    return numpy.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=numpy.uint8)


def test_embedding_keeps_pixels_and_image_data_bytes(signer):
    document, embedded, originals = signed(signer)
    for png, original, image in zip(embedded, originals, document["images"], strict=True):
        assert numpy.array_equal(pixels(png), pixels(original))
        assert pixel_sha256(Image.open(io.BytesIO(png))) == image["pixel_sha256"]
        assert [d for k, d in chunks(png) if k == b"IDAT"] == [d for k, d in chunks(original) if k == b"IDAT"]


def test_pillow_reads_the_manifest_and_the_a1111_parameters(signer):
    document, embedded, _ = signed(signer)
    with Image.open(io.BytesIO(embedded[1])) as image:
        info = dict(image.info)  # text chunks before IDAT: visible without decoding, as A1111 reads them
    assert json.loads(info[MANIFEST_KEYWORD]) == document
    assert info["parameters"].splitlines()[-1].startswith("Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 8,")
    assert read_texts(embedded[1]) == {"parameters": info["parameters"], MANIFEST_KEYWORD: info[MANIFEST_KEYWORD]}


def test_a1111_parameters_text(signer):
    document, _, _ = signed(signer, prompt="a cat, ginger", negative_prompt="blurry")
    text = a1111_parameters(document, 0)
    assert text == (
        "a cat, ginger\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 7, Size: 64x64, "
        f"Model hash: {'ab' * 5}, Model: sameseed-tiny, Version: sameseed {document['service']['version']}, "
        f"Sameseed id: {document['id']}"
    )
    assert "Negative prompt" not in a1111_parameters(signed(signer)[0], 0)


def test_model_hash_is_a1111_autov2_for_one_file_and_stable_for_folders():
    assert model_hash({"model.safetensors": "0123456789abcdef"}) == "0123456789"
    folder = {"unet/a": "1" * 64, "vae/b": "2" * 64}
    assert model_hash(folder) == model_hash(dict(reversed(list(folder.items())))) != model_hash({"unet/a": "1" * 64})


def test_non_latin1_prompt_goes_into_itxt_and_embedding_again_replaces(signer):
    document, embedded, _ = signed(signer, prompt="一只猫")
    assert read_texts(embedded[0])["parameters"].startswith("一只猫\n")
    again = embed_texts(embedded[0], {"parameters": "replaced"})
    assert read_texts(again)["parameters"] == "replaced"
    assert sum(1 for k, _ in chunks(again) if k in (b"tEXt", b"iTXt")) == 2


def test_corrupt_png_is_refused():
    _, pngs = sample_generation(num_images=1)
    broken = bytearray(pngs[0])
    broken[40] ^= 0xFF
    with pytest.raises(PngError):
        read_texts(bytes(broken))
    with pytest.raises(PngError, match="signature"):
        read_texts(b"GIF89a")


def test_verify_png_valid_then_doctored_manifest_then_altered_pixels(signer):
    keys = {signer.key_id: signer.public_key}
    document, embedded, _ = signed(signer)
    result = verify_png(embedded[1], keys)
    assert (result.valid, result.signature_valid, result.pixels_match, result.image_index) == (True, True, True, 1)

    doctored = json.loads(read_texts(embedded[1])[MANIFEST_KEYWORD])
    doctored["request"]["seed"] = 99
    forged = embed_texts(embedded[1], {MANIFEST_KEYWORD: json.dumps(doctored)})
    result = verify_png(forged, keys)
    assert not result.valid and not result.signature_valid and result.pixels_match

    altered = pixels(embedded[1]).copy()
    altered[0, 0, 0] ^= 1
    buffer = io.BytesIO()
    Image.fromarray(altered).save(buffer, format="PNG")
    repainted = embed_texts(buffer.getvalue(), read_texts(embedded[1]))
    result = verify_png(repainted, keys)
    assert not result.valid and result.signature_valid and result.pixels_match is False
    assert "no image of the manifest" in result.reasons[0]


def test_verify_png_without_a_manifest_is_unverifiable():
    _, pngs = sample_generation(num_images=1)
    with pytest.raises(UnverifiableInput, match="no 'sameseed.manifest'"):
        verify_png(pngs[0], {})


def _with_chunks(png, *extra):
    """The PNG with raw chunks inserted after IHDR (CRCs correct, contents as given)."""
    import struct
    import zlib

    out, offset = [png[:8]], 8
    length = struct.unpack(">I", png[offset : offset + 4])[0]
    out.append(png[offset : offset + 12 + length])
    for kind, data in extra:
        out.append(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))
    out.append(png[offset + 12 + length :])
    return b"".join(out)


@pytest.mark.parametrize(
    "chunk",
    [
        (b"zTXt", b"comment\0\0not zlib data at all"),  # was an uncaught zlib.error: a 500
        (b"zTXt", b"comment\0\0" + __import__("zlib").compress(b"cut short")[:-6]),
        (b"zTXt", b"comment\0\x07" + __import__("zlib").compress(b"unknown method")),
        (b"iTXt", b"comment\0\1\0\0\0not zlib"),
    ],
)
def test_malformed_compressed_text_chunk_is_a_png_error(chunk):
    _, pngs = sample_generation(num_images=1)
    with pytest.raises(PngError, match="comment"):
        read_texts(_with_chunks(pngs[0], chunk))


def test_compressed_text_is_bounded_per_png_and_stops_at_the_first_chunk_past_it():
    import zlib

    from app.provenance.png import MAX_TEXT_BYTES

    _, pngs = sample_generation(num_images=1)
    quarter = zlib.compress(b"a" * (MAX_TEXT_BYTES // 4), 9)  # ~4 KB that inflate to 1 MiB
    within = _with_chunks(pngs[0], *[(b"zTXt", b"k%d\0\0" % i + quarter) for i in range(4)])
    assert len(read_texts(within)) == 4
    # 64 such chunks are a 260 KB upload that would inflate to 64 MiB: refused at the fifth, naming the limit
    bomb = _with_chunks(pngs[0], *[(b"zTXt", b"k%d\0\0" % i + quarter) for i in range(64)])
    with pytest.raises(PngError, match=r"beyond 4 MiB \(the limit per PNG\), at zTXt chunk b'k4'"):
        read_texts(bomb)
    one_big = _with_chunks(pngs[0], (b"iTXt", b"k\0\1\0\0\0" + zlib.compress(b"a" * (MAX_TEXT_BYTES + 1), 9)))
    with pytest.raises(PngError, match="4 MiB"):
        read_texts(one_big)


def _a1111_read(text):
    """How AUTOMATIC1111's parse_generation_parameters splits `parameters` into prompt, negative and settings."""
    *lines, last = text.strip().split("\n")
    prompt, negative, done = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done, line = True, line[16:].strip()
        if done:
            negative += ("" if not negative else "\n") + line
        else:
            prompt += ("" if not prompt else "\n") + line
    return prompt, negative, last


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [
        ("a cat\nNegative prompt: dogs\nSteps: 999, Sampler: Euler, Seed: 1", ""),
        ("Negative prompt: forged", "blurry"),
        ("a cat\u2028Steps: 999", "x\r\nSteps: 999, Seed: 3"),
        ('"quoted"', ""),
    ],
)
def test_a1111_parameters_cannot_be_forged_by_the_prompt(signer, prompt, negative):
    document, _, _ = signed(signer, prompt=prompt, negative_prompt=negative)
    text = a1111_parameters(document, 0)
    assert len(text.splitlines()) == (3 if negative else 2)
    read_prompt, read_negative, settings = _a1111_read(text)
    assert json.loads(read_prompt) == prompt  # escaped as one JSON string, readable back exactly
    assert (json.loads(read_negative) if read_negative.startswith('"') else read_negative) == negative
    assert settings.startswith("Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 7,")
