"""The HTTP service, tested as users meet it: ``mae serve`` in a subprocess on a loopback port.

Two servers start once per module, side by side: one with a classification head, an index and tight limits (so
that limit tests need no large uploads), one with neither head nor index. Decoding is also tested in-process.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import struct
import threading
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mae.data import ImageTooLargeError, decode_image
from tests.serving_support import (
    Server,
    build_index,
    error_message,
    export_digits,
    multipart,
    post_json,
    request,
    run_cli,
    tiny_artifact,
)

LABELS = [str(i) for i in range(10)]
MAX_IMAGES = 8
MAX_IMAGE_BYTES = 300_000
MAX_IMAGE_PIXELS = 1_000_000


# ----------------------------------------------------------------------------------------------- images


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(h: int = 40, w: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def every_mode() -> dict[str, bytes]:
    """One encoded image per PIL mode and container users send (and an animation)."""
    rng = np.random.default_rng(1)
    grey = Image.fromarray(rng.integers(0, 256, (36, 36), dtype=np.uint8))
    palette = rgb(24, 24, 2).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_alpha = palette.copy()
    palette_alpha.info["transparency"] = 0
    frames = [Image.new("RGB", (20, 20), c) for c in ((250, 10, 10), (10, 250, 10), (10, 10, 250))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    i16 = Image.fromarray((rng.integers(0, 65536, (30, 30))).astype(np.uint16))
    return {
        "L.png": encode(grey),
        "LA.png": encode(Image.merge("LA", (grey, grey.point(lambda v: 255 - v)))),
        "P.png": encode(palette),
        "P-transparent.png": encode(palette_alpha, transparency=0),
        "RGBA.png": encode(rgb(30, 20, 3).convert("RGBA")),
        "CMYK.jpg": encode(rgb(32, 32, 4).convert("CMYK"), "JPEG"),
        "I16.png": encode(i16),
        "1.bmp": encode(grey.convert("1"), "BMP"),
        "animated.gif": gif.getvalue(),
        "rgb.webp": encode(rgb(33, 35, 5), "WEBP", lossless=True),
        "rgb.tiff": encode(rgb(21, 40, 6), "TIFF"),
    }


def png_bomb(width: int = 9000, height: int = 9000) -> bytes:
    """A 70-byte PNG whose header claims width x height pixels (what a decompression bomb looks like at first)."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    struct.pack_into(">II", data, 16, width, height)  # IHDR payload starts at byte 16
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # CRC over "IHDR" + its 13 bytes
    return bytes(data)


