"""`python -m trainer ...`: the trainer's command line.

  anchor | generalize | calibrate --corrections FILE   train a stage -> new candidate version
  eval (--version V | --adapter DIR) [--corrections FILE] [--json]
                                                       gate a version (exit 0 passed, 3 failed)
  import DIR                                           register an outside PEFT LoRA adapter
                                                       (e.g. trained by ms-swift) as a version
  promote V [--force]                                  make V live (gate must have passed)
  rollback [--to V]                                    back to the previously live version
  list [--json]                                        versions, stages, gate results
  check                                                repair what a killed run left in the registry
                                                       (the bot only reports it; exit 2: PROMOTED
                                                       names a missing version, see the message)
  bootstrap                                            fresh install: base converted if needed,
                                                       anchor + generalize + eval + promote

Every command takes --config FILE (default ./config.yaml, or $LOOPCORD_CONFIG) and
--progress {auto,tqdm,json,none}; with json, stdout holds only JSON lines ending in
one done/error event (the contract, exit codes included, is trainer.protocol).
The command functions here stay thin: parse, call the stage/gate/registry, report.
The commands that train or gate run the registry check first (REPAIRS_FIRST): what they
read of the lineage (which versions were live) is then what PROMOTED says.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from model.adapters import linear_shapes, read_adapter
from model.config import ConfigError, load_config
from model.errors import APIError
from trainer.cores import apply_cpu_threads, training_settings
from trainer.datasets import DataError
from trainer.gate import evaluate, reference_alongside, report_json
from trainer.progress import Progress, log
from trainer.protocol import (CHART_FILE, REPORT_FILE, BootstrapDone, CheckDone, CheckedCorrection, Command, EvalDone,
                              ExitCode, ImportDone, ListDone, PointerDone, TrainDone, Verdict, VersionStatus)
from trainer.registry import Registry, RegistryError
from trainer.stages import CorrectionsRefused, StageError, ensure_base, run_stage

EVAL_EPILOG = """--version names a registry version (see `python -m trainer list`); --adapter takes an
outside PEFT LoRA adapter directory instead, registers it as a new version first
(as `import` does) and evaluates that.

