"""GET /console (the web console), / (redirects there), /docs and /redoc served offline.

The console is plain ES modules, HTML and CSS shipped inside this package: no build step and
no CDN. Swagger UI and ReDoc come from the installed ``fastapi-offline`` package's assets, so
the API reference works without a network. None of these routes is part of the API schema.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(str(files("service.console").joinpath("static")))
CONSOLE_ASSETS = "/console/static"
DOCS_ASSETS = "/docs/assets"

# The pages may load only from this server: a bundled asset that points elsewhere (ReDoc's
# sidebar logo does) is blocked in the browser instead of leaking a request to another host.
# Swagger UI starts from an inline script; ReDoc and Swagger inject styles; ReDoc's search runs
# in a blob: worker.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' {script}; worker-src 'self' blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


def _csp(*, inline_scripts: bool = False) -> dict[str, str]:
    script = "'unsafe-inline'" if inline_scripts else ""
    return {"Content-Security-Policy": CONTENT_SECURITY_POLICY.format(script=script)}


def _docs_assets_dir() -> Path:
    return Path(str(files("fastapi_offline").joinpath("static")))


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/console", status_code=307)


@router.get("/console")
def console() -> FileResponse:
    # The shell changes with every release: the browser revalidates it, the modules it loads too.
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache", **_csp()})


@router.get("/docs")
def swagger_ui() -> HTMLResponse:
    page = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="lorastack API",
        swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        # No online validator badge: the page must not reach another host.
        swagger_ui_parameters={"validatorUrl": None},
    )
    page.headers.update(_csp(inline_scripts=True))
    return page


@router.get("/redoc")
def redoc() -> HTMLResponse:
    page = get_redoc_html(
        openapi_url="/openapi.json",
        title="lorastack API",
        redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
        redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        with_google_fonts=False,
    )
    page.headers.update(_csp())
    return page


def install_console(app: FastAPI) -> None:
    """Add the console, the redirect and the offline docs to an app built with docs_url=None."""
    app.include_router(router)
    app.mount(
        CONSOLE_ASSETS,
        StaticFiles(directory=STATIC_DIR, follow_symlink=False),
        name="console-static",
    )
    app.mount(DOCS_ASSETS, StaticFiles(directory=_docs_assets_dir()), name="docs-assets")
