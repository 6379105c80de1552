"""A real embedded-engine server in a background thread of the test process (shared by rollout and transfer tests)."""

from __future__ import annotations


class ServerThread:
    """A real :class:`EngineServer` on 127.0.0.1 (free port), its event loop in a background thread.

    In-process so that tests can look at the server's state (fields read, pause
    flags) while talking to it over real HTTP.
    """

    def __init__(self, engine, **kw) -> None:  # type: ignore[no-untyped-def]
        import asyncio
        import threading

        from aiohttp import web

        from miles.engine.server import EngineServer
        from miles.job.ports import free_port

        self.server = EngineServer(engine, **kw)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(self.server.app())
        started = threading.Event()

        async def start() -> None:
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        def run() -> None:
            self.loop.run_until_complete(start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(30)

    def call(
        self, method: str, path: str, body: object = None, key: str | None = None, timeout: float = 60.0
    ) -> tuple[int, object]:
        """One HTTP request; returns (status, parsed JSON or text or None)."""
        import json
        import urllib.error
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        if not raw:
            return status, None
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()

    def stop(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
