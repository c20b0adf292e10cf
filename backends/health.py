"""Is a vLLM server ready to serve? Both /health and the model list must say so.

vLLM has been seen answering /health 200 before its OpenAI routes serve, so readiness also
needs /v1/models to list the served name.
"""

from __future__ import annotations

import httpx


async def is_ready(client: httpx.AsyncClient, url: str, name: str, api_key: str | None) -> bool:
    try:
        health = await client.get(f"{url}/health")
        if health.status_code != 200:
            return False
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        models = await client.get(f"{url}/v1/models", headers=headers)
        if models.status_code != 200:
            return False
        return any(card.get("id") == name for card in models.json().get("data", []))
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


async def is_healthy(client: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await client.get(f"{url}/health")).status_code == 200
    except httpx.HTTPError:
        return False