exit status: 0 the gate passed; 3 the gate FAILED (the report says which check; the
version stays unpromoted); 2 a problem you can fix (unknown version, bad config or
data); 1 anything unexpected (see stderr)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description="loopcord LoRA trainer",
                                epilog="exit status: 0 ok, 1 unexpected, 2 a problem you can fix, 3 the gate failed")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=None, help="config file (default ./config.yaml)")
    common.add_argument("--progress", default="auto", choices=("auto", "tqdm", "json", "none"),
                        help="json: stdout carries only JSON-lines events (for the bot)")
    sub = p.add_subparsers(dest="command", required=True)
    for stage in (Command.ANCHOR, Command.GENERALIZE, Command.CALIBRATE):
        s = sub.add_parser(stage, parents=[common], help=f"train the {stage} stage")
        s.add_argument("--parent", help="continue from this version instead of the default")
        if stage == Command.CALIBRATE:
            s.add_argument("--corrections", required=True, help="approved corrections JSONL (bot export)")
    s = sub.add_parser(Command.EVAL, parents=[common], help="run the evaluation gate on a version",
                       description="Score a version against the one it would replace and decide.",
                       epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", help="registry version to evaluate, e.g. v0003")
    which.add_argument("--adapter", metavar="DIR", help="outside PEFT adapter dir: import it, then evaluate it")
    s.add_argument("--corrections", help="corrections JSONL to check (default: those the version trained on)")
    s.add_argument("--json", action="store_true", help="print the full report as JSON")
    s = sub.add_parser(Command.IMPORT, parents=[common], help="register an outside PEFT LoRA adapter as a version",
                       description="Copy a PEFT LoRA adapter directory (adapter_config.json + "
                                   "adapter_model.safetensors, e.g. from ms-swift) into the registry "
                                   "as a new candidate version; evaluate it before promoting.")
    s.add_argument("dir", help="the adapter directory")
    s = sub.add_parser(Command.PROMOTE, parents=[common], help="make a version the live adapter")
    s.add_argument("version")
    s.add_argument("--force", action="store_true", help="promote even if the gate did not pass")
    s = sub.add_parser(Command.ROLLBACK, parents=[common], help="go back to the previously promoted version")
    s.add_argument("--to", help="version to roll back to")
    s = sub.add_parser(Command.LIST, parents=[common], help="list versions")
    s.add_argument("--json", action="store_true")
    sub.add_parser(Command.CHECK, parents=[common], help="repair what a killed run left in the registry",
                   description="Check the adapter registry and repair what a run killed mid-write left: "
                               "a promotion missing from history.jsonl, manifests whose status disagrees "
                               "with PROMOTED, dead writers' temp files and staging dirs. Says what it "
                               "repaired. The bot never repairs; its log and /status name this command.")
    s = sub.add_parser(Command.BOOTSTRAP, parents=[common],
                       help="fresh install: convert the base if needed, anchor, generalize, eval, promote")
    s.add_argument("--skip-generalize", action="store_true", help="anchor only (faster, weaker)")
    return p


# ---- commands ---------------------------------------------------------------


def cmd_train(cfg, args, progress) -> int:
    progress.phase("load", f"{args.command}: loading the base model and building samples")
    version, manifest = run_stage(cfg, args.command, progress, getattr(args, "corrections", None), args.parent)
    path = str(_registry(cfg).path(version).resolve())
    progress.done(TrainDone(command=Command(args.command), version=version, path=path, stage=args.command,
                            parent=manifest.get("parent"), samples=manifest["samples"], train=manifest["train"]))
    _say(f"{args.command}: wrote candidate {version} at {path}", progress)
    return ExitCode.OK


def cmd_eval(cfg, args, progress) -> int:
    reg = _registry(cfg)
    version = args.version or _import(cfg, args.adapter, progress)
    reg.get(version)  # an unknown version is a clear error before any model loads
    progress.phase("eval", f"evaluating {version} (identity, corrections, general retention)")
    report = evaluate(cfg, version, args.corrections, log=log, progress=progress)
    if args.json and progress.mode != "json":
        print(report_json(report))
    else:
        _say(format_report(report), progress)
    progress.done(eval_outcome(reg, version, report))
    return ExitCode.OK if report["passed"] else ExitCode.GATE_FAILED


def eval_outcome(reg, version: str, report: dict) -> EvalDone:
    """The eval `done` event: the verdict and everything a caller shows, from the report."""
    items = ((report.get("candidate") or {}).get("corrections") or {}).get("items") or []
    corrections = tuple(CheckedCorrection(id=item["id"], learned=bool(item.get("learned")),
                                          question=item.get("question"), correction=item.get("correction"),
                                          answer=item.get("answer"))
                        for item in items)
    chart = reg.path(version) / CHART_FILE
    return EvalDone(
        command=Command.EVAL, version=version, path=str(reg.path(version).resolve()),
        verdict=Verdict.PASSED if report["passed"] else Verdict.FAILED, passed=bool(report["passed"]),
        reference=report.get("reference"), checks=report.get("checks") or [],
        metrics=reg.get(version).get("metrics") or {},
        report=str((reg.path(version) / REPORT_FILE).resolve()),
        chart=str(chart.resolve()) if chart.exists() else None,
        corrections=corrections,
        learned=tuple(c.id for c in corrections if c.learned),
        not_learned=tuple(c.id for c in corrections if not c.learned),
    )


def format_report(report: dict) -> str:
    lines = [f"{report['version']} vs {report['reference']}: {'PASSED' if report['passed'] else 'FAILED'}"]
    for c in report["checks"]:
        mark = "ok  " if c["passed"] else "FAIL"
        lines.append(f"  {mark} {c['name']}: {c['value']} (needs {c['op']} {c['limit']})")
    candidate = report.get("candidate") or {}
    for f in ((candidate.get("identity") or {}).get("failures") or [])[:3]:
        lines.append(f"  identity miss ({f.get('prompt')}): {f.get('question')!r} -> {f.get('answer')!r}")
    for item in (candidate.get("corrections") or {}).get("items") or []:
        if not item.get("learned"):
            lines.append(f"  not learned: {item.get('question')!r} -> {item.get('answer')!r} "
                         f"(wanted {item.get('correction')!r})")
    return "\n".join(lines)


def _import(cfg, source: str, progress) -> str:
    reg = _registry(cfg)
    # The same base the stages train on, so an imported version can be a calibrate parent.
    base = ensure_base(cfg, progress)
    _check_servable(source, base)
    version = reg.import_adapter(source, {"base": str(base)})
    _say(f"imported {source} as {version}", progress)
    return version


def _check_servable(source: str, base) -> None:
    """Refuse what the worker would refuse (model.adapters.read_adapter: NaN weights, shapes of
    another base, modules_to_save, a broken config), with the worker's own words."""
    import torch  # slow to import: only where an adapter is imported
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no weights read
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base)))
    try:
        read_adapter(str(source), linear_shapes(skeleton))
    except APIError as exc:
        raise RegistryError(f"{source}: the worker would refuse this adapter: {exc.message}") from None


