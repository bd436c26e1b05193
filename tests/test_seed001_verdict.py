"""benchmarks/seed001/verdict.py: the paired test that decides the seed's claim, on runs written out by hand."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "seed001" / "verdict.py"
T_975 = {2: 4.302652729911275, 3: 3.182446305284263}  # Student's t, 97.5% quantile, by degrees of freedom


@pytest.fixture(scope="module")
def verdict():
    spec = importlib.util.spec_from_file_location("seed001_verdict", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(folder: Path, scores: dict[str, float], params: dict[str, int], entries: list[dict] | None = None) -> Path:
    """scores: "task/setting/label/seedN" -> main score as a fraction (SQuAD: EM as the score, F1 in points);
    summary.json's entries: ``entries``, else one per label of ``params`` with its trainable count."""
    lines = []
    for run, score in scores.items():
        task = run.split("/")[0]
        metrics = {"exact_match": 0.0, "f1": score * 100.0} if task == "squad" else {"accuracy": score}
        lines.append(json.dumps({"run": run, "results": {"score": 0.0 if task == "squad" else score,
                                                         "metrics": metrics}}))
    (folder / "runs.jsonl").write_text("\n".join(lines) + "\n")
    if entries is None:
        entries = [{"setting": "full", "label": label, "trainable_params": n} for label, n in params.items()]
    (folder / "summary.json").write_text(json.dumps({"entries": entries}))
    return folder


def _row(out: dict, baseline: str) -> dict:
    return next(r for r in out["comparisons"] if r["baseline"] == baseline)


def test_the_paired_difference_and_its_interval_are_the_t_interval_over_task_seed_pairs(verdict, tmp_path) -> None:
    system = {"cola/full/unipelt+prompt/seed1": 0.50, "cola/full/unipelt+prompt/seed2": 0.60,
              "rte/full/unipelt+prompt/seed1": 0.70, "squad/full/unipelt+prompt/seed1": 0.655}
    full = {"cola/full/full/seed1": 0.52, "cola/full/full/seed2": 0.57, "rte/full/full/seed1": 0.74,
            "squad/full/full/seed1": 0.600, "rte/full/full/seed2": 0.10}  # rte seed 2 has no partner: unpaired
    out = verdict.compare(_write(tmp_path, {**system, **full}, {"unipelt+prompt": 100, "full": 1000}))
    row = _row(out, "full")
    diffs = [-2.0, 3.0, -4.0, 5.5]  # in points; SQuAD by its F1 (65.5 - 60.0), not its EM score
    mean = statistics.fmean(diffs)
    half = T_975[3] * statistics.stdev(diffs) / math.sqrt(4)
    assert row["pairs"] == 4 and row["tasks"] == ["cola", "rte", "squad"]
    assert row["mean_difference"] == pytest.approx(mean, abs=0.006)  # kept to two places
    assert row["ci95"] == pytest.approx([mean - half, mean + half], abs=0.006)
    assert row["wins"] == 2
    assert row["verdict"] == "no difference shown"  # the interval holds 0 and reaches below -1
    assert row["trainable_system"] / row["trainable_baseline"] == pytest.approx(0.1)


@pytest.mark.parametrize(("system_scores", "expected"), [
    ((0.60, 0.61, 0.62), "above"),          # +10, +11, +12 points: the interval excludes 0 above
    ((0.40, 0.41, 0.42), "below"),
    ((0.502, 0.499, 0.501), "comparable"),  # +0.2, -0.1, +0.1: holds 0, lies above -1
    ((0.55, 0.45, 0.50), "no difference shown"),
])
def test_the_verdict_rule_reads_the_interval(verdict, tmp_path, system_scores, expected) -> None:
    runs = {f"cola/full/unipelt+prompt/seed{i + 1}": s for i, s in enumerate(system_scores)}
    runs |= {f"cola/full/lora/seed{i + 1}": 0.50 for i in range(3)}
    row = _row(verdict.compare(_write(tmp_path, runs, {"unipelt+prompt": 1, "lora": 1})), "lora")
    assert row["verdict"] == expected
    low, high = row["ci95"]
    assert low <= row["mean_difference"] <= high
    half = T_975[2] * statistics.stdev([100 * (s - 0.5) for s in system_scores]) / math.sqrt(3)
    assert high - low == pytest.approx(2 * half, abs=0.02)


