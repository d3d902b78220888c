"""`longmem serve`: one model in a process, many named memories on disk, over HTTP.

    from longmem.server import ServerConfig, serve
    serve(ServerConfig(model="default", data_dir="memories"))

The pieces, one idea per module: `config` (what a deployment sets), `auth` (names and
tokens), `store` (memories on disk and the LRU of loaded ones), `scheduler` (the model's one worker
thread, which batches generations for different memories into one forward), `service` (what a
request does: checks, locks, jobs, appends), `limits` (request bodies), `schemas` (the HTTP
request and response shapes), `prompts` (chat messages as one prompt), `app` (the routes). Design notes: docs/server.md.

FastAPI and uvicorn are imported only here, never by `import longmem` (`pip install longmem[serve]`).
"""

_EXPORTS = {"ServerConfig": "longmem.server.config", "create_app": "longmem.server.app", "serve": "longmem.server.app"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'longmem.server' has no attribute {name!r}")


__all__ = list(_EXPORTS)