def cmd_import(cfg, args, progress) -> int:
    reg = _registry(cfg)
    version = _import(cfg, args.dir, progress)
    progress.done(ImportDone(command=Command.IMPORT, version=version, path=str(reg.path(version).resolve()),
                             source=os.path.abspath(args.dir)))
    return ExitCode.OK


def cmd_promote(cfg, args, progress) -> int:
    reg = _registry(cfg)
    previous = reg.pointer()  # as PROMOTED had it, even a missing version (promoting repairs that)
    v = reg.promote(args.version, force=args.force)
    progress.done(PointerDone(command=Command.PROMOTE, version=v, path=str(reg.path(v).resolve()), previous=previous))
    _say(f"promoted {v}", progress)
    return ExitCode.OK


def cmd_rollback(cfg, args, progress) -> int:
    reg = _registry(cfg)
    previous = reg.pointer() if args.to else reg.promoted()  # --to VERSION repairs a missing one
    v = reg.rollback(args.to)
    progress.done(PointerDone(command=Command.ROLLBACK, version=v, path=str(reg.path(v).resolve()), previous=previous))
    _say(f"rolled back to {v}", progress)
    return ExitCode.OK


def cmd_list(cfg, args, progress) -> int:
    rows = _registry(cfg).describe()
    if progress.mode == "json":  # stdout carries JSON lines only: the rows ride in the done event
        progress.done(ListDone(command=Command.LIST, versions=rows))
        return ExitCode.OK
    if args.json:
        print(json.dumps(rows, indent=2))
        return ExitCode.OK
    if not rows:
        print("no versions yet")
    for r in rows:
        if r["status"] == VersionStatus.BROKEN:
            print(f"{r['version']}  BROKEN: {r['error']}")
            continue
        gate = {True: Verdict.PASSED, False: Verdict.FAILED, None: "-"}[r["gate_passed"]]
        live = " <- promoted" if r["promoted"] else ""
        print(f"{r['version']}  {r['stage']:<10} parent={r['parent'] or 'base':<6} gate={gate:<6} "
              f"status={r['status']}  {r['created_at']}{live}")
    return ExitCode.OK


def cmd_check(cfg, args, progress) -> int:
    reg = _registry(cfg)
    repaired = reg.check()
    for line in repaired:
        _say(f"repaired: {line}", progress)
    if not repaired:
        _say(f"{reg.root}: nothing to repair", progress)
    progress.done(CheckDone(command=Command.CHECK, repaired=tuple(repaired)))
    return ExitCode.OK


def repair_first(cfg) -> None:
    """Before a run that trains or gates: repair what a killed run left (stderr says what). A
    PROMOTED naming a missing version is left for the command itself to meet (eval and anchor
    do not need it; calibrate stops on it with the way out)."""
    try:
        for line in _registry(cfg).check():
            log(f"registry repaired: {line}")
    except RegistryError as exc:
        log(f"registry check: {exc}")


