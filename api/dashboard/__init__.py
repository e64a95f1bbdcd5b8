"""The operator dashboard: server-rendered pages under /dashboard, live through Server-Sent Events."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from api.dashboard import actions, pages
from api.dashboard.session import LoginRequired, session_secret
from core.settings import Settings


def install(app: FastAPI, settings: Settings) -> None:
    app.state.session_secret = session_secret(settings)
    app.mount("/dashboard/static", StaticFiles(directory=Path(__file__).parent / "static"), name="dashboard-static")
    app.include_router(pages.router)
    app.include_router(actions.router)

    @app.exception_handler(LoginRequired)
    async def _login(_: Request, exc: LoginRequired) -> RedirectResponse:
        return RedirectResponse(f"/dashboard/login?next={quote(exc.next_url)}", status_code=303)

    @app.get("/", include_in_schema=False)
    async def _root() -> RedirectResponse:
        return RedirectResponse("/dashboard", status_code=307)
