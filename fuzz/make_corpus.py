#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (fuzz/corpus/<target>/) from the repository's
fixtures. Seeds are small (a few KB at most): libFuzzer mutates them, so a valid file of each
kind matters, not its size."""

import base64
import json
import pathlib
import struct

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
VIDEOS = ROOT / "crates" / "mmhash" / "tests" / "fixtures" / "videos"
CORPUS = ROOT / "fuzz" / "corpus"


def write(target, name, data):
    path = CORPUS / target / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def tiff(orientation):
    """Big-endian TIFF, one IFD0 entry: Orientation."""
    return b"MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01" + struct.pack(">H", orientation) + bytes(6)


def jpeg_small(jpeg, orientation=None):
    """The JPEG's header segments up to and including SOS, a few scan bytes, EOI: what probe
    reads, without the megabytes of scan data."""
    at, out = 2, [jpeg[:2]]
    if orientation is not None:
        payload = b"Exif\0\0" + tiff(orientation)
        out.append(b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload)
    while True:
        marker = jpeg[at + 1]
        length = struct.unpack(">H", jpeg[at + 2 : at + 4])[0]
        out.append(jpeg[at : at + 2 + length])
        at += 2 + length
        if marker == 0xDA:
            return b"".join(out) + jpeg[at : at + 16] + b"\xff\xd9"


def webp_small(webp):
    """The lossless WebP's first chunk cut to 64 bytes, chunk and RIFF sizes fixed up."""
    body = webp[20:84]
    return b"RIFF" + struct.pack("<I", 12 + len(body)) + b"WEBPVP8L" + struct.pack("<I", len(body)) + body


def webp_exif(orientation):
    exif = tiff(orientation)
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([8, 0, 0, 0, 0x1F, 0x03, 0, 0x0F, 0x02, 0])
    chunk = b"EXIF" + struct.pack("<I", len(exif)) + exif
    body = b"WEBP" + vp8x + chunk
    return b"RIFF" + struct.pack("<I", len(body)) + body


def bmp(width, height, bpp=24):
    stride = (width * bpp + 31) // 32 * 4
    pixels = bytes(stride * abs(height))
    header = b"BM" + struct.pack("<IIIIiiHHIIiiII", 54 + len(pixels), 0, 54, 40, width, height, 1, bpp, 0, len(pixels), 0, 0, 0, 0)
    return header + pixels


GIF_1X1 = base64.b64decode("R0lGODlhAQABAAAAACwAAAAAAQABAAACAkQBADs=")


def images():
    images = FIXTURES / "images"
    png = (images / "coffee_tiny_40x30.png").read_bytes()
    write("image_header", "png_40x30", png)
    write("image_header", "not_an_image", (images / "not_an_image.png").read_bytes())
    rocket = (images / "rocket.jpg").read_bytes()
    write("image_header", "jpeg_header", jpeg_small(rocket))
    write("image_header", "jpeg_exif_6", jpeg_small(rocket, orientation=6))
    write("image_header", "jpeg_truncated_header", (images / "rocket_truncated_header.jpg").read_bytes())
    write("image_header", "gif_1x1", GIF_1X1)
    write("image_header", "webp_lossless", webp_small((images / "coffee_lossless.webp").read_bytes()))
    write("image_header", "webp_exif_8", webp_exif(8))
    write("image_header", "bmp_3x2", bmp(3, -2))
    write("image_header", "mp4_176x144", (VIDEOS / "bars_176x144_7f.mp4").read_bytes())
    return png


def chat(png):
    paragraph = (FIXTURES / "text" / "paragraph_en.txt").read_text()
    chinese = (FIXTURES / "text" / "paragraph_zh.txt").read_text()
    png_url = "data:image/png;base64," + base64.b64encode(png).decode()
    gif_url = "data:image/gif;base64," + base64.b64encode(GIF_1X1).decode()
    mp4_url = "data:video/mp4;base64," + base64.b64encode((VIDEOS / "bars_176x144_7f.mp4").read_bytes()).decode()
    model = "Qwen/Qwen2-VL-2B-Instruct"
    seeds = {
        "text": {"model": model, "messages": [{"role": "user", "content": paragraph}]},
        "turns": {
            "model": model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": 64,
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": chinese},
                {"role": "assistant", "content": "Noted."},
                {"role": "user", "content": [{"type": "text", "text": "And \u00e9 \"quoted\"?"}]},
            ],
        },
        "image_png": {
            "model": model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_url}},
                {"type": "text", "text": "What is in this image?"},
            ]}],
        },
        "images_uuid": {
            "model": model,
            "add_generation_prompt": False,
            "chat_template_kwargs": {"enable_thinking": False},
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": gif_url}, "uuid": "img-1"},
                {"type": "image_url", "image_url": {"url": gif_url, "detail": "low"}},
                {"type": "text", "text": "Same?"},
            ]}],
        },
        "video": {
            "model": model,
            "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": mp4_url}},
                {"type": "text", "text": "Describe."},
            ]}],
        },
        "completion_text": {"model": model, "prompt": chinese, "max_tokens": 16},
        "completion_tokens": {"model": model, "prompt": [[151644, 872, 198, 9707, 151645]]},
    }
    for name, body in seeds.items():
        # One seed with JSON escapes for non-ASCII text, the others in raw UTF-8.
        write("chat_request", name, json.dumps(body, ensure_ascii=name == "turns"))


