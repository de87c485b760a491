"""The app served on a free loopback port, for the tests that go through HTTP (gradio_client, the browser)."""
from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(demo) -> Iterator[str]:
    """``demo`` (a built app) launched in this process on a free 127.0.0.1 port; yields its URL and
    closes the server on exit."""
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@contextmanager
def launched(services) -> Iterator[str]:
    """``app.build_app(services)`` served as by :func:`serving`."""
    from app import build_app

    with serving(build_app(services)) as url:
        yield url
