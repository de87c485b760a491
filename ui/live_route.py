"""Live captions for programs: a WebSocket route, ``/live/ws``, on the same server as the page.

The protocol (``examples/live_client.py`` is a complete client):

1. the client connects (with a login when the server has one: the ``Authorization: Basic`` header, or
   the cookie Gradio's ``/login`` sets) and sends one JSON text message of settings, all optional:
   ``{"model", "precision", "device", "task", "language", "sample_rate"}`` (the Speech tab's values;
   ``sample_rate`` of the audio it will send, default 16000);
2. the server answers ``{"type": "ready"}``, or ``{"type": "error", "message"}`` and closes;
3. the client sends binary messages of 16-bit little-endian mono PCM, as it records (any size up to
   ``MAX_MESSAGE_SECONDS`` of audio); the server sends ``{"type": "captions", "confirmed",
   "tentative", "language", "seconds", "behind", "status", "message"}`` each time the captions move
   (confirmed text never changes once sent; the tentative tail may);
4. the client sends the text ``end``; the server sends ``{"type": "final", "text", "language",
   "duration", "segments": [[start, end, text], ...]}`` (the recording transcribed as a file, as the
   page's Live mode does on stop) and closes.

The same rules as the page apply: the shared-mode model check, at most ``--concurrency live=N``
streams at once (page and programs together; a refused connection gets an error and close code 1013),
``--max-audio-minutes`` per stream, and a connection idle for a minute is closed.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
from typing import Any, Optional

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect  # module level: FastAPI resolves the annotation here

from pipelines.core.errors import ModelUnavailable
from pipelines.speech.live_stream import LIVE_PRECISION, LiveStream, live_config

from .common import request_dir, whisper_request

log = logging.getLogger(__name__)
PATH = "/live/ws"
MAX_MESSAGE_SECONDS = 10.0
IDLE_SECONDS = 60.0
POLICY_VIOLATION, TRY_AGAIN_LATER = 1008, 1013


def _password_ok(auth: Any, user: str, password: str) -> bool:
    if callable(auth):
        return bool(auth(user, password))
    expected = auth.get(user) if isinstance(auth, dict) else None
    return expected is not None and hmac.compare_digest(str(expected).encode(), password.encode())


def signed_in(app: Any, ws: WebSocket) -> bool:
    """Whether the connection may stream: no login on this server, Gradio's login cookie, or Basic auth."""
    auth = getattr(app, "auth", None)
    if auth is None:
        return True
    cookie_id = getattr(app, "cookie_id", "")
    tokens = getattr(app, "tokens", {})
    for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
        if ws.cookies.get(name) in tokens:
            return True
    kind, _, value = ws.headers.get("authorization", "").partition(" ")
    if kind.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(value).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return _password_ok(auth, user, password)


async def _refuse(ws: WebSocket, message: str, code: int = POLICY_VIOLATION) -> None:
    await ws.send_json({"type": "error", "message": message})
    await ws.close(code=code)


def _open(services, settings: dict) -> LiveStream:
    choice, options = whisper_request(services.settings, settings.get("model"), settings.get("precision") or LIVE_PRECISION,
                                      settings.get("device"), settings.get("task"), settings.get("language"))
    return services.live.open(choice, live_config(options.task, options.language), request_dir("live"))


async def _send_updates(ws: WebSocket, stream: LiveStream, lock: asyncio.Lock) -> None:
    """Send the captions each time they move (a decode ended, the model loaded, the stream fell behind)."""
    seen, last = -1, None
    while True:
        seen = await asyncio.to_thread(stream.wait_for_update, seen, 1.0)
        captions = stream.captions()
        shown = (captions.confirmed, captions.tentative, captions.status, captions.message)
        if shown != last and captions.status != "finished":
            last = shown
            async with lock:
                await ws.send_json({"type": "captions", **captions.to_dict()})


async def _final(ws: WebSocket, stream: LiveStream, lock: asyncio.Lock) -> None:
    transcript = await asyncio.to_thread(stream.finish, True)
    async with lock:
        await ws.send_json({"type": "final", "text": transcript.text, "language": transcript.language,
                            "duration": transcript.duration,
                            "segments": [[s.start, s.end, s.text] for s in transcript.segments]})
    await ws.close()


async def _receive_audio(ws: WebSocket, stream: LiveStream, rate: int, lock: asyncio.Lock) -> None:
    """Chunks in until the client says ``end`` (or goes away, or idles)."""
    limit = int(MAX_MESSAGE_SECONDS * rate) * 2
    while True:
        message = await asyncio.wait_for(ws.receive(), timeout=IDLE_SECONDS)
        if message.get("type") == "websocket.disconnect":
            raise WebSocketDisconnect()
        data, text = message.get("bytes"), message.get("text")
        if data is not None:
            if len(data) > limit or len(data) % 2:
                return await _refuse(ws, f"Send 16-bit mono PCM, at most {MAX_MESSAGE_SECONDS:g} s per message.")
            await asyncio.to_thread(stream.push, np.frombuffer(data, "<i2"), rate)
        elif text is not None and text.strip().lower() == "end":
            return await _final(ws, stream, lock)


def make_live_route(services, app: Any):
    """The ``/live/ws`` endpoint (see the module docstring) over ``services``, signing in against ``app``."""

    async def live_captions(ws: WebSocket) -> None:
        await ws.accept()
        if not signed_in(app, ws):
            return await _refuse(ws, "This server needs a login: send an 'Authorization: Basic' header "
                                     "(user:password) or the cookie from /login.")
        stream: Optional[LiveStream] = None
        try:
            settings = json.loads(await asyncio.wait_for(ws.receive_text(), timeout=IDLE_SECONDS) or "{}")
            rate = int(settings.get("sample_rate") or 16000) if isinstance(settings, dict) else 0
            if not 8000 <= rate <= 96000:
                return await _refuse(ws, "The first message is a JSON object of settings; sample_rate 8000-96000.")
            try:
                stream = await asyncio.to_thread(_open, services, settings)
            except (ValueError, ModelUnavailable) as exc:
                busy = "already runs" in str(exc)
                return await _refuse(ws, str(exc), TRY_AGAIN_LATER if busy else POLICY_VIOLATION)
            await ws.send_json({"type": "ready"})
            lock = asyncio.Lock()
            updates = asyncio.create_task(_send_updates(ws, stream, lock))
            try:
                await _receive_audio(ws, stream, rate, lock)
            finally:
                updates.cancel()
        except (WebSocketDisconnect, asyncio.TimeoutError, json.JSONDecodeError, RuntimeError) as exc:
            log.info("live caption connection ended: %s", type(exc).__name__)
        except ValueError as exc:  # a stream that failed (its message is written for the user)
            await _refuse(ws, str(exc))
        finally:
            if stream is not None:
                stream.close()

    return live_captions


def mount_live_route(demo, services) -> None:
    """Add ``/live/ws`` to the FastAPI app a launched Gradio ``demo`` serves (the page's own server)."""
    demo.app.add_api_websocket_route(PATH, make_live_route(services, demo.app))