def test_the_pretraining_baseline_is_dapt_tapt_where_it_runs_and_tapt_elsewhere(verdict, tmp_path) -> None:
    runs = {"chemprot/full/unipelt+prompt/seed1": 0.80, "chemprot/full/unipelt+prompt/seed2": 0.80,
            "chemprot/full/dapt+tapt/seed1": 0.70,  # seed 2 not run yet: no pair, and not TAPT's in its place
            "chemprot/full/tapt/seed1": 0.10, "chemprot/full/tapt/seed2": 0.10,
            "imdb/full/unipelt+prompt/seed1": 0.90, "imdb/full/tapt/seed1": 0.88}
    out = verdict.compare(_write(tmp_path, runs, {"unipelt+prompt": 1, "tapt": 10, "dapt+tapt": 10}))
    row = _row(out, "dapt+tapt|tapt")
    assert row["pairs"] == 2 and row["tasks"] == ["chemprot", "imdb"]
    assert row["mean_difference"] == pytest.approx(statistics.fmean([10.0, 2.0]))
    assert _row(out, "tapt")["pairs"] == 3
    assert not any(r["baseline"] == "dapt+tapt" for r in out["comparisons"])  # one pair is too few to test


def test_the_readme_claim_table_carries_each_comparison_and_the_parameter_ratio(verdict, tmp_path) -> None:
    runs = {f"cola/full/unipelt+prompt/seed{i}": 0.60 + i / 1000 for i in (1, 2, 3)}
    runs |= {f"cola/full/full/seed{i}": 0.50 for i in (1, 2, 3)}
    runs |= {f"cola/full/unipelt/seed{i}": 0.60 for i in (1, 2, 3)}
    out = verdict.compare(_write(tmp_path, runs, {"unipelt+prompt": 10_100, "full": 100_000, "unipelt": 10_000}))
    lines = verdict.markdown(out).splitlines()
    assert lines[0].startswith("| claim: UniPELT + prompt ≈ | full data | parameters")
    full = _row(out, "full")
    assert lines[2] == (f"| full fine-tuning | **{full['mean_difference']:+.2f} [{full['ci95'][0]:+.2f}, "
                        f"{full['ci95'][1]:+.2f}], wins 3/3: above** | 0.101x: fewer |")
    assert lines[4].startswith("| UniPELT | +0.20 [") and lines[4].endswith("| 1.01x: 100 more |")
    assert lines[3] == "| DAPT+TAPT (TAPT where no domain text) | - | - |"  # no TAPT runs: no row to compare


def test_a_comparison_is_complete_only_with_every_planned_pair_and_the_table_says_interim(verdict, tmp_path) -> None:
    runs = {f"cola/full/unipelt+prompt/seed{i}": 0.60 for i in (1, 2, 3)}
    runs |= {f"cola/full/full/seed{i}": 0.50 + i / 100 for i in (1, 2, 3)}
    runs |= {f"cola/full/lora/seed{i}": 0.55 + i / 100 for i in (1, 2)}  # seed 3 of LoRA still to run
    entries = [{"setting": "full", "task": "cola", "label": label, "seeds_planned": [1, 2, 3],
                "trainable_params": 10} for label in ("unipelt+prompt", "full", "lora")]
    out = verdict.compare(_write(tmp_path, runs, {}, entries))
    assert (_row(out, "full")["planned_pairs"], _row(out, "full")["complete"]) == (3, True)
    lora = _row(out, "lora")
    assert (lora["pairs"], lora["planned_pairs"], lora["complete"]) == (2, 3, False)
    table = verdict.markdown(out).splitlines()
    assert table[0].startswith("| claim: UniPELT + prompt ≈ | full data | parameters")
    lora_line = next(line for line in table if line.startswith("| (LoRA) |"))
    full_line = next(line for line in table if line.startswith("| full fine-tuning |"))
    assert "wins 2/2" in lora_line and "(interim: 2 of 3 pairs)" in lora_line
    assert "interim" not in full_line
    runs["cola/full/lora/seed3"] = 0.58
    out = verdict.compare(_write(tmp_path, runs, {}, entries))
    assert _row(out, "lora")["complete"] is True
    assert "interim" not in verdict.markdown(out)


