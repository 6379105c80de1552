"""The engine side of ``miles bench sync``: miles' embedded engine server holding a model of any shape.

The sync benchmark must measure miles' real receive path: the engine's HTTP
handlers (``/init_weights_update_group``, ``/update_weights_from_distributed``),
the flattened-bucket unpacking and :meth:`Engine.load_weights` copying every
tensor into the model by name. So this process runs the real
:class:`~miles.engine.server.EngineServer` around a real
:class:`~miles.engine.core.Engine`. Only the way the model comes to exist
differs from ``python -m miles.engine.server``: a 16 GiB checkpoint written to
disk just to be read back would cost minutes and the disk, so the engine is
built on a tiny built-in directory (for its tokenizer) and its model is then
replaced by the benchmark's shape, allocated directly on the device (zeroed:
the sync overwrites every weight). The server answers ``/ready`` and is not
meant to generate (its tokenizer does not cover the model's vocabulary).

Run by the benchmark itself::

    python -m miles.bench.receiver --config-json cfg.json --dtype bfloat16 --device cuda:1 \
        --port 31000 --ready-file DIR/engine-1.url [--done-file DIR/done]

It writes ``http://host:port`` to ``--ready-file`` once it listens, and exits
when ``--done-file`` appears (how a Slurm job's sender ends its receivers) or on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from miles.bench.report import write_atomic
from miles.bench.shapes import hf_config
from miles.engine.core import DTYPES, Engine
from miles.engine.server import EngineServer
from miles.job.ports import free_port
from miles.model.builtin import materialize

log = logging.getLogger("miles.bench.receiver")


def build_engine(config: dict[str, Any], dtype: str, device: str, workdir: Path) -> Any:
    """A real :class:`Engine` whose model has the shape of ``config`` (weights zeroed, on ``device``)."""
    import torch
    from transformers import AutoModelForCausalLM

    stub = materialize("tiny-arith", workdir / "stub", seed=0)
    engine = Engine(stub, device="cpu", dtype="float32", max_batch_size=1)
    with torch.device("meta"):
        model: Any = AutoModelForCausalLM.from_config(hf_config(config))
    model = model.to(DTYPES[dtype]).to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # touch every page now, not during the first timed sync
    model.eval()
    model.requires_grad_(False)
    engine.model = model
    engine.config = model.config
    engine.device = torch.device(device)
    engine.dtype = DTYPES[dtype]
    engine.vocab_size = int(model.config.vocab_size)
    engine.max_context = int(getattr(model.config, "max_position_embeddings", 1 << 30) or 1 << 30)
    return engine


async def _wait_for(done_file: str | None) -> None:
    """Return once ``done_file`` exists (never, without one)."""
    while done_file is None or not Path(done_file).exists():
        await asyncio.sleep(0.5)


def serve(
    config: dict[str, Any],
    dtype: str,
    device: str,
    host: str,
    port: int,
    ready_file: str | None,
    done_file: str | None,
    announce_host: str | None = None,
) -> None:
    """Serve the engine until SIGTERM/SIGINT or until ``done_file`` exists (blocking)."""
    from aiohttp import web
    from aiohttp.web_runner import GracefulExit

    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))  # NCCL binds the weight-update group to the current GPU
    with tempfile.TemporaryDirectory(prefix="miles-bench-engine-") as tmp:
        engine = build_engine(config, dtype, device, Path(tmp))
        server = EngineServer(
            engine,
            batch_wait_ms=0.0,
            served_model_name="miles-bench",
            settings={"host": host, "port": port, "device": device, "dtype": dtype},
        )

        async def run() -> None:
            runner = web.AppRunner(server.app(), handle_signals=True)
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
            if ready_file:
                write_atomic(Path(ready_file), f"http://{announce_host or host}:{port}\n")
            try:
                await _wait_for(done_file)
            finally:
                await runner.cleanup()

        try:
            asyncio.run(run())
        except (KeyboardInterrupt, GracefulExit):
            pass


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m miles.bench.receiver", description="engine side of `miles bench sync`")
    p.add_argument("--config-json", required=True, help="HF config dict of the benchmarked model (JSON file)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--announce-host", default=None, help="host name written to --ready-file (default: --host)")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--ready-file", default=None)
    p.add_argument("--done-file", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    port = a.port
    if port == 0:
        port = free_port(host=a.host if a.host != "0.0.0.0" else "127.0.0.1")
    announce = a.announce_host or (socket.gethostname() if a.host == "0.0.0.0" else a.host)
    serve(
        json.loads(Path(a.config_json).read_text()),
        a.dtype,
        a.device,
        a.host,
        port,
        a.ready_file,
        a.done_file,
        announce_host=announce,
    )


if __name__ == "__main__":
    main()
