"""scripts/repro-timed: stage durations from dvc's output, so README's measured time comes from a record."""

from headline_bench.repro_time import group_totals, stage_times


def test_stage_times_run_until_the_next_stage_and_name_skips() -> None:
    lines = [
        (0.0, "Running stage 'prepare':\n"),
        (0.5, "> python stages/prepare.py\n"),
        (2.0, "Stage 'models' didn't change, skipping\n"),
        (2.0, "Running stage 'generate@baseline':\n"),
        (3.0, "> python stages/generate.py\n"),
        (58.0, "12:00:58 INFO baseline: 8 samples -> metrics/techniques/baseline/perf.json\n"),
        (59.0, "WARNING: 'data/lossless/baseline.jsonl' is empty.\n"),
        (61.0, "Updating lock file 'dvc.lock'\n"),
        (62.0, "Running stage 'pipelines/generate/dvc.yaml:generate@quant4':\n"),  # a stage group's own dvc.yaml
        (70.0, "Stage 'pipelines/score/dvc.yaml:score@kv_cache' is cached - skipping run, checking out outputs\n"),
        (80.0, "Updating lock file 'pipelines/generate/dvc.lock'\n"),
    ]
    ran, skipped = stage_times(lines, end=92.0)
    assert ran == [{"stage": "prepare", "s": 2.0, "dvc_s": 2.0}, {"stage": "generate@baseline", "s": 60.0, "dvc_s": 4.0},
                   {"stage": "generate@quant4", "s": 30.0, "dvc_s": 30.0}]
    assert skipped == ["models", "score@kv_cache"]
    assert group_totals(ran) == {"prepare": 2.0, "generate": 90.0}
