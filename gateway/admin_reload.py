"""`POST /admin/reload`: read the config file again and apply what changed (``gateway.reload``).

    POST /admin/reload                 the plan applied: each model's action and why
    POST /admin/reload?dry_run=true    the plan only; nothing changes

A file that does not validate, or a plan that cannot apply, answers 400 with every problem and
changes nothing. Admin keys only (``gateway.auth``); the access log names the key.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.responses import Response

from gateway.admin import json_response
from gateway.keys import SCOPE_KEY, ApiKey
from gateway.reload import Reloader


def add_reload_route(api: FastAPI, reloader: Reloader) -> None:
    @api.post("/admin/reload")
    async def reload(request: Request, dry_run: bool = False) -> Response:
        key: ApiKey | None = request.scope.get(SCOPE_KEY)
        by = key.name if key else "-"
        tracing = reloader.runtime.telemetry.tracing  # a span, as for every admin action
        spanned = tracing.admin("reload", "-", by, request.scope["headers"]) if tracing else None
        with spanned or contextlib.nullcontext() as span:
            plan = await reloader.reload(by, dry_run=dry_run)
            if span is not None:
                result = "dry_run" if dry_run else "applied"
                span.set_attribute("vllm_gateway.admin.result", result)
        return json_response(plan)
