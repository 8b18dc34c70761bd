"""``wsi view``: a local web server for a run's slides, with the heatmap drawn in the browser over the original slide.

The cohort page lists the run's slides (thumbnail, label, call and where it came from, site, failures, OOD flag),
sortable and filterable; a slide page shows the original slide in deep zoom (OpenSeadragon) down to level 0,
tiles read on demand through :mod:`wsi.slide`, and over it the per-tile scores of the store's ``scores/<run>``
(:mod:`wsi.store`) painted by the page itself, so opacity, threshold and the value shown change without a
request. The server (:mod:`wsi.viewer.server`) serves only the run's slides, read-only; modules:
:mod:`~wsi.viewer.outputs` (what is read from OUT), :mod:`~wsi.viewer.tiles` (deep-zoom tiles, cache, pool).

It binds 127.0.0.1 by default. Any other host needs a token, generated at start and printed in the link, the way
Jupyter does it.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket

__all__ = ["DEFAULT_PORT", "make_server", "serve", "slide_url"]

DEFAULT_PORT = 8765

CACHE_BYTES = 256 * 2**20   # tile cache: about 15,000 tiles of 256 px at JPEG quality 85
DECODE_WORKERS = max(2, min(8, os.cpu_count() or 2))


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
    except (OSError, ValueError):
        return False


def make_server(out_dir, *, run: str | None = None, host: str = "127.0.0.1", port: int = 0,
                token: str | None = None):
    """A bound, not yet serving :class:`~wsi.viewer.server.ViewerServer` over ``out_dir``; a host other than
    loopback gets a fresh token unless one is given. ``port=0`` picks a free port (``server.server_address``)."""
    from .outputs import Outputs
    from .server import ViewerServer

    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(24)
    return ViewerServer((host, port), Outputs(out_dir, run), token=token, cache_bytes=CACHE_BYTES,
                        decode_workers=DECODE_WORKERS)


def url(server) -> str:
    """The link to open: the cohort page, with the token when there is one."""
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/" + (f"?token={server.token}" if server.token else "")


def slide_url(slide_id: str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> str:
    """The link to a slide's page on a viewer started with ``wsi view`` (the report links every slide so)."""
    from urllib.parse import quote

    return f"http://{host}:{port}/slide?id={quote(slide_id, safe='')}"


def serve(out_dir, *, run: str | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Serve ``out_dir``'s run ``run`` (default: the newest predictions) until interrupted."""
    server = make_server(out_dir, run=run, host=host, port=port)
    print(f"wsi view: {len(server.outputs.ids)} slides of run {server.outputs.run or '(none)'}; open {url(server)}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
