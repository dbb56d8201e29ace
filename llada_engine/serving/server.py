"""`llada-engine serve`: load a checkpoint, run the engine's loop in its background thread and serve the
OpenAI-compatible app (app.py) with uvicorn until SIGINT or SIGTERM.

Once it listens it prints `llada-engine serve: MODEL on http://HOST:PORT` on stdout (the real port with
--port 0). The first SIGINT or SIGTERM stops accepting connections and gives the running requests up to
--shutdown-timeout seconds to finish; those still running then are cancelled (their streams end), the engine's
loop stops (cancelling anything still queued) and the command returns 0. A second SIGINT quits at once.

Under torchrun with --parallel tp every rank loads its part of the model and builds the same engine; only rank 0
listens. Its engine's steps are mirrored on the other ranks (llada_engine/parallel/lockstep.py), which ignore
SIGINT and SIGTERM (torchrun passes them on to every rank) and end when rank 0's engine stops.
"""
import argparse
import os
import signal
import sys

import uvicorn

API_KEY_ENV = "LLADA_API_KEY"
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Server(uvicorn.Server):
    """uvicorn's server, saying where it listens once it does."""

    def __init__(self, config: uvicorn.Config, model_name: str):
        super().__init__(config)
        self.model_name = model_name

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        print(f"llada-engine serve: {self.model_name} on http://{host}:{port}", flush=True)


def serve(args: argparse.Namespace) -> int:
    import llada_engine
    from llada_engine.cli import _checkpoint, _load, _stop

    folder, _ = _checkpoint(args)
    tokenizer = llada_engine.load_tokenizer(folder)       # on every rank: a missing tokenizer stops them all
    model, main = _load(args, folder)
    try:
        lockstep = None
        if args.parallel is not None:
            from llada_engine.parallel import Lockstep

            lockstep = Lockstep(model.parallel.group)
        engine = llada_engine.Engine(model, max_running=args.max_running, cache_tokens=args.cache_tokens,
                                     block_length=args.block_length, compile=args.compile, lockstep=lockstep)
        if not main:
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
            engine.follow()
            print(f"llada-engine serve: rank {model.parallel.rank} stopped", file=sys.stderr, flush=True)
            return 0
        return _listen(args, folder, engine, tokenizer)
    finally:
        _stop(args)


def _listen(args: argparse.Namespace, folder, engine, tokenizer) -> int:
    from .app import create_app

    model_name = args.served_model_name or str(args.model)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(engine, tokenizer, model_name=model_name, chat_checkpoint=folder,
                     api_key=api_key, defaults=dict(mask_id=args.mask_id))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = _Server(config, model_name)
    # uvicorn re-raises the signal that stopped it once it has shut down: these handlers make that a no-op,
    # so that the command ends with its own status after the engine has stopped.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in HANDLED_SIGNALS}
    engine.start()
    try:
        server.run()
    finally:
        engine.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("llada-engine serve: stopped", file=sys.stderr, flush=True)
    return 0 if server.started else 1
