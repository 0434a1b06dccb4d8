"""Admin routes: load and unload adapters while serving.

Always behind the API key (refused with 403 when the server has none). Loads only from under
``--adapter-root``: checked when the request comes in, and again on every (re)load, with each file
opened from the root without following symlinks (:mod:`lorakit.io.rooted`), so a folder swapped
for a link after registration can't smuggle in an outside adapter. The load itself runs
on the engine's worker thread between decode steps, so running requests are never disturbed.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request

from lorakit.serve import protocol as P
from lorakit.serve.engine import Engine
from lorakit.serve.http import ServeSettings, check_key, parse, read_json
from lorakit.serve.registry import AdapterRegistry, check_name


def add_admin_routes(app: FastAPI, engine: Engine, registry: AdapterRegistry, settings: ServeSettings) -> None:
    async def on_worker(fn):
        return await asyncio.wait_for(asyncio.wrap_future(engine.call(fn)), timeout=settings.request_timeout)

    @app.get("/v1/adapters")
    async def list_adapters(request: Request):
        check_key(request, settings, admin=True)
        loaded = registry.loaded
        return {"object": "list", "max_loaded": registry.max_loaded,
                "data": [{"id": n, "object": "adapter", "path": str(p), "loaded": n in loaded}
                         for n, p, _ in registry.names()]}

    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        check_key(request, settings, admin=True)
        req = parse(P.AdapterLoadRequest, await read_json(request, settings.max_body_bytes, settings.body_timeout))
        path = registry.check_new(req.name, req.path)
        loaded = await on_worker(lambda: registry.add(req.name, path, load=req.load, pinned=engine.pinned(),
                                                            rooted=True))
        return {"id": req.name, "object": "adapter", "path": str(path), "loaded": loaded}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        check_key(request, settings, admin=True)
        check_name(name)
        await on_worker(lambda: registry.remove(name, engine.pinned()))
        return {"id": name, "object": "adapter", "deleted": True}
