"""The terminal chat as a user meets it: `python -m bot` with no Discord token.

Driven the way a person drives it — through a pseudo-terminal (Ctrl-C, Ctrl-D, arrow
keys, live bars) or a pipe (scripts) — against a vLLM-shaped server on 127.0.0.1 (so the
tests need no model), and once against the real worker on the tiny base (slow).
"""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import pty
import re
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from bot.local import ProgressDisplay
from tests.support.terminal import bot_env, run_piped, write_config

pytestmark = pytest.mark.slow  # runs `python -m bot` with its worker and trainer: the fast tier is `-m "not slow"`

ROOT = Path(__file__).resolve().parent.parent
LOG_NOISE = re.compile(r"\b(INFO|WARNING|DEBUG)\b|FutureWarning|UserWarning|Loading weights|Traceback")


def _controlling_terminal() -> None:  # pragma: no cover - runs in the child before exec
    """A new session whose controlling terminal is the pty: Ctrl-C there is a SIGINT."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyBot:
    """`python -m bot` on a pseudo-terminal: what a person at a keyboard sees and sends."""

    def __init__(self, config: Path, *args: str):
        self.master, slave = pty.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[3] |= termios.ISIG  # Ctrl-C / Ctrl-D mean what they mean on a real terminal
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self.proc = subprocess.Popen([sys.executable, "-m", "bot", "--config", str(config), *args], cwd=ROOT,
                                     stdin=slave, stdout=slave, stderr=slave, env=bot_env(),
                                     preexec_fn=_controlling_terminal)
        os.close(slave)
        self.output = b""
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.output += data

    @property
    def text(self) -> str:
        with self._lock:
            return self.output.decode("utf-8", "replace")

    async def expect(self, pattern: str, timeout: float = 30.0, after: int = 0) -> int:
        """Wait until `pattern` (regex) appears in the output after position `after`; its end."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.compile(pattern).search(self.text, after)
            if m:
                return m.end()
            if self.proc.poll() is not None:
                await asyncio.sleep(0.2)
                m = re.compile(pattern).search(self.text, after)
                if m:
                    return m.end()
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen; output so far:\n{self.text[after:]}")

    def send(self, data: str) -> None:
        os.write(self.master, data.encode())

    async def wait_exit(self, timeout: float) -> tuple[int, float]:
        start = time.monotonic()
        while self.proc.poll() is None:
            if time.monotonic() - start > timeout:
                self.kill()
                raise AssertionError(f"still running after {timeout} s; output:\n{self.text}")
            await asyncio.sleep(0.05)
        return self.proc.returncode, time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


async def started(tmp_path, fake_vllm, *args) -> PtyBot:
    bot = PtyBot(write_config(tmp_path, fake_vllm.url), *args)
    await bot.expect(r"you> ", timeout=60)
    return bot


# ------------------------------------------------------------------ keys


async def test_ctrl_c_at_the_idle_prompt_exits_at_once(tmp_path, fake_vllm):
    bot = await started(tmp_path, fake_vllm)
    bot.send("\x03")
    code, seconds = await bot.wait_exit(timeout=15)
    assert code == 130 and seconds < 5, bot.text
    assert not LOG_NOISE.search(bot.text), bot.text


async def test_ctrl_d_leaves_the_prompt_line_clean_and_exits_zero(tmp_path, fake_vllm):
    bot = await started(tmp_path, fake_vllm)
    at = len(bot.text)
    bot.send("\x04")
    code, _ = await bot.wait_exit(timeout=15)
    assert code == 0
    rest = bot.text[at:]
    assert rest.startswith("\r\n") and not rest.strip(), repr(rest)  # nothing lands on the `you>` line
    log = (tmp_path / "data" / "bot.log").read_text()
    assert "INFO" in log  # the log still happened: in the data directory's bot.log


async def test_ctrl_c_cancels_a_streaming_answer_and_a_second_one_quits(tmp_path, fake_vllm):
    fake_vllm.answers["base"] = " ".join(f"word{i}" for i in range(400))
    fake_vllm.token_delay_s = 0.05  # 20 s for the whole answer
    bot = await started(tmp_path, fake_vllm)
    bot.send("Tell me a long story.\r")
    at = await bot.expect(r"Loopcord> word0 word1")
    bot.send("\x03")
    at = await bot.expect(r"Answer cancelled", after=at, timeout=10)
    await bot.expect(r"you> ", after=at, timeout=10)
    assert "word399" not in bot.text
    bot.send("\x03")
    code, seconds = await bot.wait_exit(timeout=15)
    assert code == 130 and seconds < 5


