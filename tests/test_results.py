"""benchmarks/RESULTS.md is generated from benchmarks/results/*.json (python -m benchmarks.results)."""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

from benchmarks import results

ROOT = Path(__file__).resolve().parent.parent


def test_results_md_is_what_the_json_files_generate():
    assert results.RESULTS.read_text(encoding="utf-8") == results.generate(), (
        "benchmarks/RESULTS.md was edited by hand or not regenerated: run `python -m benchmarks.results`")


def test_the_results_name_no_machine_paths():
    for path in [results.RESULTS, *sorted(results.RESULTS_DIR.glob("*.json"))]:
        text = path.read_text(encoding="utf-8")
        assert not results.machine_paths(text), (path.name, results.machine_paths(text))
        assert not re.search(r"(?<![\w.])/(work|tmp|home|root)/", text), path.name


def test_each_file_is_one_benchmark_with_device_date_and_whole_tables():
    loaded = results.load()
    assert loaded
    for path, r in zip(sorted(results.RESULTS_DIR.glob("*.json")), loaded):
        assert r["name"] == path.stem
        assert r["device"].strip()
        datetime.date.fromisoformat(r["date"])
        for t in r.get("tables", []):
            assert all(len(row) == len(t["columns"]) for row in t.get("rows", [])), (r["name"], t["columns"])
            assert t.get("columns") or t.get("text"), r["name"]


def test_links_into_results_md_name_its_sections():
    anchors = {results.anchor(r["name"]) for r in results.load()}
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"RESULTS\.md#([\w.-]+)", doc.read_text(encoding="utf-8")):
            assert target in anchors, (doc.name, target)


def test_record_writes_the_figures_without_machine_paths_and_regenerates(tmp_path):
    out, md = tmp_path / "results", tmp_path / "RESULTS.md"
    results.record("demo_bench", text=[f"Base `{results.ROOT}/.loopcord/base/X`, data in /tmp/run-1/eval.jsonl."],
                   tables=[results.table(["streams", "tok/s"], [[1, 20.5], [8, "93.4"]], title="CPU")],
                   notes=["- first", "- second"], device="CPU: test, 2 cores", date="2026-01-02",
                   results_dir=out, results_md=md)
    data = json.loads((out / "demo_bench.json").read_text(encoding="utf-8"))
    assert data["text"] == ["Base `.loopcord/base/X`, data in eval.jsonl."]
    assert data["tables"] == [{"title": "CPU", "columns": ["streams", "tok/s"], "rows": [["1", "20.5"], ["8", "93.4"]]}]
    text = md.read_text(encoding="utf-8")
    assert text == results.generate(out)
    assert "[demo_bench](#demo_bench) | CPU: test, 2 cores | 2026-01-02" in text
    assert "## demo_bench\n\n_Device: CPU: test, 2 cores; date: 2026-01-02_" in text
    assert "### CPU\n\n| streams | tok/s |\n|---|---|\n| 1 | 20.5 |\n| 8 | 93.4 |" in text
    assert "- first\n- second" in text
    results.record("demo_bench", tables=[results.table(["streams"], [[32]])], device="GPU", date="2026-01-03",
                   results_dir=out, results_md=md)  # a new run replaces the old one whole
    assert "20.5" not in md.read_text(encoding="utf-8") and "| 32 |" in md.read_text(encoding="utf-8")
