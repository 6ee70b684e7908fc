"""A second training process on a CPU: data parallel over two cores (the all-reduce: trainer.shard).

One trainer process with one compute thread leaves the other core of a 2-core box
idle (more threads spin-wait under load; see training.cpu_threads). Where a core is
spare, `Helper` starts a second process with its own copy of the base that works
beside the trainer:

- it answers half of the prompts the base has to answer (the general replay rows
  of a first run, `answer`);
- it trains as rank 1 of a two-process gloo group (`train`): every micro-batch is
  split by rows between the two, each computes the summed loss of its rows over the
  answer tokens of the whole batch, and the LoRA gradients are all-reduced before
  each optimizer step, so both step identically from identical weights (rank 0's
  are broadcast first) and the result is the one-process run's up to float
  summation order (tests/test_parallel.py).

The helper starts while the trainer loads and builds its data, and a helper that
fails before training leaves the trainer on its own (logged), never failing the run.
Once the two train together, a helper that dies fails the step with a clear error
(gloo reports the closed connection) instead of hanging.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from model.process import die_with_parent
from trainer import sft
from trainer.generate import greedy_replies
from trainer.progress import log
from trainer.shard import GROUP_TIMEOUT_S, GlooShard, Shard

JOIN_TIMEOUT_S = 120  # a helper that is not ready to train by then is left behind


class Helper:
    """A child process with the base model loaded, taking `answer` and `train` requests."""

    def __init__(self, base: str, threads: int):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_helper_main, args=(str(base), threads, child), daemon=True,
                                 name="loopcord-train-helper")
        self._proc.start()
        child.close()
        self._dir = tempfile.mkdtemp(prefix="loopcord-dp-")
        self.alive = True

    # -- requests ---------------------------------------------------------

    def _receive(self, timeout: Optional[float]):
        if not self.alive:
            return None
        try:
            if timeout is not None and not self._conn.poll(timeout):
                raise TimeoutError(f"no answer in {timeout:.0f} s")
            kind, value = self._conn.recv()
        except (EOFError, OSError, TimeoutError) as exc:
            log(f"the helper process stopped ({type(exc).__name__}: {exc}); going on in one process")
            self.stop()
            return None
        if kind == "error":
            log(f"the helper process failed ({value}); going on in one process")
            self.stop()
            return None
        return value

    def answer_start(self, prompts: list, max_new_tokens: int) -> bool:
        """Send prompts to answer with the base (greedy); False if the helper is gone."""
        return self._send(("answer", prompts, max_new_tokens))

    def answer_result(self) -> Optional[list]:
        return self._receive(None)

    def train_shard(self, adapter: Optional[str], hp, samples: list) -> Shard:
        """Rank 1 starts training on `samples` beside us; our own Shard (rank 0 of 2), or
        the whole batch alone when the helper cannot take part."""
        store = str(Path(self._dir) / f"store-{os.urandom(4).hex()}")
        if not self._send(("train", adapter, hp, samples, store)):
            return Shard()
        if self._receive(JOIN_TIMEOUT_S) != "joining":
            return Shard()
        try:
            return GlooShard(rank=0, world=2, store=store).join()
        except Exception as exc:
            log(f"the helper process did not join training ({type(exc).__name__}: {exc}); going on in one process")
            self.stop()
            return Shard()

    def train_result(self) -> None:
        self._receive(GROUP_TIMEOUT_S)

    def _send(self, message) -> bool:
        if not self.alive:
            return False
        try:
            self._conn.send(message)
            return True
        except (OSError, BrokenPipeError) as exc:
            log(f"the helper process is gone ({exc}); going on in one process")
            self.stop()
            return False

    def stop(self) -> None:
        if self.alive:
            self.alive = False
            try:
                self._conn.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
            self._conn.close()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)
        shutil.rmtree(self._dir, ignore_errors=True)


def _helper_main(base: str, threads: int, conn) -> None:  # the child process
    die_with_parent()
    sys.stdout = sys.stderr  # the trainer's stdout is the bot's JSON-lines channel
    try:
        import torch  # slow to import: only in the helper process, which needs it at once

        if threads > 0:
            torch.set_num_threads(threads)
        model, tokenizer = sft.load_base(base)
        model.eval()
    except Exception as exc:
        conn.send(("error", f"loading {base}: {type(exc).__name__}: {exc}"))
        return
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        try:
            if message[0] == "answer":
                conn.send(("ok", greedy_replies(model, tokenizer, message[1], message[2])))
            elif message[0] == "train":
                _, adapter, hp, samples, store = message
                # training attaches LoRA to this copy: one training per helper
                trainee = sft.with_lora(model, hp, adapter)
                conn.send(("ok", "joining"))
                shard = GlooShard(rank=1, world=2, store=store).join()
                try:
                    sft.train(trainee, tokenizer, samples, hp, shard=shard)
                finally:
                    shard.close()
                conn.send(("ok", "done"))
                return
            else:
                return
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            return
