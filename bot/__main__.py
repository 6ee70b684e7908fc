"""`python -m bot [--config FILE]`: run the Discord bot, or the terminal mode without a token.

`python -m bot config [--config FILE] [--reference]` prints the configuration a run uses (every
key, the training profile applied) as YAML, or the key reference (docs/CONFIGURATION.md).

With the Discord token env var (`discord.token_env`) set, the bot connects to
Discord and logs to stderr (a service's log); without it, `bot.local` runs the
same core as a terminal chat and logs to `bot.log` in the data directory
(`--verbose`: on the terminal). Start-up problems (bad config, unusable store,
no model) stop with one line saying what to fix.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from model.config import ConfigError, effective_yaml, load_config, reference_markdown, secret

from bot.store import StoreError
from bot.supervisor import WorkerStartError

log = logging.getLogger("bot")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bot", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="config file (default: $LOOPCORD_CONFIG or ./config.yaml)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="terminal mode: show the logs (ours, the worker's, the trainer's) on the terminal "
                        "instead of only in the data directory's bot.log")
    sub = p.add_subparsers(dest="command", metavar="config")
    c = sub.add_parser("config", help="print the effective configuration (training profile applied) as YAML")
    c.add_argument("--config", default=argparse.SUPPRESS,
                   help="config file (default: $LOOPCORD_CONFIG or ./config.yaml)")
    c.add_argument("--reference", action="store_true", help="print the key reference (docs/CONFIGURATION.md) instead")
    return p.parse_args(argv)


async def _run_until_signalled(coro) -> None:
    """Run `coro`; SIGTERM/SIGINT cancel it so shutdown (worker included) runs in order."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, task.cancel)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await task
    except asyncio.CancelledError:
        log.info("shutting down")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "config":
        try:
            print(reference_markdown() if args.reference else effective_yaml(load_config(args.config)), end="")
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    # Records go to stderr; in terminal mode (without --verbose) bot.local points stderr at
    # the log file, so this one handler serves both modes.
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    try:
        cfg = load_config(args.config)
        token = secret(cfg.discord.token_env)
        if token is None:
            from bot.local import main as local_main  # the terminal front-end

            return local_main(cfg, verbose=args.verbose) or 0
        from bot.discord_app import run_discord

        asyncio.run(_run_until_signalled(run_discord(cfg, token)))
    except (ConfigError, StoreError, WorkerStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
