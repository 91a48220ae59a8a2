"""The inference application: a Ray Serve deployment around the IPR agent of a run directory.

  POST /act?game=<id>[&goal=<text>]   body: a PNG or JPEG frame (Content-Type image/png | image/jpeg)
      -> {"codes", "candidates": [{"codes", "logprob", "imagined_return"}], "actions", "policy_version", ...}
  GET /healthz -> {"status": "ok", "games": [...], "policy_version": n}

Every request but /healthz needs `Authorization: Bearer <token>` unless the app was started with
auth disabled (local use). Requests are checked before any model runs: image type and size, known
game, goal length; each failure is a 4xx with a one-line reason, and the server keeps serving.
(No `from __future__ import annotations` here: FastAPI reads the handlers' real annotations.)
"""


import hmac
import io

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from ray import serve

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG"}
MAX_IMAGE_BYTES = 4 * 1024 * 1024
DRAIN_BYTES = 64 * 1024 * 1024  # an oversized body is read and dropped up to here, so the client gets its 413
MAX_IMAGE_SIDE = 2048
MAX_GOAL_CHARS = 300

api = FastAPI(title="ipr-dist inference")


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class ActServer:
    def __init__(self, cfg: dict, token: "str | None"):
        from ipr_dist.config import Config
        from serving.agent import Agent

        self.agent = Agent(Config.model_validate(cfg))
        self.token = token
        h, w = self.agent.cfg.env.frame_size
        self.frame_size = (w, h)

    def _authorise(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise HTTPException(401, "missing token: send 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(header[len("Bearer "):].encode(), self.token.encode()):
            raise HTTPException(403, "wrong token")

    async def _frame(self, request: Request) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in IMAGE_TYPES:
            raise HTTPException(415, f"body must be a PNG or JPEG image (Content-Type image/png or image/jpeg), "
                                     f"got '{kind or 'none'}'")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_IMAGE_BYTES:
            # Read and drop what the client is sending (up to DRAIN_BYTES) before answering: closing on
            # a client still sending resets the connection, and it would never see the 413.
            drained = 0
            async for chunk in request.stream():
                drained += len(chunk)
                if drained > DRAIN_BYTES:
                    break
            raise HTTPException(413, f"image is {declared} bytes; the limit is {MAX_IMAGE_BYTES}")
        body = await request.body()
        if len(body) > MAX_IMAGE_BYTES:
            raise HTTPException(413, f"image is {len(body)} bytes; the limit is {MAX_IMAGE_BYTES}")
        try:
            try:
                image = Image.open(io.BytesIO(body))
            except Image.DecompressionBombError:  # PIL refuses it from the header, before decoding
                raise HTTPException(413, f"image declares too many pixels (a decompression bomb); the limit is "
                                         f"{MAX_IMAGE_SIDE} pixels a side") from None
            if image.format != IMAGE_TYPES[kind]:
                raise HTTPException(415, f"body is not a {IMAGE_TYPES[kind]} image")
            if max(image.size) > MAX_IMAGE_SIDE:
                raise HTTPException(413, f"image is {image.size[0]}x{image.size[1]}; the limit is "
                                         f"{MAX_IMAGE_SIDE} pixels a side")
            image = image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError):
            raise HTTPException(400, f"body is not a readable {IMAGE_TYPES[kind]} image") from None
        return np.asarray(image.resize(self.frame_size), np.uint8)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        version = await self.agent.policy.version.remote()
        return {"status": "ok", "games": self.agent.games, "policy_version": version}

    @api.post("/act")
    async def act(self, request: Request, game: str = "", goal: str | None = None) -> dict:
        self._authorise(request)
        if game not in self.agent.games:
            raise HTTPException(404, f"unknown game '{game}'; this agent plays: {', '.join(self.agent.games)}")
        if goal is not None and len(goal) > MAX_GOAL_CHARS:
            raise HTTPException(422, f"goal is {len(goal)} characters; the limit is {MAX_GOAL_CHARS}")
        frame = await self._frame(request)
        return await self.agent.act(frame, game, goal)


def build_app(cfg, token: str | None):
    """The bound application for `serve.run`; token None disables auth (local use only)."""
    return ActServer.bind(cfg.with_absolute_root().model_dump(mode="json"), token)
