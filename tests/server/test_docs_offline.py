"""/docs and /redoc work without internet: the pages reference no other host, every asset they reference
is served by the app (200, the right content type, the packaged file's bytes), and the assets follow the
docs' access rule (`public_discovery`)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tta_server import docs_assets

KEY = "docs-key-0123456789abcdef"
EXPECTED_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


class _References(HTMLParser):
    """Every URL an HTML page makes the browser fetch: src/href attributes and Swagger's spec `url`."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "spec-url") and value:
                self.urls.append(value)
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts.append(data)
            # SwaggerUIBundle({url: '/openapi.json', oauth2RedirectUrl: ..., ...})
            self.urls += re.findall(r"""(?:url|oauth2RedirectUrl)['"]?\s*:\s*['"]([^'"]+)['"]""", data)


def references(html: str) -> list[str]:
    parser = _References()
    parser.feed(html)
    return parser.urls


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_reference_no_other_host_and_their_assets_load(make_client, page: str) -> None:
    client = make_client()
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = references(r.text)
    assets = [u for u in urls if u.startswith(docs_assets.ASSETS_PATH + "/")]
    assert len(assets) >= 2, urls  # a script and the favicon at least (Swagger also has its CSS)
    for url in urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and url.startswith("/"), f"{page} references {url}"
    assert not re.search(r"(?i)\b(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", r.text.replace("http://www.w3.org", ""))
    folder = docs_assets.assets_dir()
    for url in assets:
        a = client.get(url)
        assert a.status_code == 200, url
        suffix = Path(url).suffix
        assert EXPECTED_TYPES[suffix] in a.headers["content-type"], (url, a.headers["content-type"])
        assert a.content == (folder / Path(url).name).read_bytes()
    spec = [u for u in urls if u.endswith("/openapi.json")]
    assert spec and client.get(spec[0]).json()["openapi"].startswith("3.")


def test_swagger_page_loads_the_bundle_css_and_turns_the_online_validator_off(make_client) -> None:
    html = make_client().get("/docs").text
    urls = references(html)
    for role in ("swagger_js", "swagger_css", "favicon"):
        assert f"{docs_assets.ASSETS_PATH}/{docs_assets.ASSETS[role]}" in urls, role
    assert re.search(r"""['"]validatorUrl['"]\s*:\s*null""", html), "the validator badge calls a public host"
    redoc = references(make_client().get("/redoc").text)
    assert f"{docs_assets.ASSETS_PATH}/{docs_assets.ASSETS['redoc_js']}" in redoc
    assert not any("fonts.googleapis" in u for u in redoc)


def test_the_assets_are_real_bundles() -> None:
    folder = docs_assets.assets_dir()
    swagger = (folder / docs_assets.ASSETS["swagger_js"]).read_text(errors="replace")
    assert "SwaggerUIBundle" in swagger and len(swagger) > 500_000
    redoc = (folder / docs_assets.ASSETS["redoc_js"]).read_text(errors="replace")
    assert "Redoc" in redoc and len(redoc) > 500_000


def test_docs_assets_follow_public_discovery(make_client) -> None:
    asset = f"{docs_assets.ASSETS_PATH}/{docs_assets.ASSETS['swagger_js']}"
    closed = make_client(api_keys=[f"team:{KEY}"])
    for path in ("/docs", "/redoc", asset):
        assert closed.get(path).status_code == 401, path
        assert closed.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path
    opened = make_client(api_keys=[f"team:{KEY}"], public_discovery=True)
    for path in ("/docs", "/redoc", asset):
        assert opened.get(path).status_code == 200, path
    # Only the assets folder is opened, not paths that merely start with its name.
    assert opened.get(docs_assets.ASSETS_PATH + "-x/y.js").status_code == 401
    assert opened.get(f"{docs_assets.ASSETS_PATH}/missing.js").status_code == 404


def test_docs_honour_root_path(pool) -> None:
    from fastapi.testclient import TestClient

    from tests.conftest import MODELS_YAML
    from tta_server.app import create_app
    from tta_server.settings import Settings

    app = create_app(Settings(models_config=MODELS_YAML), pool=pool)
    with TestClient(app, root_path="/tta") as client:
        urls = references(client.get("/docs").text)
    assert f"/tta{docs_assets.ASSETS_PATH}/{docs_assets.ASSETS['swagger_js']}" in urls
    assert "/tta/openapi.json" in urls
