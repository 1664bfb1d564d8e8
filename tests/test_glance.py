"""README's results block is generated from the committed metrics and must be current (headline_bench/glance.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from headline_bench import glance

ROOT = Path(__file__).resolve().parents[1]


def test_readme_block_is_current() -> None:
    """Fails when metrics/ changed but README's block was not regenerated (scripts/glance --write README.md).

    A copy without git history (a tarball, a device machine's copy of the tree) cannot name the commit: there the
    numbers are still checked, against the commit README names.
    """
    text = (ROOT / "README.md").read_text()
    commit = glance.metrics_commit(ROOT)
    if commit.startswith("unknown"):
        commit = re.search(r"\(commit ([^)]*)\)", text).group(1)
    assert glance.replace_block(text, glance.render(ROOT, commit)) == text, "run: scripts/glance --write README.md"


def _summary(tokens_per_s: float) -> dict:
    return {"env": {"device": "cpu (Test CPU, 2 cores)", "torch": "9.9"}, "prepare": {"quality_rows": 5, "timed_rows": 2},
            "techniques": {"kv_cache": {"s_per_token": 0.0125, "tokens_per_s": tokens_per_s, "quality_state": "equivalent"},
                           "quant8": {"s_per_token": 0.02, "tokens_per_s": 50.0, "quality_state": "too few rows", "fidelity_state": "within bound"},
                           "vllm": {"skipped": "vLLM needs a CUDA GPU"}},
            "recommendations": [{"scenario": "low latency", "choice": "kv_cache"}]}


def test_render_takes_every_number_from_the_metrics(tmp_path: Path) -> None:
    (tmp_path / "metrics").mkdir()
    (tmp_path / glance.SUMMARY).write_text(json.dumps(_summary(80.0)))
    first = glance.render(tmp_path)
    assert "| `kv_cache` | 12.5 |" in first and "80.0" in first
    assert "cpu (Test CPU, 2 cores)" in first and "unknown (no git history)" in first
    assert "`vllm` (skipped: vLLM needs a CUDA GPU)" in first and "low latency: `kv_cache`" in first
    assert "| too few rows | within bound |" in first
    assert "Serving" not in first and "dvc repro" not in first  # no serving summary, no repro record: no lines for them
    (tmp_path / glance.SUMMARY).write_text(json.dumps(_summary(81.0)))
    assert "81.0" in glance.render(tmp_path) and "80.0" not in glance.render(tmp_path)


def test_check_and_write(tmp_path: Path) -> None:
    (tmp_path / "metrics").mkdir()
    (tmp_path / glance.SUMMARY).write_text(json.dumps(_summary(80.0)))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{glance.START}\nold 1.0\n{glance.END}\nrest\n")
    assert glance.main(["--root", str(tmp_path), "--check", str(readme)]) == 1
    assert glance.main(["--root", str(tmp_path), "--write", str(readme)]) == 0
    text = readme.read_text()
    assert "old 1.0" not in text and text.startswith("intro\n") and text.endswith(f"{glance.END}\nrest\n")
    assert glance.main(["--root", str(tmp_path), "--check", str(readme)]) == 0


def test_replace_block_needs_one_pair_of_markers() -> None:
    with pytest.raises(ValueError):
        glance.replace_block("no markers", "x")
    with pytest.raises(ValueError):
        glance.replace_block(f"{glance.END}{glance.START}", "x")


def test_serving_and_repro_time_lines(tmp_path: Path) -> None:
    (tmp_path / "metrics" / "serving_report").mkdir(parents=True)
    (tmp_path / glance.SUMMARY).write_text(json.dumps(_summary(80.0)))
    entries = [{"entry": "llama_server", "status": "ran", "sustainable_rate": {"rate": 4, "bound": "at least"}, "offline_reference": "llamacpp",
                "served_quality": {"quality_state": "equivalent"}, "client_check": {"client_bound_levels": []}},
               {"entry": "hf_serve", "status": "ran", "sustainable_rate": {"rate": 1, "bound": "measured"}, "offline_reference": "kv_cache",
                "served_quality": {"quality_state": "too few rows"}, "ineligible": "served quality too few rows vs kv_cache",
                "client_check": {"client_bound_levels": ["rate 4"]}},
               {"entry": "vllm_serve", "status": "skipped", "reason": "vLLM needs a CUDA GPU\nmore"}]
    (tmp_path / glance.SERVING).write_text(json.dumps({"entries": entries, "recommendation": {"choice": "llama_server", "eligible_by": "equivalent"}}))
    (tmp_path / glance.REPRO_TIME).write_text(json.dumps({"command": "dvc repro", "total_s": 2520.0, "exit_code": 0, "complete": True,
                                                          "groups_s": {"generate": 1200.0, "serve": 600.0}, "env": {"device": "cpu (Test CPU, 2 cores)"}}))
    text = glance.render(tmp_path)
    assert "`dvc repro` took 42.0 min (complete) on cpu (Test CPU, 2 cores); minutes per stage group: generate 20.0, serve 10.0" in text
    measured = {"peak_bandwidth_source": "measured: best of 5 reads"}
    techniques = {"a": measured | {"peak_bandwidth_gbs": 17.0}, "b": measured | {"peak_bandwidth_gbs": 20.0}, "c": measured | {"peak_bandwidth_gbs": 18.0},
                  "gpu": {"peak_bandwidth_gbs": 3350.0, "peak_bandwidth_source": "datasheet: H100"}, "skipped": {"skipped": "no GPU"}}
    assert glance.read_speed(techniques) == "; memory read rate measured by its timed processes: median 18.0 GB/s over 3 techniques"
    assert glance.read_speed({"gpu": techniques["gpu"]}) == ""
    assert "- `llama_server`: sustainable >= 4 req/s; served quality equivalent vs `llamacpp`; eligible" in text
    assert "not eligible (served quality too few rows vs kv_cache); client-bound levels: rate 4" in text
    assert "- `vllm_serve`: skipped (vLLM needs a CUDA GPU)" in text
    assert "- online-serving pick: `llama_server` (served quality equivalent)" in text
