"""Stage 3 end to end on the smoke run: `ipr policy align` (Ray Train, resume), then the Ray Serve
inference app answering /act with the aligned policy, the world-model scorer and the router, and
refusing bad requests with a 4xx while it keeps serving."""

import io
import json
import socket
import urllib.error
import urllib.request

import numpy as np

from .conftest import assert_one_line_error, committed, run_ipr


def test_align_builds_the_tiny_base_checkpoints_and_resumes(aligned_smoke_run):
    assert (committed(aligned_smoke_run, "policy/base") / "config.json").is_file()
    meta = json.loads((committed(aligned_smoke_run, "policy/aligned") / "physcode_tokens.json").read_text())
    assert meta["codes"] == 16 and len(meta["token_ids"]) == 16
    more = run_ipr("policy", "align", str(aligned_smoke_run), "--set", "policy.align_steps=15", timeout=600)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resuming alignment from step 10" in more.stdout
    again = run_ipr("policy", "align", str(aligned_smoke_run), "--set", "policy.align_steps=15", timeout=600)
    assert again.returncode == 0 and "already aligned (15 steps)" in again.stdout
    bad = run_ipr("policy", "align", str(aligned_smoke_run), "--set", "policy.model_path=/nonexistent/qwen")
    assert_one_line_error(bad, "policy.model_path", "not a Qwen3-VL checkpoint")


def png(width=64, height=64, seed=0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def request(url, body=None, token="s3cret", kind="image/png"):
    headers = {"Content-Type": kind} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def bomb_png(side: int = 20000) -> bytes:
    """A PNG whose header declares side x side pixels (400 million at 20,000) and holds no pixel data:
    what a decompression bomb looks like to the server before it decodes anything."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_serve_app_acts_and_refuses_bad_requests(aligned_smoke_run, ray_local):
    from ray import serve

    from ipr_dist.config import load_config
    from serving.app import build_app

    cfg = load_config(aligned_smoke_run / "config.yaml")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg, "s3cret"), name="ipr", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        status, health = request(f"{base}/healthz", token=None)
        assert status == 200 and health["status"] == "ok" and "Bounce-Html" in health["games"]
        status, out = request(f"{base}/act?game=Bounce-Html&goal=keep%20the%20ball%20up", png())
        assert status == 200, out
        assert len(out["codes"]) == 4 and len(out["candidates"]) == 8 and len(out["actions"]) == 4
        from serving.agent import pick_candidate  # argmax R^ + beta log pi - kappa disagreement (the run's config)

        cand, p = out["candidates"], cfg.policy
        best = pick_candidate([c["imagined_return"] for c in cand], [c["logprob"] for c in cand], p.pick_prior_weight,
                              [c["uncertainty"] for c in cand], p.pick_uncertainty_weight)
        assert out["codes"] == cand[best]["codes"]
        from learners.align import latest_policy  # the GRPO policy once Stage 4 ran, else the aligned one

        with latest_policy(cfg).open() as folder:
            served = json.loads((folder / "physcode_tokens.json").read_text())
        assert out["policy_version"] == served.get("version", 0)
        bad = {
            "missing token": (request(f"{base}/act?game=Bounce-Html", png(), token=None), 401, "missing token"),
            "wrong token": (request(f"{base}/act?game=Bounce-Html", png(), token="nope"), 403, "wrong token"),
            "not an image": (request(f"{base}/act?game=Bounce-Html", b"hello", kind="text/plain"), 415, "PNG or JPEG"),
            "corrupt png": (request(f"{base}/act?game=Bounce-Html", b"\x89PNG not really"), 400, "not a readable"),
            "too large": (request(f"{base}/act?game=Bounce-Html", png(4000, 8)), 413, "limit is 2048"),
            "decompression bomb": (request(f"{base}/act?game=Bounce-Html", bomb_png()), 413, "decompression bomb"),
            "30 MB body": (request(f"{base}/act?game=Bounce-Html", b"\x89PNG" + bytes(30 << 20)), 413, "limit is 4194304"),
            "unknown game": (request(f"{base}/act?game=Tetris-Html", png()), 404, "unknown game 'Tetris-Html'"),
            "long goal": (request(f"{base}/act?game=Bounce-Html&goal=" + "x" * 400, png()), 422, "goal is 400"),
        }
        for name, ((status, body), want, text) in bad.items():
            assert status == want and text in body["detail"], (name, status, body)
        # Fuzz: 200 malformed, truncated and wrongly typed requests with odd query strings and tokens;
        # every answer is a 4xx with a message, never a 500.
        from collections import Counter
        from urllib.parse import quote

        rng = np.random.default_rng(0)
        kinds = ["image/png", "image/jpeg", "text/plain", "application/octet-stream", "image/png; x=1", "image/gif"]
        good = png()
        statuses = Counter()
        for i in range(200):
            body = (good[:int(rng.integers(1, len(good)))] if i % 3 == 0 else
                    bytes(rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8)))
            odd = "".join(chr(int(c)) for c in rng.integers(1, 0x3000, int(rng.integers(0, 40))))
            query = ["game=Bounce-Html", "game=", f"game={quote(odd)}", f"game=Bounce-Html&goal={quote(odd)}",
                     f"game=Bounce-Html&{quote(odd)}=1", "game=Bounce-Html&game=Hopper-Html"][i % 6]
            token = ["s3cret", None, "wrong", "s3cret"][i % 4]
            status, out = request(f"{base}/act?{query}", body, token=token, kind=kinds[i % len(kinds)])
            statuses[status] += 1
            assert 400 <= status < 500 and out.get("detail"), (i, query, status, out)
        print(f"HTTP fuzz: 200 requests, answers {dict(statuses)}, 0 server errors")
        status, out = request(f"{base}/act?game=Airstriker-Genesis-v0", png(seed=3))
        assert status == 200 and out["game"] == "Airstriker-Genesis-v0"  # still serving
    finally:
        serve.shutdown()
