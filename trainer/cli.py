"""`python -m trainer ...`: the trainer's command line.

  anchor | generalize | calibrate --corrections FILE   train a stage -> new candidate version
  eval --version V [--corrections FILE] [--json]       gate a version (exit 0 passed, 3 failed)
  promote V [--force]                                  make V live (gate must have passed)
  rollback [--to V]                                    back to the previously live version
  list [--json]                                        versions, stages, gate results
  demo-base --out DIR [--steps N]                      build the tiny embedded base model
                                                       (progress stage "demo-base")
  bootstrap                                            fresh install: demo base if needed,
                                                       anchor + generalize + eval + promote

Every command takes --config FILE (default ./config.yaml, or $LOOPCORD_CONFIG).
Training commands take --progress {auto,tqdm,json,none}; with json, stdout holds
only JSON lines (see trainer.progress). Exit codes: 0 ok, 2 a problem the user can
fix (config, data, registry), 3 the gate failed, 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

EXIT_OK, EXIT_UNEXPECTED, EXIT_USER, EXIT_GATE_FAILED = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description="loopcord LoRA trainer")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=None, help="config file (default ./config.yaml)")
    train_opts = argparse.ArgumentParser(add_help=False)
    train_opts.add_argument("--progress", default="auto", choices=("auto", "tqdm", "json", "none"))
    sub = p.add_subparsers(dest="command", required=True)
    for stage in ("anchor", "generalize", "calibrate"):
        s = sub.add_parser(stage, parents=[common, train_opts], help=f"train the {stage} stage")
        s.add_argument("--parent", help="continue from this version instead of the default")
        if stage == "calibrate":
            s.add_argument("--corrections", required=True, help="approved corrections JSONL (bot export)")
    s = sub.add_parser("eval", parents=[common], help="run the evaluation gate on a version")
    s.add_argument("--version", required=True)
    s.add_argument("--corrections", help="corrections JSONL to check (default: those the version trained on)")
    s.add_argument("--json", action="store_true", help="print the full report as JSON")
    s = sub.add_parser("promote", parents=[common], help="make a version the live adapter")
    s.add_argument("version")
    s.add_argument("--force", action="store_true", help="promote even if the gate did not pass")
    s = sub.add_parser("rollback", parents=[common], help="go back to the previously promoted version")
    s.add_argument("--to", help="version to roll back to")
    s = sub.add_parser("list", parents=[common], help="list versions")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("demo-base", parents=[common, train_opts], help="build the tiny demo base model")
    s.add_argument("--out", required=True)
    s.add_argument("--steps", type=int, default=None, help="pretraining steps (default training.demo_base_steps)")
    s = sub.add_parser("bootstrap", parents=[common, train_opts],
                       help="fresh install: demo base, anchor, generalize, eval, promote")
    s.add_argument("--skip-generalize", action="store_true", help="anchor only (faster, weaker)")
    return p


# ---- commands ---------------------------------------------------------------


def cmd_train(cfg, args, progress) -> int:
    from trainer.stages import run_stage

    version, manifest = run_stage(cfg, args.command, progress, getattr(args, "corrections", None), args.parent)
    path = str(_registry(cfg).path(version).resolve())
    progress.done(version=version, path=path, stage=args.command, parent=manifest.get("parent"),
                  samples=manifest["samples"], train=manifest["train"])
    _say(f"{args.command}: wrote candidate {version} at {path}", progress)
    return EXIT_OK


def cmd_eval(cfg, args) -> int:
    from trainer.gate import evaluate, report_json
    from trainer.progress import log

    report = evaluate(cfg, args.version, args.corrections, log=log)
    if args.json:
        print(report_json(report))
    else:
        print(format_report(report))
    return EXIT_OK if report["passed"] else EXIT_GATE_FAILED


def format_report(report: dict) -> str:
    lines = [f"{report['version']} vs {report['reference']}: {'PASSED' if report['passed'] else 'FAILED'}"]
    for c in report["checks"]:
        mark = "ok  " if c["passed"] else "FAIL"
        lines.append(f"  {mark} {c['name']}: {c['value']} (needs {c['op']} {c['limit']})")
    for f in report["candidate"]["identity"]["failures"][:3]:
        lines.append(f"  identity miss ({f['prompt']}): {f['question']!r} -> {f['answer']!r}")
    for item in report["candidate"]["corrections"]["items"]:
        if not item["learned"]:
            lines.append(f"  not learned: {item['question']!r} -> {item['answer']!r} (wanted {item['correction']!r})")
    return "\n".join(lines)


def cmd_promote(cfg, args) -> int:
    v = _registry(cfg).promote(args.version, force=args.force)
    print(f"promoted {v}")
    return EXIT_OK


def cmd_rollback(cfg, args) -> int:
    v = _registry(cfg).rollback(args.to)
    print(f"rolled back to {v}")
    return EXIT_OK


def cmd_list(cfg, args) -> int:
    rows = _registry(cfg).describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no versions yet")
    for r in rows:
        gate = {True: "passed", False: "failed", None: "-"}[r["gate_passed"]]
        live = " <- promoted" if r["promoted"] else ""
        print(f"{r['version']}  {r['stage']:<10} parent={r['parent'] or 'base':<6} gate={gate:<6} "
              f"status={r['status']}  {r['created_at']}{live}")
    return EXIT_OK


def cmd_demo_base(cfg, args, progress) -> int:
    from trainer.demo_base import build_default
    from trainer.stages import demo_base_reporter

    steps = args.steps or cfg.training.demo_base_steps
    started = time.time()
    out = build_default(args.out, steps=steps, on_step=demo_base_reporter(progress, steps))
    progress.done(path=os.path.abspath(out), stage="demo-base", steps=steps, wall_s=round(time.time() - started, 1))
    _say(f"demo base written to {os.path.abspath(out)} ({steps} steps, {time.time() - started:.0f} s)", progress)
    return EXIT_OK


def cmd_bootstrap(cfg, args, progress) -> int:
    from trainer.gate import evaluate
    from trainer.progress import log
    from trainer.stages import ensure_base, run_stage

    reg = _registry(cfg)
    if reg.promoted():
        _say(f"already bootstrapped: {reg.promoted()} is promoted", progress)
        progress.done(version=reg.promoted(), path=str(reg.path(reg.promoted()).resolve()), stage="bootstrap")
        return EXIT_OK
    started = time.time()
    ensure_base(cfg, progress)
    version, _ = run_stage(cfg, "anchor", progress)
    if not args.skip_generalize:
        version, _ = run_stage(cfg, "generalize", progress, parent=version)
    report = evaluate(cfg, version, log=log)
    log(format_report(report))
    if not report["passed"]:
        raise GateFailed(f"bootstrap: {version} did not pass the gate "
                         f"({', '.join(c['name'] for c in report['checks'] if not c['passed'])}); not promoted")
    reg.promote(version)
    progress.done(version=version, path=str(reg.path(version).resolve()), stage="bootstrap", promoted=True)
    _say(f"bootstrap: promoted {version} ({time.time() - started:.0f} s)", progress)
    return EXIT_OK


class GateFailed(RuntimeError):
    pass


# ---- plumbing ---------------------------------------------------------------


def _registry(cfg):
    from trainer.registry import Registry

    return Registry(cfg.path(cfg.training.registry_dir))


def _say(message: str, progress) -> None:
    # In json mode stdout is reserved for JSON lines.
    print(message, file=sys.stderr if progress.mode == "json" else sys.stdout, flush=True)


def main(argv=None) -> int:
    from model.config import ConfigError, load_config
    from trainer.datasets import DataError
    from trainer.progress import Progress
    from trainer.registry import RegistryError
    from trainer.stages import StageError

    args = build_parser().parse_args(argv)
    progress = Progress(getattr(args, "progress", "none") or "none")
    try:
        cfg = load_config(args.config)
        if args.command not in ("promote", "rollback", "list"):  # the commands that run torch
            from trainer.stages import apply_cpu_threads

            apply_cpu_threads(cfg)
        if args.command in ("anchor", "generalize", "calibrate"):
            return cmd_train(cfg, args, progress)
        if args.command == "bootstrap":
            return cmd_bootstrap(cfg, args, progress)
        if args.command == "demo-base":
            return cmd_demo_base(cfg, args, progress)
        handler = {"eval": cmd_eval, "promote": cmd_promote, "rollback": cmd_rollback, "list": cmd_list}[args.command]
        return handler(cfg, args)
    except GateFailed as exc:
        return _fail(progress, str(exc), EXIT_GATE_FAILED)
    except (ConfigError, DataError, RegistryError, StageError) as exc:
        return _fail(progress, str(exc), EXIT_USER)
    except KeyboardInterrupt:
        return _fail(progress, "interrupted", EXIT_UNEXPECTED)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: report, don't hide
        traceback.print_exc(file=sys.stderr)
        return _fail(progress, f"{type(exc).__name__}: {exc}", EXIT_UNEXPECTED)


def _fail(progress, message: str, code: int) -> int:
    progress.error(message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code