def cmd_bootstrap(cfg, args, progress) -> int:
    reg = _registry(cfg)
    if reg.promoted():
        _say(f"already bootstrapped: {reg.promoted()} is promoted", progress)
        progress.done(BootstrapDone(command=Command.BOOTSTRAP, version=reg.promoted(),
                                    path=str(reg.path(reg.promoted()).resolve())))
        return ExitCode.OK
    started = time.time()
    progress.phase("load", "bootstrap: preparing the base model")
    reference = reference_alongside(cfg, ensure_base(cfg, progress))
    try:
        version, _ = run_stage(cfg, "anchor", progress)
        # A profile whose generalize epochs are 0 mixes general replay into anchor instead.
        if not args.skip_generalize and training_settings(cfg).generalize.epochs > 0:
            version, _ = run_stage(cfg, "generalize", progress, parent=version)
        if reference is not None and reference.is_alive():
            progress.phase("eval", "bootstrap: waiting for the base model's scores (computed alongside training)")
        if reference is not None:
            reference.join()
    finally:
        if reference is not None and reference.is_alive():
            reference.kill()
    progress.phase("eval", f"evaluating {version}")
    report = evaluate(cfg, version, log=log, progress=progress)
    log(format_report(report))
    if not report["passed"]:
        raise GateFailed(f"bootstrap: {version} did not pass the gate "
                         f"({', '.join(c['name'] for c in report['checks'] if not c['passed'])}); not promoted")
    reg.promote(version)
    progress.done(BootstrapDone(command=Command.BOOTSTRAP, version=version, path=str(reg.path(version).resolve()),
                                gate=eval_outcome(reg, version, report)))
    _say(f"bootstrap: promoted {version} ({time.time() - started:.0f} s)", progress)
    return ExitCode.OK


class GateFailed(RuntimeError):
    pass


# ---- plumbing ---------------------------------------------------------------


def _registry(cfg) -> Registry:
    return Registry.from_config(cfg)


def _say(message: str, progress) -> None:
    # In json mode stdout is reserved for JSON lines.
    print(message, file=sys.stderr if progress.mode == "json" else sys.stdout, flush=True)


COMMANDS = {
    Command.ANCHOR: cmd_train, Command.GENERALIZE: cmd_train, Command.CALIBRATE: cmd_train,
    Command.EVAL: cmd_eval, Command.IMPORT: cmd_import, Command.PROMOTE: cmd_promote,
    Command.ROLLBACK: cmd_rollback, Command.LIST: cmd_list, Command.CHECK: cmd_check,
    Command.BOOTSTRAP: cmd_bootstrap,
}
NO_TORCH = (Command.PROMOTE, Command.ROLLBACK, Command.LIST, Command.IMPORT, Command.CHECK)
REPAIRS_FIRST = (Command.ANCHOR, Command.GENERALIZE, Command.CALIBRATE, Command.EVAL, Command.BOOTSTRAP)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    progress = Progress(getattr(args, "progress", "none") or "none")
    try:
        cfg = load_config(args.config)
        if args.command not in NO_TORCH:
            apply_cpu_threads(cfg)
        if args.command in REPAIRS_FIRST:
            repair_first(cfg)
        return int(COMMANDS[Command(args.command)](cfg, args, progress))
    except GateFailed as exc:
        return _fail(progress, str(exc), ExitCode.GATE_FAILED)
    except CorrectionsRefused as exc:  # named in the event, so the bot can name them to its admins
        return _fail(progress, str(exc), ExitCode.USER, refused=exc.refused)
    except (ConfigError, DataError, RegistryError, StageError) as exc:
        return _fail(progress, str(exc), ExitCode.USER)
    except KeyboardInterrupt:
        return _fail(progress, "interrupted", ExitCode.UNEXPECTED)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: report, don't hide
        traceback.print_exc(file=sys.stderr)
        return _fail(progress, f"{type(exc).__name__}: {exc}", ExitCode.UNEXPECTED)


def _fail(progress, message: str, code: ExitCode, refused=()) -> int:
    progress.error(message, exit_code=code, refused=refused)
    print(f"error: {message}", file=sys.stderr, flush=True)
    return int(code)