def test_the_plot_draws_each_task_s_mean_difference_and_the_overall_interval(verdict, tmp_path) -> None:
    runs = {}
    for task, (system, full, unipelt) in {"cola": (0.30, 0.34, 0.29), "rte": (0.55, 0.60, 0.56)}.items():
        for seed in (1, 2, 3):
            runs[f"{task}/full/unipelt+prompt/seed{seed}"] = system + seed / 100
            runs[f"{task}/full/full/seed{seed}"] = full + (seed % 2) / 100
            runs[f"{task}/full/unipelt/seed{seed}"] = unipelt
    out = verdict.compare(_write(tmp_path, runs, {"unipelt+prompt": 10, "full": 100, "unipelt": 9}))
    fig = verdict.plot(out, tmp_path / "verdict.png")
    assert (tmp_path / "verdict.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))
    ax = fig.axes[0]
    drawn = {}  # bar colour -> its widths, bottom task first
    for bar in ax.patches:
        drawn.setdefault(bar.get_facecolor(), []).append((bar.get_y(), bar.get_width()))
    widths = [[w for _, w in sorted(bars)] for bars in drawn.values()]
    # two of the three baselines ran: each task's bars still lie within its band, one bar height apart
    centres = sorted(bar.get_y() + bar.get_height() / 2 for bar in ax.patches)
    assert centres == pytest.approx([-0.2, 0.2, 0.8, 1.2])
    expected = {b: [_row(out, b)["by_task"][t] for t in ("rte", "cola")] for b in ("full", "unipelt")}
    # cola: system 31, 32, 33 against full 35, 34, 35 -> -2.67; rte: 56-58 against 61, 60, 61 -> -3.67
    assert expected["full"] == pytest.approx([-3.67, -2.67], abs=0.01)
    assert sorted(widths) == sorted(expected.values())
    labels = [text.get_text() for text in fig.legends[0].get_texts()]
    full = _row(out, "full")
    low, high = full["ci95"]
    assert labels[0] == f"full fine-tuning: {full['mean_difference']:+.2f} [{low:+.2f}, {high:+.2f}]"
    with pytest.raises(ValueError, match="k100"):
        verdict.plot(out, tmp_path / "none.png", setting="k100")


def test_leave_one_task_out_names_the_task_a_verdict_rests_on(verdict, tmp_path) -> None:
    # UniPELT + prompt trails LoRA by 2 points on task a and by about 0.1 elsewhere: "below" over all 12 pairs,
    # "comparable" once task a is left out, "below" without any other task
    diffs = {"a": [-2.0, -2.2, -1.8], "b": [-0.2, 0.1, -0.3], "c": [-0.1, -0.4, 0.2], "d": [0.0, -0.3, -0.1]}
    runs = {}
    for task, per_seed in diffs.items():
        for seed, diff in enumerate(per_seed, start=1):
            runs[f"{task}/full/lora/seed{seed}"] = 0.5
            runs[f"{task}/full/unipelt+prompt/seed{seed}"] = 0.5 + diff / 100
    lora = _row(verdict.compare(_write(tmp_path, runs, {"unipelt+prompt": 10, "lora": 1})), "lora")
    assert lora["verdict"] == "below"
    left_out = {task: statistics.fmean(d for t, ds in diffs.items() if t != task for d in ds) for task in diffs}
    assert left_out["a"] == pytest.approx(-0.1222, abs=1e-4)
    assert lora["leave_one_task_out"]["mean_without"] == pytest.approx({t: round(m, 2) for t, m in left_out.items()})
    assert lora["leave_one_task_out"]["mean_range"] == pytest.approx(
        [round(min(left_out.values()), 2), round(max(left_out.values()), 2)])
    assert lora["leave_one_task_out"]["verdict_changes_without"] == {"a": "comparable"}
    assert verdict._robustness(lora) == "-0.76 to -0.12; comparable without a"
