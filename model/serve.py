"""`python -m model serve`: start the worker process (flags override config, as `vllm serve`).

    python -m model serve [--config FILE] [--model PATH] [--host H] [--port P]
                          [--served-model-name N] [--lora NAME=PATH ...] [--adapter-root DIR ...]
                          [--max-batch-size N] [--max-queue N] [--device D] [--dtype T] [--cpu-threads N]
                          [--allow-public-without-key]

Loads the base and the configured adapters, serves until SIGTERM/SIGINT, then
stops accepting (503), drains in-flight requests for up to
`worker.drain_timeout_s` and exits 0. Bad configuration exits 2 with one line.

The key is read from the environment variable named by `model.api_key_env`
(LOOPCORD_WORKER_KEY). Without one the control routes are refused, and a bind
beyond loopback is refused unless --allow-public-without-key is given.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import ipaddress
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from model.config import SERVE_PORT, ConfigError, load_config, secret

log = logging.getLogger("loopcord.worker")

DRAIN_POLL_S = 0.05
SHUTDOWN_GRACE_S = 2.0  # after the drain: how long still-open connections get before they are cut
EXIT_CONFIG_ERROR = 2


class ServeError(Exception):
    """Start-up cannot continue; the message tells the user what to change."""


SERVE_DESCRIPTION = (
    "Serve the base model and its LoRA adapters over an OpenAI-compatible HTTP API (the subset vLLM "
    "speaks: /v1/chat/completions with streaming, /v1/models, /v1/load_lora_adapter, "
    "/v1/unload_lora_adapter, /health, /metrics, /sleep, /wake_up). Flags override config.yaml. "
    "The bearer key comes from the environment variable named by model.api_key_env "
    "(LOOPCORD_WORKER_KEY): without it, sleep/wake and adapter loading are refused."
)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model", description="loopcord model worker")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API", description=SERVE_DESCRIPTION)
    serve.add_argument("--config", help="config file (default: config.yaml or $LOOPCORD_CONFIG)")
    serve.add_argument("--model", help="base model directory or .gguf file (overrides model.base; a GGUF is "
                       "converted into model.cache_dir once)")
    serve.add_argument("--host", help="bind address (overrides worker.host)")
    serve.add_argument("--port", type=int, help="port (overrides worker.port; 0 picks a free one)")
    serve.add_argument("--served-model-name", help="the base model's id in the API (default: its path)")
    serve.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                       help="load a LoRA adapter at start (repeatable; adds to worker.adapters)")
    serve.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                       help="a directory /v1/load_lora_adapter may load from (repeatable; the registry "
                            "(training.registry_dir) and the start-up adapters are always allowed)")
    serve.add_argument("--allow-public-without-key", action="store_true",
                       help="bind a non-loopback --host even though no key is set (anyone who can reach "
                            "the port can use the model)")
    serve.add_argument("--max-batch-size", type=int, help="overrides worker.max_batch_size")
    serve.add_argument("--max-queue", type=int, help="overrides worker.max_queue")
    serve.add_argument("--device", help="overrides worker.device (auto, cpu, cuda, cuda:N)")
    serve.add_argument("--dtype", help="overrides worker.dtype")
    serve.add_argument("--cpu-threads", type=int, help="overrides worker.cpu_threads (torch threads on CPU)")
    return parser.parse_args(argv)


def startup_adapters(cfg, lora_flags: list[str]) -> dict[str, str]:
    adapters = {name: str(cfg.path(p)) for name, p in cfg.worker.adapters.items()}
    for flag in lora_flags:
        name, sep, path = flag.partition("=")
        if not sep or not name or not path:
            raise ServeError(f"--lora {flag!r}: expected NAME=PATH")
        adapters[name] = path
    return adapters


def adapter_roots(cfg, args, startup: dict[str, str]) -> list[Path]:
    """Where /v1/load_lora_adapter may load from: the registry, start-up adapters, --adapter-root."""
    roots = [cfg.path(cfg.training.registry_dir), *(Path(p) for p in startup.values()),
             *(Path(p) for p in args.adapter_root)]
    return [Path(r).expanduser().resolve() for r in roots]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: Optional[str], allow_public: bool) -> None:
    if not api_key and not is_loopback(host) and not allow_public:
        raise ServeError(f"--host {host} would serve the model to the network without a key: set one in the "
                         "environment variable named by model.api_key_env (LOOPCORD_WORKER_KEY), or pass "
                         "--allow-public-without-key if that is really what you want")


def build_worker(cfg, args):
    """Load the model and adapters; returns the server.Worker (torch imported here)."""
    from model.adapters import AdapterTable, linear_shapes, read_adapter
    from model.engine import Engine
    from model.errors import APIError
    from model.loading import LoadError, load_base, serving_base
    from model.metrics import WorkerMetrics
    from model.server import Worker

    try:  # --model, else model.base, else the embedded default (a GGUF base is converted once)
        base = str(serving_base(cfg, args.model, log.info))
    except LoadError as exc:
        raise ServeError(str(exc)) from None
    threads = args.cpu_threads if args.cpu_threads is not None else cfg.worker.cpu_threads
    if threads is not None and threads < 1:
        raise ServeError(f"worker.cpu_threads: must be at least 1, got {threads}")
    kv_mb = cfg.worker.kv_cache_mb  # validated with the config
    loaded = load_base(base, args.device or cfg.worker.device, args.dtype or cfg.worker.dtype,
                       cfg.worker.max_context, cpu_threads=threads)
    shapes = linear_shapes(loaded.model)
    table, metrics = AdapterTable(), WorkerMetrics()
    engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_ids, loaded.device,
                    args.max_batch_size or cfg.worker.max_batch_size, args.max_queue or cfg.worker.max_queue,
                    table, metrics, kv_cache_bytes=-1 if kv_mb is None else kv_mb * 2**20)
    startup = startup_adapters(cfg, args.lora)
    for name, path in startup.items():
        try:
            files = read_adapter(path, shapes)
        except APIError as exc:
            raise ServeError(f"adapter {name!r}: {exc.message}") from None
        internal = table.new_internal_name()
        engine.load_adapter(internal, path, files)  # engine thread not started yet: safe here
        table.publish(name, internal, path, files.digest)
    # The HTTP loop encodes prompts while the engine thread decodes: separate tokenizer
    # objects, since a fast tokenizer is not safe to share across threads ("Already borrowed").
    return Worker(engine=engine, tokenizer=copy.deepcopy(loaded.tokenizer), base_id=args.served_model_name or (args.model or base),
                  base_path=base, device=loaded.device, dtype=loaded.dtype, max_context=loaded.max_context,
                  linear_shapes=shapes, adapters=table, metrics=metrics, api_key=secret(cfg.model.api_key_env),
                  adapter_roots=adapter_roots(cfg, args, startup))


async def drain(worker, timeout: float) -> None:
    """Refuse new requests (503) and wait for in-flight ones, up to `timeout` seconds."""
    worker.begin_drain()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.active == 0 and worker.engine.running() == 0 and worker.engine.waiting() == 0:
            return
        await asyncio.sleep(DRAIN_POLL_S)
    log.warning("drain timeout (%.0fs): %d request(s) cut off", timeout, worker.active)


async def serve(worker, host: str, port: int, drain_timeout: float) -> None:
    from aiohttp import web

    from model.server import WorkerRunner, build_app

    # handler_cancellation: a client that disconnects cancels its handler, which frees its slot.
    # shutdown_timeout: by the time the runner is cleaned up, drain() has already waited.
    runner = WorkerRunner(build_app(worker), handler_cancellation=True, access_log=None,
                          shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = site._server.sockets[0].getsockname()[1]
    worker.engine.start()
    if not worker.api_key:
        log.warning("no key set (model.api_key_env): /sleep, /wake_up and adapter load/unload are refused")
    log.info("loopcord worker serving http://%s:%d base=%s device=%s dtype=%s adapters=%s",
             host, bound_port, worker.base_id, worker.device, worker.dtype, worker.adapters.paths() or "{}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight requests (up to %.0fs)", drain_timeout)
    await drain(worker, drain_timeout)
    await runner.cleanup()
    worker.engine.stop()
    worker.tokenize_pool.shutdown(wait=False, cancel_futures=True)
    log.info("stopped")


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
        host = args.host or cfg.worker.host
        check_bind(host, secret(cfg.model.api_key_env), args.allow_public_without_key)
        worker = build_worker(cfg, args)
    except (ConfigError, ServeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except Exception as exc:
        from model.loading import LoadError

        if isinstance(exc, LoadError):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        raise
    port = (cfg.worker.port or SERVE_PORT) if args.port is None else args.port
    asyncio.run(serve(worker, host, port, cfg.worker.drain_timeout_s))
    return 0
