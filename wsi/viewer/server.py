"""The viewer's HTTP server: stdlib ``ThreadingHTTPServer`` (a thread per connection, HTTP/1.1 keep-alive), tiles
decoded in a bounded pool (:class:`wsi.viewer.tiles.TileCache`).

Routes (GET and HEAD only; anything else is 405, anything unknown 404):

=================================  ==================================================================
``/``                              the cohort page
``/slide?id=<slide>&...``          the slide page; the rest of the query is its view state
``/api/cohort``                    the cohort table (JSON)
``/api/slide/<slide>``             a slide's geometry, cohort row, error and per-tile scores (JSON)
``/thumb/<slide>``                 the store's thumbnail (JPEG)
``/tiles/<slide>/<z>/<x>_<y>.jpg`` a deep-zoom tile of the original slide (JPEG)
``/tile-image/<slide>/<i>.jpg``    tile ``i`` as the store holds it (the top-tiles gallery)
``/static/<file>``                 the pages' scripts and styles and the bundled OpenSeadragon
=================================  ==================================================================

Slide ids must be ids of the run's slides (:class:`wsi.viewer.outputs.Outputs`) and static files must be
among those found at start-up, so no part of a URL becomes a path. With a token, every request must carry it,
as ``?token=`` (the printed link; the answer then sets it as a cookie for the page's own requests) or as that
cookie; without it the answer is 403. Without a token (loopback only) the request's Host must name loopback, so
a web page elsewhere cannot reach the server by pointing its own name at 127.0.0.1 (DNS rebinding).
"""

from __future__ import annotations

import hmac
import json
import mimetypes
import re
import sys
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import WsiError
from .outputs import Outputs
from .tiles import TileCache, TileOutOfRange

TOKEN_COOKIE = "wsi_view_token"
_TILE = re.compile(r"^/tiles/([^/]+)/(\d{1,2})/(\d{1,7})_(\d{1,7})\.jpg$")
_TILE_IMAGE = re.compile(r"^/tile-image/([^/]+)/(\d{1,9})\.jpg$")
_PAGES = {"/": "cohort.html", "/slide": "slide.html"}
_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'",
    "Referrer-Policy": "no-referrer",
}


def static_files() -> dict[str, Path]:
    """Every file under the package's ``static`` folder by its path there (OpenSeadragon under ``vendor/``,
    put there by the build; see ``setup.py``)."""
    root = Path(str(resources.files(__package__) / "static"))
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never keeps the process alive at shutdown
    allow_reuse_address = True

    def __init__(self, address, outputs: Outputs, *, token: str | None, cache_bytes: int, decode_workers: int):
        self.outputs = outputs
        self.token = token
        self.tile_cache = TileCache(cache_bytes, decode_workers)
        self.static = static_files()
        super().__init__(address, ViewerHandler)

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # the client went away mid-answer: nothing to report
        super().handle_error(request, client_address)

    def server_close(self):
        super().server_close()
        self.tile_cache.close()
        self.outputs.close()


class ViewerHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body leave in two writes: with Nagle on, the body waits for the client's delayed ACK (40 ms a
    # request on keep-alive connections, measured in bench/viewer.py)
    disable_nagle_algorithm = True
    server: ViewerServer

    def log_message(self, format, *args):  # noqa: A002 (the stdlib's name): quiet, tiles come by the hundred
        pass

    def do_HEAD(self):
        self._answer(head=True)

    def do_GET(self):
        self._answer(head=False)

    def _refuse_method(self):
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only\n", "text/plain", head=False)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    # ---------------------------------------------------------------- dispatch
    def _answer(self, head: bool):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        cookie = self._authorised(query)
        if cookie is None:
            return self._send(HTTPStatus.FORBIDDEN, b"a token is required: open the link `wsi view` printed\n",
                              "text/plain", head=head)
        path, outputs = url.path, self.server.outputs
        try:
            if path in _PAGES:
                body, kind = self.server.static[_PAGES[path]].read_bytes(), "text/html; charset=utf-8"
            elif path.startswith("/static/") and path[len("/static/"):] in self.server.static:
                file = self.server.static[path[len("/static/"):]]
                body, kind = file.read_bytes(), mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            elif path == "/api/cohort":
                body, kind = outputs.cohort_json(), "application/json"
            elif (slide_id := self._slide_id(path, "/api/slide/")) is not None:
                body, kind = outputs.slide_json(slide_id), "application/json"
            elif (slide_id := self._slide_id(path, "/thumb/")) is not None:
                body, kind = outputs.thumbnail(slide_id), "image/jpeg"
            elif (match := _TILE.match(path)) and unquote(match[1]) in outputs.ids:
                tiles = outputs.tiles(unquote(match[1]))
                body = self.server.tile_cache.get(tiles, int(match[2]), int(match[3]), int(match[4]))
                kind = "image/jpeg"
            elif (match := _TILE_IMAGE.match(path)) and unquote(match[1]) in outputs.ids:
                body, kind = outputs.tile_image(unquote(match[1]), int(match[2])), "image/jpeg"
            else:
                return self._not_found(head)
        except (TileOutOfRange, IndexError):
            return self._not_found(head)
        except WsiError as e:  # a slide or store that cannot be read: this request fails, the server carries on
            return self._send(HTTPStatus.NOT_FOUND, json.dumps({"error": str(e)}).encode(), "application/json",
                              head=head)
        self._send(HTTPStatus.OK, body, kind, head=head, cookie=cookie)

    def _slide_id(self, path: str, prefix: str) -> str | None:
        if not path.startswith(prefix):
            return None
        slide_id = unquote(path[len(prefix):])
        return slide_id if slide_id in self.server.outputs.ids else None

    def _authorised(self, query: dict) -> str | None:
        """None when refused; else the Set-Cookie value to send ('' when there is none to send)."""
        token = self.server.token
        if token is None:
            return "" if urlsplit("//" + self.headers.get("Host", "")).hostname in _LOOPBACK_NAMES else None
        given = query.get("token", [None])[0]
        if given is not None and hmac.compare_digest(given.encode(), token.encode()):
            return f"{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
        jar = SimpleCookie(self.headers.get("Cookie", ""))
        held = jar[TOKEN_COOKIE].value if TOKEN_COOKIE in jar else ""
        return "" if hmac.compare_digest(held.encode(), token.encode()) else None

    # ---------------------------------------------------------------- answers
    def _not_found(self, head: bool):
        self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", head=head)

    def _send(self, status: HTTPStatus, body: bytes, kind: str, *, head: bool, cookie: str = ""):
        try:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "private, max-age=3600" if kind == "image/jpeg" else "no-cache")
            for name, value in _SECURITY_HEADERS.items():
                self.send_header(name, value)
            if cookie:
                self.send_header("Set-Cookie", cookie)
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client went away; its thread ends, the server carries on