async def test_line_editing_and_history_survive_a_restart(tmp_path, fake_vllm):
    bot = await started(tmp_path, fake_vllm)
    bot.send("/new\r")
    at = await bot.expect("New conversation.")
    bot.send("\x1b[A\r")  # up arrow: the last line again
    await bot.expect("New conversation.", after=at)
    bot.send("\x04")
    assert (await bot.wait_exit(timeout=15))[0] == 0
    history = tmp_path / "data" / "history"
    assert "/new" in history.read_text() and (history.stat().st_mode & 0o077) == 0
    bot = await started(tmp_path, fake_vllm)  # a new session remembers what was typed
    at = len(bot.text)
    bot.send("\x1b[A\r")
    await bot.expect("New conversation.", after=at)
    bot.send("\x04")
    await bot.wait_exit(timeout=15)


async def test_verbose_shows_the_log_on_the_terminal(tmp_path, fake_vllm):
    bot = await started(tmp_path, fake_vllm, "--verbose")
    assert "INFO" in bot.text
    bot.send("\x04")
    await bot.wait_exit(timeout=15)


# ------------------------------------------------------------------ commands, through a pipe


async def test_review_commands_say_what_happened_once_and_never_show_discord_mentions(tmp_path, fake_vllm):
    config = write_config(tmp_path, fake_vllm.url)
    result = await run_piped(config, "\n".join([
        "Who are you?", "/correct I am Loopcord.", "/corrections", "/reject 1", "/reject 1", "/approve 1",
        "/reopen 1", "/approve 1", "/retrain", "/quit"]) + "\n")
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert "Correction #1 saved as pending" in out
    assert "from you (terminal)" in out and "<@" not in out
    assert out.count("Correction #1 rejected.") == 1
    assert "Correction #1 is already rejected" in out
    assert "was rejected earlier" in out and "/reopen 1" in out
    assert "Correction #1 is pending again" in out and "Correction #1 approved" in out
    assert "Retraining" not in out and "No adapter is promoted yet" in out  # refused before announcing
    assert not LOG_NOISE.search(out) and not result.stderr.strip(), (out, result.stderr)


async def test_identity_claiming_correction_is_flagged_at_submission_and_approval(tmp_path, fake_vllm):
    config = write_config(tmp_path, fake_vllm.url)
    result = await run_piped(config, "Who are you?\n/correct I am ChatGPT, made by OpenAI.\n/corrections\n/approve 1\n")
    out = result.stdout
    assert out.count("claims another identity (") == 3, out  # on /correct, in the list, on /approve
    assert "Correction #1 approved" in out


async def test_a_5000_character_message_is_trimmed_with_a_notice_and_answered(tmp_path, fake_vllm):
    config = write_config(tmp_path, fake_vllm.url, model={"max_tokens": 512})  # the default answer room
    long_message = "Please summarise this: " + "lorem ipsum dolor sit amet " * 185  # ~5000 characters
    result = await run_piped(config, long_message + "\n")
    out = result.stdout
    assert "too long for me to read whole" in out and "max_tokens" not in out
    assert "Loopcord> base answer" in out
    (sent,) = [c["body"] for c in fake_vllm.calls("/v1/chat/completions")]
    question = sent["messages"][-1]["content"]
    assert len(question) < len(long_message) and long_message.startswith(question.rstrip("…"))


async def test_pending_corrections_per_user_are_capped(tmp_path, fake_vllm):
    config = write_config(tmp_path, fake_vllm.url, discord={"max_pending_corrections": 2})
    result = await run_piped(config, "Hi\n/correct one\n/correct two\n/correct three\n")
    assert "Correction #2 saved" in result.stdout and "Correction #3" not in result.stdout
    assert "You already have 2 corrections waiting for review" in result.stdout


async def test_forget_me_in_the_terminal_says_what_went(tmp_path, fake_vllm):
    config = write_config(tmp_path, fake_vllm.url)
    result = await run_piped(config, "Hi\n/flag\n/correct Hello!\n/forget-me\n/corrections\n")
    assert "I deleted 3 stored rows about you (1 answer to you, 1 reaction, 1 correction)" in result.stdout
    assert "until the next retrain" in result.stdout and "No pending corrections." in result.stdout


