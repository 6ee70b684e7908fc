"""The bot restarts its own worker when the worker is up but its answers keep failing: its
/health says "unhealthy" (model.engine: requests failed by the model in a row)."""

import asyncio

import pytest
from aiohttp import web

from bot.supervisor import UNHEALTHY_PROBES, WorkerState, WorkerSupervisor
from model.config import Config


@pytest.mark.asyncio
async def test_a_worker_whose_health_says_unhealthy_is_restarted_and_a_healthy_one_is_left_alone():
    said = {"status": "ok"}
    app = web.Application()
    app.router.add_get("/health", lambda request: web.json_response(said))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sup = WorkerSupervisor(Config())
    sup.base_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    sup.state = WorkerState.READY
    stopped = []

    async def terminate():  # what _watch then restarts; here: count the stops
        stopped.append(said["status"])

    sup._terminate = terminate
    probe = asyncio.create_task(sup._probe(every_s=0.02))
    try:
        await asyncio.sleep(0.02 * (UNHEALTHY_PROBES + 5))
        assert stopped == []  # ok: left alone
        said["status"] = "unhealthy"
        for _ in range(200):
            if stopped:
                break
            await asyncio.sleep(0.02)
        assert stopped == ["unhealthy"]
    finally:
        probe.cancel()
        await runner.cleanup()


def test_two_bots_on_one_machine_do_not_fight_over_a_worker_port():
    import socket

    from model.config import SERVE_PORT

    # Another bot's worker (or anything else) already listens on the port `model serve` uses.
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            taken.bind(("127.0.0.1", SERVE_PORT))
        except OSError:
            pass  # something real holds it: the same situation
        taken.listen()
        first, second = WorkerSupervisor(Config()), WorkerSupervisor(Config())
        assert SERVE_PORT not in (first.port, second.port)
        for sup in (first, second):
            with socket.socket() as s:
                s.bind(("127.0.0.1", sup.port))  # free: the worker can listen there
    configured = Config()
    configured.worker.port = 9123
    assert WorkerSupervisor(configured).port == 9123  # a port the admin sets is kept