def events():
    lines = (FIXTURES / "vectors" / "dynamo_router_events.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):
        write("event_json", f"router_event_{i}", line)
    batch = '{"worker_id":7,"incarnation":3,"events":[' + ",".join(lines) + "]}"
    write("event_json", "batch", batch)
    pretty = json.dumps({"incarnation": 3, "worker_id": 7, "events": [json.loads(l) for l in lines]}, indent=1)
    write("event_json", "batch_pretty", pretty)


def msgpack(value):
    """MessagePack as rmp_serde's named encoding writes serde's data model: structs as maps of
    field names, unit variants as their name, other variants as one-entry maps, None as nil."""
    if value is None:
        return b"\xc0"
    if isinstance(value, bool):
        return b"\xc3" if value else b"\xc2"
    if isinstance(value, int):
        assert value >= 0
        if value < 128:
            return bytes([value])
        for tag, fmt, bound in ((0xCC, ">B", 1 << 8), (0xCD, ">H", 1 << 16), (0xCE, ">I", 1 << 32), (0xCF, ">Q", 1 << 64)):
            if value < bound:
                return bytes([tag]) + struct.pack(fmt, value)
    if isinstance(value, str):
        data = value.encode()
        head = bytes([0xA0 | len(data)]) if len(data) < 32 else b"\xd9" + bytes([len(data)])
        return head + data
    if isinstance(value, bytes):
        return b"\xc5" + struct.pack(">H", len(value)) + value
    if isinstance(value, list):
        head = bytes([0x90 | len(value)]) if len(value) < 16 else b"\xdc" + struct.pack(">H", len(value))
        return head + b"".join(msgpack(item) for item in value)
    if isinstance(value, dict):
        head = bytes([0x80 | len(value)]) if len(value) < 16 else b"\xde" + struct.pack(">H", len(value))
        return head + b"".join(msgpack(k) + msgpack(v) for k, v in value.items())
    raise TypeError(value)


def dynamo_envelope(events, sequence):
    """A Dynamo event-plane message: the envelope, its payload the msgpack of the events."""
    return msgpack({"publisher_id": 7, "sequence": sequence, "published_at": 1764800000000, "topic": "kv-events", "payload": msgpack(events)})


def dynamo():
    lines = (FIXTURES / "vectors" / "dynamo_router_events.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    write("dynamo_msgpack", "all_events", dynamo_envelope(events, 1))
    for i, event in enumerate(events):
        write("dynamo_msgpack", f"event_{i}", dynamo_envelope([event], 2 + i))


def engines():
    """vLLM's and SGLang's golden payloads (kvroute-events' fixtures), as they are."""
    fixtures = ROOT / "crates" / "events" / "tests" / "fixtures"
    for path in sorted(fixtures.rglob("*.msgpack")):
        name = "_".join(path.relative_to(fixtures).with_suffix("").parts)
        write("engine_msgpack", name, path.read_bytes())


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def index_snapshot(caches, runs):
    """kvroute-index's snapshot format (version 1): caches as (worker, dp rank), runs as
    (ascending cache numbers, sequence hashes)."""
    out = b"KVRIDX" + struct.pack("<H", 1) + varint(len(caches))
    for worker, rank in caches:
        out += struct.pack("<Q", worker) + varint(rank)
    out += varint(len(runs))
    for workers, hashes in runs:
        out += varint(len(workers)) + b"".join(varint(w) for w in workers)
        out += varint(len(hashes)) + b"".join(struct.pack("<Q", h) for h in hashes)
    return out


def snapshots():
    vectors = json.loads((FIXTURES / "vectors" / "dynamo_block_hash.json").read_text())
    hashes = [h for case in vectors["cases"][:3] for h in case["expected_sequence_hashes"]]
    write("index_snapshot", "empty", index_snapshot([], []))
    write("index_snapshot", "shared_prefix", index_snapshot(
        [(7, 0), (8, 0), (8, 1)],
        [([0, 1, 2], hashes[:2]), ([0], hashes[2:5]), ([1, 2], hashes[5:8])],
    ))


if __name__ == "__main__":
    events()
    dynamo()
    engines()
    snapshots()
    chat(images())