def test_gpu_device_is_one_line_not_a_traceback(tmp_path):
    config = write_config(tmp_path, "", worker={"device": "gpu"})
    result = subprocess.run([sys.executable, "-m", "bot", "--config", str(config)], cwd=ROOT, env=bot_env(),
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {config}: worker.device: must be auto, cpu, cuda or cuda:N, got 'gpu' (did you mean 'cuda'?)"]


# ------------------------------------------------------------------ progress


def _events(stage: str, total: int):
    yield {"event": "progress", "stage": stage, "step": 0, "total": total}
    for step in range(1, total + 1):
        yield {"event": "progress", "stage": stage, "step": step, "total": total, "loss": 2.0 / step, "eta_s": 1.0}


async def test_a_retrain_is_one_live_bar_per_stage_not_a_line_per_step():
    out = io.StringIO()
    out.isatty = lambda: True
    display = ProgressDisplay(out, live=True)
    for event in [*_events("calibrate", 144), {"event": "phase", "phase": "eval", "message": "evaluating v0003"},
                  *_events("eval", 20), {"event": "done", "command": "calibrate", "version": "v0003"}]:
        await display(event)
    display.close()
    lines = out.getvalue().split("\n")
    assert [line.rsplit("\r", 1)[-1].split(":")[0] for line in lines if line] == [
        "🛠️ calibrate", "🛠️ evaluating v0003", "🛠️ eval", "✅ calibrate v0003"]
    assert "144/144" in lines[0].rsplit("\r", 1)[-1] and "step 1/144" not in out.getvalue()


async def test_on_a_pipe_progress_is_a_line_when_a_stage_starts_and_ends():
    out = io.StringIO()
    display = ProgressDisplay(out, live=False)
    for event in _events("calibrate", 144):
        await display(event)
    display.close()
    assert out.getvalue().splitlines() == ["🛠️ calibrate: 144 steps…", "🛠️ calibrate: step 144/144 · loss 0.014"]


async def test_on_a_pipe_a_long_stage_says_where_it_is_every_so_often():
    # A log or CI pipe must not sit silent for minutes while the anchor trains (every 30 s by default).
    out = io.StringIO()
    display = ProgressDisplay(out, live=False, every_s=0.05)
    events = list(_events("anchor", 3))
    for event in events:
        await display(event)
        await asyncio.sleep(0.06)
    display.close()
    assert out.getvalue().splitlines() == ["🛠️ anchor: 3 steps…", "🛠️ anchor: step 1/3 · loss 2.000",
                                           "🛠️ anchor: step 2/3 · loss 1.000", "🛠️ anchor: step 3/3 · loss 0.667"]


async def test_a_full_disk_is_said_in_the_chat_and_the_chat_goes_on(tmp_path, fake_vllm):
    from bot.local import Terminal
    from bot.runtime import Runtime
    from model.config import load_config

    runtime = await Runtime.start(load_config(write_config(tmp_path, fake_vllm.url)))
    try:
        out = io.StringIO()
        terminal = Terminal(runtime, out)
        await terminal.handle("Hi")
        store = runtime.core.store
        pages = (await store._fetchone("PRAGMA page_count"))[0]
        await store._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's SQLITE_FULL, as on a full disk
        for _ in range(4):  # corrections of the longest kind allowed, until one needs a page the disk lacks
            assert await terminal.handle("/correct " + "a long answer " * 140)
            if "⚠️ disk full" in out.getvalue():
                break
        assert "⚠️ disk full: cannot write to the store at" in out.getvalue()
        assert "no transaction is active" not in out.getvalue()
        await store._db.execute("PRAGMA max_page_count = 1073741823")
        await terminal.handle("/correct Hello!")
        assert "saved as pending" in out.getvalue().rsplit("disk full", 1)[1]
    finally:
        await runtime.close()


# ------------------------------------------------------------------ with the real worker and trainer


@pytest.fixture(scope="module")
def quick_base(tmp_path_factory) -> Path:
    """A tiny base barely pretrained (its answers are noise): enough to start the real worker
    and trainer, whose logs and warnings must stay out of the chat."""
    from devkit.tiny_model import build_default

    return build_default(tmp_path_factory.mktemp("quick-base") / "base", steps=2)


def promoted_adapter(tmp: Path, config: Path, base: Path) -> str:
    """An identity adapter in the registry (random LoRA init, imported and promoted as an
    admin would import one from ms-swift) — no training run needed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(str(tmp / "lora"))
    for args in (["import", str(tmp / "lora")], ["promote", "v0001", "--force"]):
        subprocess.run([sys.executable, "-m", "trainer", *args, "--config", str(config), "--progress", "none"],
                       cwd=ROOT, env=bot_env(), check=True, capture_output=True, timeout=300)
    return "v0001"


def worker_config(tmp: Path, base: Path) -> Path:
    from model.process import free_port

    return write_config(tmp, None, model={"base": str(base), "max_tokens": 16, "temperature": 0.0},
                        worker={"port": free_port(), "startup_timeout_s": 180.0, "drain_timeout_s": 5.0,
                                "cpu_threads": 1},
                        training={"profile": "seeds-7b", "calibrate_min_steps": 400, "cpu_threads": 1})


async def test_real_worker_and_trainer_logs_stay_out_of_the_chat_and_ctrl_c_cancels_a_retrain(tmp_path, quick_base):
    config = worker_config(tmp_path, quick_base)
    live = promoted_adapter(tmp_path, config, quick_base)
    bot = PtyBot(config)
    try:
        await bot.expect(r"you> ", timeout=240)
        bot.send("Hello there\r")
        at = await bot.expect(r"Loopcord> [^\n]*\n", timeout=120)
        for line in ("/flag", "/correct Hello! I am Loopcord.", "/approve 1", "/retrain"):
            bot.send(line + "\r")
        at = await bot.expect(r"Retraining on 1 approved correction not learned yet… \(Ctrl-C cancels\)", after=at, timeout=60)
        await bot.expect(r"🛠️ calibrate: loading", after=at, timeout=240)  # the trainer child is at work
        log_file = tmp_path / "data" / "bot.log"
        for _ in range(600):  # its stderr reaches the log file, not the chat
            if "trainer calibrate:" in log_file.read_text():
                break
            await asyncio.sleep(0.1)
        bot.send("\x03")
        at = await bot.expect(rf"⏹ Retrain cancelled; the live adapter is {live}\.", after=at, timeout=60)
        await bot.expect(r"you> ", after=at, timeout=30)
        bot.send("\x04")
        code, _ = await bot.wait_exit(timeout=60)
    finally:
        bot.kill()
    assert code == 0, bot.text
    assert not LOG_NOISE.search(bot.text), bot.text
    assert len(re.findall(r"step \d+/\d+", bot.text)) == 0  # a live bar, not a line per step
    log = (tmp_path / "data" / "bot.log").read_text()
    assert "loopcord worker serving" in log  # the worker's own log landed in the file
    assert "trainer calibrate:" in log  # and the trainer's (its stderr, line by line)
    from trainer.registry import Registry

    assert Registry(tmp_path / "data" / "adapters").promoted() == live


async def test_ctrl_c_while_the_worker_loads_stops_it_and_exits(tmp_path, quick_base):
    config = worker_config(tmp_path, quick_base)
    bot = PtyBot(config)
    try:
        await bot.expect(r"\(logs: ", timeout=60)
        log_file = tmp_path / "data" / "bot.log"
        for _ in range(600):  # the worker child has been started
            if log_file.exists() and "starting model worker" in log_file.read_text():
                break
            await asyncio.sleep(0.05)
        bot.send("\x03")
        code, seconds = await bot.wait_exit(timeout=60)
    finally:
        bot.kill()
    assert code == 130 and "Interrupted during start-up." in bot.text, bot.text
    assert not LOG_NOISE.search(bot.text)
    await asyncio.sleep(1.0)
    assert workers_serving(config) == [], "the worker child outlived the bot"


def workers_serving(config: Path) -> list[int]:
    """Pids of `python -m model serve` processes started with this config."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in cmd and str(config).encode() in cmd:
            pids.append(int(proc.name))
    return pids


def test_a_second_bot_on_the_same_data_directory_says_so_in_one_line(tmp_path):
    from bot.runtime import InstanceLock

    config = write_config(tmp_path, "http://127.0.0.1:9")  # never reached: the lock comes first
    lock = InstanceLock(tmp_path / "data").acquire()  # as a running bot holds it
    try:
        result = subprocess.run([sys.executable, "-m", "bot", "--config", str(config)], cwd=ROOT, env=bot_env(),
                                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    finally:
        lock.release()
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: another loopcord bot") and "bot.log" in line
    assert not LOG_NOISE.search(result.stdout)