def test_every_mode_decodes_to_model_pixels():
    from mae.data import Preprocessing
    from serving.images import Upload, to_pixels
    from serving.settings import Limits

    prep = Preprocessing((3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic", 1.0)
    images = every_mode()
    pixels = to_pixels([Upload(name, data) for name, data in images.items()], Limits(), prep)
    assert pixels.shape == (len(images), 3, 32, 32) and pixels.dtype == np.float32
    assert np.isfinite(pixels).all()
    gif = decode_image(images["animated.gif"])
    assert gif.shape[:2] == (20, 20)
    assert gif[5, 5, 0] > 200 and gif[5, 5, 1] < 60  # the first (red) frame, not a later one
    i16 = decode_image(images["I16.png"])
    assert i16.dtype == np.uint8 and i16.max() > 200  # 16-bit range mapped onto 8 bits, not clipped
    assert decode_image(images["CMYK.jpg"]).shape[2] == 3


@pytest.mark.parametrize("name,data,status,words", [
    ("corrupt", b"\x89PNG\r\n\x1a\n" + bytes(200), 400, "corrupt"),
    ("truncated", encode(rgb(64, 64))[:300], 400, "truncated"),
    ("text", b"hello, this is not an image\n", 400, "not a recognised image format"),
    ("eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 400, "not a recognised image format"),
    ("bomb", png_bomb(), 413, "9000x9000 pixels is over the limit"),
    ("PIL-bomb", png_bomb(30000, 30000), 413, "too many pixels"),
    ("empty", b"", 400, "empty"),
], ids=["corrupt", "truncated", "text", "eps", "bomb", "PIL-bomb", "empty"])
def test_decode_failures_are_4xx_naming_the_image(name, data, status, words):
    from bentoml.exceptions import BentoMLException

    from serving.images import Upload, decode
    from serving.settings import Limits

    with pytest.raises(BentoMLException) as info:
        decode(Upload(f"image 1 {name!r}", data), Limits(max_image_pixels=MAX_IMAGE_PIXELS))
    assert info.value.error_code.value == status
    assert name in str(info.value) and words in str(info.value)


def test_bomb_is_refused_from_the_header():
    with pytest.raises(ImageTooLargeError, match="bomb.png: 9000x9000 pixels is over the limit of 1000000"):
        decode_image(png_bomb(), "bomb.png", max_pixels=10**6)


def test_settings_round_trip_through_the_environment():
    from serving.settings import Limits, Settings

    s = Settings(artifact="/a", index="/i", backend="onnx", batching=False, max_batch_size=7, max_latency_ms=9,
                 threads=3, workers=2)
    assert Settings.from_env(s.to_env()) == s
    lim = Limits(max_image_bytes=5, max_image_pixels=6, max_images=7)
    assert Limits.from_env(lim.to_env()) == lim
    with pytest.raises(ValueError, match="MAE_MAX_BATCH_SIZE must be an integer"):
        Settings.from_env({"MAE_MAX_BATCH_SIZE": "many"})
    with pytest.raises(ValueError, match="backend must be one of"):
        Settings.from_env({"MAE_BACKEND": "tpu"})


# ----------------------------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Artifacts, an indexed collection and two running servers (started in parallel to halve the wait)."""
    tmp = tmp_path_factory.mktemp("serving")
    head = tiny_artifact(tmp / "head", labels=LABELS)
    plain = tiny_artifact(tmp / "plain", seed=1)
    collection = export_digits(tmp / "digits", 40)
    index = build_index(head, tmp / "digits", tmp / "index")
    limits = ["--max-images", str(MAX_IMAGES), "--max-image-bytes", str(MAX_IMAGE_BYTES),
              "--max-image-pixels", str(MAX_IMAGE_PIXELS)]
    main = Server(head, index, tmp / "main.log", limits)
    bare = Server(plain, None, tmp / "bare.log")
    try:
        main.wait_ready()
        bare.wait_ready()
        yield {"main": main, "bare": bare, "head": head, "plain": plain, "index": index, "collection": collection,
               "tmp": tmp}
    finally:
        main.stop()
        bare.stop()


@pytest.fixture(scope="module")
def reference(setup):
    """The in-process Embedder on the same artifact: what the server's answers must equal."""
    from export.runtime import Embedder

    return Embedder.load(setup["head"], backend="torch")


def files(*named: tuple[str, bytes], **fields: str) -> tuple[bytes, str]:
    return multipart([("images", name, data, "application/octet-stream") for name, data in named], fields)


def post_files(server: Server, endpoint: str, *named: tuple[str, bytes], **fields: str) -> tuple[int, object]:
    body, ctype = files(*named, **fields)
    status, raw = request(server.url + endpoint, body, ctype)
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw.decode(errors="replace")


def mae_embed(artifact: Path, paths: list[Path], out: Path) -> np.ndarray | None:
    """``mae embed``'s vectors, or None while that command is not in this checkout."""
    if run_cli("embed", "--help", check=False).returncode != 0:
        return None
    run_cli("embed", "--artifact", str(artifact), *map(str, paths), "--out", str(out))
    return np.load(out)


def test_embed_equals_the_embedder_and_mae_embed(setup, reference, tmp_path):
    images = every_mode()
    paths = []
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    chosen = paths[:MAX_IMAGES]
    status, body = post_files(setup["main"], "/embed", *[(p.name, p.read_bytes()) for p in chosen])
    assert status == 200, body
    got = np.asarray(body["embeddings"], np.float32)
    assert got.shape == (len(chosen), reference.dim) and body["dim"] == reference.dim
    assert body["model"] == reference.sha256
    expected = reference.embed([decode_image(p.read_bytes()) for p in chosen])
    np.testing.assert_allclose(got, expected, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cli = mae_embed(setup["head"], chosen, tmp_path / "vectors.npy")
    if cli is not None:
        np.testing.assert_allclose(got, cli, atol=2e-5)
    # The same images as JSON base64 (one with a data: URL prefix) give the same vectors.
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in chosen]
    b64[0] = "data:image/png;base64," + b64[0]
    status, body = post_json(setup["main"].url + "/embed", {"images": b64})
    assert status == 200, body
    np.testing.assert_allclose(np.asarray(body["embeddings"], np.float32), got, atol=2e-5)


def test_classify_returns_top_k_labels(setup, reference):
    named = [("a.png", encode(rgb(seed=3))), ("b.png", encode(rgb(50, 20, seed=4)))]
    status, body = post_files(setup["main"], "/classify", *named, k="3")
    assert status == 200, body
    preds = body["predictions"]
    assert len(preds) == 2 and all(len(p) == 3 for p in preds)
    expected = reference.classify([decode_image(d) for _, d in named], k=3)
    for row, ref in zip(preds, expected):
        assert [p["label"] for p in row] == [r["label"] for r in ref]
        np.testing.assert_allclose([p["probability"] for p in row], [r["probability"] for r in ref], atol=1e-5)
        probs = [p["probability"] for p in row]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(p["label"] in LABELS and LABELS[p["index"]] == p["label"] for p in row)


def test_classify_without_a_head_and_search_without_an_index_are_clear_4xx(setup):
    image = ("a.png", encode(rgb()))
    status, body = post_files(setup["bare"], "/classify", image)
    assert status == 400 and "no classification head" in error_message(body)
    status, body = post_files(setup["bare"], "/search", image)
    assert status == 400 and "no index" in error_message(body)
    status, body = post_files(setup["bare"], "/embed", image)
    assert status == 200 and len(body["embeddings"]) == 1


def test_search_returns_the_indexed_neighbours(setup):
    query = setup["collection"][7]
    status, body = post_files(setup["main"], "/search", (query.name, query.read_bytes()), k="5")
    assert status == 200, body
    assert body["index_count"] == len(setup["collection"])
    hits = body["neighbours"][0]
    assert len(hits) == 5
    assert hits[0]["path"] == f"digits/{query.parent.name}/{query.name}", "relative to the indexed folder"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert hits[0]["label"] == query.parent.name
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    status, png = request(setup["main"].url + hits[1]["thumbnail"])
    assert status == 200 and Image.open(io.BytesIO(png)).format == "PNG"
    assert request(setup["main"].url + "/thumbnail/999999")[0] == 404
    assert request(setup["main"].url + "/thumbnail/abc")[0] == 400


def test_search_sees_images_added_while_serving(setup, tmp_path):
    new = tmp_path / "new"
    new.mkdir()
    for i in range(3):
        (new / f"new{i}.png").write_bytes(encode(rgb(32, 32, seed=500 + i)))
    status, before = post_files(setup["main"], "/search", ("q.png", (new / "new1.png").read_bytes()), k="1")
    assert status == 200 and before["neighbours"][0][0]["path"] != "new/new1.png"
    run_cli("index", "add", "--index", str(setup["index"]), str(new))
    # no waiting: every read compares the manifest with what its worker loaded, and reloads on a change
    status, after = post_files(setup["main"], "/search", ("q.png", (new / "new1.png").read_bytes()), k="1")
    assert status == 200 and after["index_count"] == before["index_count"] + 3
    assert after["neighbours"][0][0]["path"] == "new/new1.png"


def bad_requests() -> list[tuple[str, bytes, str, int, str]]:
    """(case, body, content type, expected status, words the message must contain)."""
    good = encode(rgb())
    too_many, ctype_many = files(*[(f"{i}.png", good) for i in range(MAX_IMAGES + 1)])
    cases = [
        ("corrupt", *files(("broken.png", b"\x89PNG\r\n\x1a\n" + bytes(64))), 400, "broken.png"),
        ("truncated", *files(("half.png", encode(rgb(64, 64))[:400])), 400, "half.png"),
        ("not an image", *files(("notes.txt", b"just text")), 400, "not a recognised image format"),
        ("text field instead of a file", *multipart([], {"images": "hello"}), 400, "not a file"),
        ("wrong body content type", b"hello", "text/plain", 415, "unsupported Content-Type"),
        ("decompression bomb", *files(("bomb.png", png_bomb())), 413, "bomb.png"),
        ("giant file", *files(("giant.png", good + bytes(MAX_IMAGE_BYTES))), 413, "giant.png"),
        ("empty batch", b'{"images": []}', "application/json", 400, "no images"),
        ("no images field", *multipart([], {"k": "3"}), 400, "no images"),
        ("too many images", too_many, ctype_many, 413, f"limit of {MAX_IMAGES}"),
        ("bad base64", b'{"images": ["not*base64!"]}', "application/json", 400, "not valid base64"),
        ("invalid JSON", b'{"images": [', "application/json", 400, "not valid JSON"),
        ("JSON not an object", b'["abc"]', "application/json", 400, "must be an object"),
        ("unknown field", b'{"images": [], "colour": 1}', "application/json", 400, "unknown field"),
        ("k out of range", json.dumps({"images": [base64.b64encode(good).decode()], "k": 0}).encode(),
         "application/json", 400, "k must be an integer"),
        ("empty file", *files(("void.png", b"")), 400, "void.png"),
    ]
    return cases


@pytest.mark.parametrize("case", bad_requests(), ids=lambda c: c[0])
def test_bad_input_is_a_4xx_with_a_message_and_the_server_keeps_serving(setup, case):
    name, body, ctype, expected, words = case
    endpoint = "/classify" if name in ("k out of range", "no images field") else "/embed"
    status, raw = request(setup["main"].url + endpoint, body, ctype)
    try:
        payload = json.loads(raw)
    except json.JSONDecodeError:
        payload = raw.decode(errors="replace")
    message = error_message(payload)
    assert status == expected, f"{name}: {status} {message}"
    assert words in message, f"{name}: {message!r} lacks {words!r}"
    status, ok = post_files(setup["main"], "/embed", ("fine.png", encode(rgb(seed=9))))
    assert status == 200 and len(ok["embeddings"]) == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_refused_without_reading_it_all(setup, chunked):
    """413 as soon as the body passes what MAX_IMAGES images could take; the rest is never read."""
    import http.client
    from urllib.parse import urlsplit

    too_much = MAX_IMAGES * MAX_IMAGE_BYTES * 2
    url = urlsplit(setup["main"].url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.putrequest("POST", "/embed")
    conn.putheader("Content-Type", "application/json")
    conn.putheader(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(too_much))))
    conn.endheaders()
    if chunked:  # stream until the server stops listening (it answers once the cap is passed)
        chunk = b"A" * 65536
        try:
            for _ in range(too_much // len(chunk)):
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass
    response = conn.getresponse()
    message = error_message(json.loads(response.read()))
    conn.close()
    assert response.status == 413 and "request body is over the limit" in message
    status, ok = post_files(setup["main"], "/embed", ("fine.png", encode(rgb(seed=9))))
    assert status == 200 and len(ok["embeddings"]) == 1


def test_64_concurrent_clients_are_all_answered_correctly(setup, reference):
    images = [encode(rgb(20 + i, 30, seed=100 + i)) for i in range(8)]
    expected = reference.embed([decode_image(d) for d in images])
    clients, per_client = 64, 10
    failures: list[str] = []
    answered = [0] * clients
    before = metric(setup["main"], "mae_model_batch_images")

    def client(c: int) -> None:
        for r in range(per_client):
            i = (c + r) % len(images)
            status, body = post_files(setup["main"], "/embed", (f"{i}.png", images[i]))
            if status != 200:
                failures.append(f"client {c} request {r}: {status} {body}")
                continue
            got = np.asarray(body["embeddings"][0], np.float32)
            if not np.allclose(got, expected[i], atol=2e-5):
                failures.append(f"client {c} request {r}: wrong vector (max diff {np.abs(got - expected[i]).max()})")
                continue
            answered[c] += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "clients still waiting after 300 s"
    assert not failures, failures[:5]
    assert sum(answered) == clients * per_client
    after = metric(setup["main"], "mae_model_batch_images")
    calls, images_run = after[1] - before[1], after[0] - before[0]
    assert images_run == clients * per_client
    assert images_run / calls > 1.5, f"adaptive batching merged nothing: {images_run} images in {calls} model calls"


def metric(server: Server, name: str) -> tuple[float, float]:
    """(sum, count) of a histogram from /metrics (summed over the processes that report it)."""
    status, raw = request(server.url + "/metrics")
    assert status == 200
    text = raw.decode()
    total = [0.0, 0.0]
    for i, suffix in enumerate(("_sum", "_count")):
        for m in re.finditer(rf"^{name}{suffix}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE):
            total[i] += float(m.group(1))
    return total[0], total[1]


def test_bentoml_endpoints_and_the_page_are_served(setup):
    url = setup["main"].url
    for path in ("/healthz", "/livez", "/readyz"):
        assert request(url + path)[0] == 200, path
    status, raw = request(url + "/metrics")
    assert status == 200 and b"mae_decode_seconds" in raw and b"mae_model_batch_seconds" in raw
    status, raw = request(url + "/docs.json")
    spec = json.loads(raw)
    assert {"/embed", "/classify", "/search"} <= set(spec["paths"])
    assert request(url + "/docs")[0] == 200
    status, raw = request(url + "/")
    assert status == 200 and b"/web/app.js" in raw
    assert request(url + "/web/app.js")[0] == 200
    status, raw = request(url + "/info")
    info = json.loads(raw)
    assert info["labels"] == LABELS and info["dim"] == 192 and info["backend"]["backend"]


def test_mae_serve_reports_user_errors_in_one_line(setup, tmp_path):
    done = run_cli("serve", "--artifact", str(tmp_path / "missing"), check=False)
    assert done.returncode == 1 and "no artifact at" in done.stderr and "Traceback" not in done.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        done = run_cli("serve", "--artifact", str(setup["head"]), "--port", str(port), check=False)
    assert done.returncode == 1 and "pick another --port" in done.stderr
    done = run_cli("serve", "--artifact", str(setup["head"]), "--max-batch-size", "1", check=False)
    assert done.returncode == 1 and "max batch size" in done.stderr
    from mae.artifact import read_config

    done = run_cli("serve", "--artifact", str(setup["plain"]), "--index", str(setup["index"]), check=False)
    assert done.returncode == 1 and read_config(setup["plain"])["sha256"][:12] in done.stderr


DEMO_SERVE = """
import argparse, sys
from cli import demo
ctx = {"artifact": sys.argv[1], "retrieval": {"index": sys.argv[2]}, "text": "demo summary"}
args = argparse.Namespace(out=sys.argv[3], data="digits", no_serve=False, json=False)
demo.stage_serve(ctx, args)
sys.exit(demo._serve_until_interrupted(ctx, args))
"""


def test_demo_serve_stage_prints_a_curl_line_that_works_and_stops_its_server(setup, tmp_path):
    import argparse
    import shlex
    import shutil
    import signal
    import subprocess
    import sys

    from cli import demo

    ctx = {"artifact": str(setup["head"])}
    demo.stage_serve(ctx, argparse.Namespace(out=str(tmp_path), data="digits", no_serve=True, json=False))
    assert "serve" not in ctx  # --no-serve skips the stage
    # The demo's last step as users meet it: a process that prints the page URL and a curl line, then serves.
    proc = subprocess.Popen([sys.executable, "-c", DEMO_SERVE, str(setup["head"]), str(setup["index"]),
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.strip().startswith("try "):
                break
        curl = lines[-1].strip().removeprefix("try").strip()
        url = next(x.split()[-1] for x in lines if x.strip().startswith("page "))
        assert curl.startswith("curl ") and f"{url}search" in curl, lines
        if shutil.which("curl"):
            answer = json.loads(subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=60,
                                               check=True).stdout)
        else:  # the same request without curl: the image path is the one after "images=@"
            image = Path(shlex.split(curl)[shlex.split(curl).index("-F") + 1].split("@", 1)[1])
            answer = json.loads(request(shlex.split(curl)[-1], *files((image.name, image.read_bytes())))[1])
        assert len(answer["neighbours"]) == 1 and answer["neighbours"][0][0]["score"] > 0.999, answer
        assert request(url)[0] == 200
        proc.send_signal(signal.SIGTERM)  # as a supervisor or `timeout` would end the demo
        assert proc.wait(60) == 0
        with pytest.raises(OSError):  # the server went with it
            urllib.request.urlopen(url + "readyz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _gpu_serving_reason() -> str | None:
    """Checked before the fixtures run: the module's servers and index take a minute to set up for nothing."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    missing = [m for m in ("bentoml", "faiss") if importlib.util.find_spec(m) is None]
    return f"needs {' and '.join(missing)} (the module's servers and index)" if missing else None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_serving_reason() is not None, reason=str(_gpu_serving_reason()))
def test_the_encoder_runs_on_the_gpu_when_there_is_one(setup):
    info = json.loads(request(setup["main"].url + "/info")[1])
    assert any(word in info["backend"]["backend"].lower() for word in ("cuda", "tensorrt", "trt")), info["backend"]
