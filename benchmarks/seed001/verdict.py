"""The seed's claim, tested on the runs so far: UniPELT + prompt against each baseline, paired by task and seed.

    python benchmarks/seed001/verdict.py              # reads benchmarks/results/seed001/runs.jsonl, writes verdict.json
                                                      # and verdict.png (full data: the difference by task)
    python benchmarks/seed001/verdict.py --markdown   # the README's claim table (writes nothing)
    python benchmarks/seed001/verdict.py --no-write   # the table printed, verdict.json and .png left as they are

For each setting and baseline it takes every (task, seed) both rows ran, the difference of their main scores
in points (SQuAD by F1), and reports the mean difference with its 95% t-interval over those pairs, how many
pairs UniPELT + prompt wins, and the trainable parameters of both (from summary.json). The verdict: "above" or
"below" when the interval excludes 0; "comparable" when it holds 0 and lies above -1 point (no loss larger than
one point is compatible with the runs); "no difference shown" when it holds 0 but reaches below -1 (the runs
cannot tell). The pairs share a seed's data sample, so pairing removes that share of the spread. Each reading is
also taken with each task left out in turn ("leave_one_task_out"): the verdicts that change there rest on one task.

A comparison is "complete" when it has every pair the grid plans (summary.json's planned seeds of both rows on
each task); until then it is an interim reading, marked so in verdict.json and in the claim table.

The claim names DAPT+TAPT, which runs only where a domain has offline text (ChemProt): the baseline
"dapt+tapt|tapt" takes DAPT+TAPT on the tasks where it runs and TAPT elsewhere, as the strongest
continued-pretraining baseline of each task.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from scipy.stats import t as student_t

from unipelt.serialization import _atomic_write, atomic_write_text

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks/results/seed001"
SYSTEM = "unipelt+prompt"
PRETRAINED = "dapt+tapt|tapt"


def _add_pretraining_baseline(table: dict[tuple, object]) -> None:
    """Give ``table`` (keyed by setting, task, label, ...) the composite row: DAPT+TAPT's value on the tasks where
    DAPT+TAPT has one in that setting, TAPT's elsewhere."""
    with_dapt = {(key[0], key[1]) for key in table if key[2] == "dapt+tapt"}
    for key, value in list(table.items()):
        setting, task, label = key[:3]
        if label == ("dapt+tapt" if (setting, task) in with_dapt else "tapt"):
            table[(setting, task, PRETRAINED, *key[3:])] = value


def compare(results_dir: Path = RESULTS) -> dict:
    """The paired comparisons of runs.jsonl in ``results_dir`` (parameter counts from its summary.json)."""
    scores: dict[tuple[str, str, str, int], float] = {}
    for line in (results_dir / "runs.jsonl").read_text().splitlines():
        record = json.loads(line)
        task, setting, label, seed = record["run"].split("/")
        results = record["results"]
        score = results["metrics"].get("f1", results["score"]) if task == "squad" else results["score"]
        scores[(setting, task, label, int(seed.removeprefix("seed")))] = (1.0 if task == "squad" else 100.0) * score
    _add_pretraining_baseline(scores)
    summary = json.loads((results_dir / "summary.json").read_text())
    params: dict[tuple[str, str], list[int]] = {}
    for entry in summary["entries"]:
        if entry.get("trainable_params") is not None:
            params.setdefault((entry["setting"], entry["label"]), []).append(entry["trainable_params"])
    for setting in {k[0] for k in params}:
        params[(setting, PRETRAINED)] = params.get((setting, "tapt"), [])  # the same model's count either way
    planned = _planned_seeds(summary["entries"])
    rows = []
    for setting in sorted({k[0] for k in scores}):
        labels = sorted({k[2] for k in scores if k[0] == setting} - {SYSTEM})
        for other in labels:
            pairs = [(t, s) for (st, t, lab, s) in scores if st == setting and lab == SYSTEM
                     and (setting, t, other, s) in scores]
            if len(pairs) < 2:
                continue
            diffs = [scores[(setting, t, SYSTEM, s)] - scores[(setting, t, other, s)] for t, s in pairs]
            mean, (low, high), verdict = _reading(diffs)
            by_task: dict[str, list[float]] = {}
            for (task, _), diff in zip(pairs, diffs, strict=True):
                by_task.setdefault(task, []).append(diff)
            planned_pairs = _planned_pairs(planned, setting, other)
            rows.append({"setting": setting, "baseline": other, "pairs": len(diffs),
                         "planned_pairs": planned_pairs,
                         "complete": None if planned_pairs is None else len(diffs) >= planned_pairs,
                         "tasks": sorted({t for t, _ in pairs}),
                         "mean_difference": round(mean, 2), "ci95": [round(low, 2), round(high, 2)],
                         "wins": sum(d > 0 for d in diffs), "verdict": verdict,
                         "by_task": {t: round(statistics.fmean(d), 2) for t, d in sorted(by_task.items())},
                         "leave_one_task_out": _leave_one_task_out(by_task, verdict),
                         "trainable_system": statistics.fmean(params.get((setting, SYSTEM), [math.nan])),
                         "trainable_baseline": statistics.fmean(params.get((setting, other), [math.nan]))})
    return {"system": SYSTEM, "unit": "points (percent; SQuAD F1)", "rule": __doc__.split("\n\n")[2].strip(),
            "source": "benchmarks/results/seed001/runs.jsonl", "comparisons": rows}


def _reading(diffs: list[float]) -> tuple[float, tuple[float, float], str]:
    """The mean of paired differences, its 95% t-interval and the verdict the rule above gives them."""
    mean = statistics.fmean(diffs)
    half = student_t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    low, high = mean - half, mean + half
    verdict = "above" if low > 0 else "below" if high < 0 else "comparable" if low > -1.0 else "no difference shown"
    return mean, (low, high), verdict


def _leave_one_task_out(by_task: dict[str, list[float]], verdict: str) -> dict:
    """Whether one task carries the verdict: the reading with each task's pairs left out in turn (the mean without
    each task, their range, and the tasks without which the verdict changes)."""
    means, changes = {}, {}
    for task in sorted(by_task):
        rest = [d for other, diffs in by_task.items() if other != task for d in diffs]
        if len(rest) < 2:
            continue
        mean, _, reading = _reading(rest)
        means[task] = round(mean, 2)
        if reading != verdict:
            changes[task] = reading
    return {"mean_range": [min(means.values()), max(means.values())] if means else None,
            "verdict_changes_without": changes, "mean_without": means}


def _planned_seeds(entries: list[dict]) -> dict[tuple[str, str, str], set[int]]:
    """(setting, task, label) -> the seeds the grid plans for that cell (summary entries without them: none)."""
    planned = {(e["setting"], e["task"], e["label"]): set(e["seeds_planned"]) for e in entries
               if "task" in e and "seeds_planned" in e}
    _add_pretraining_baseline(planned)
    return planned


def _planned_pairs(planned: dict[tuple[str, str, str], set[int]], setting: str, baseline: str) -> int | None:
    """How many (task, seed) pairs of the system and ``baseline`` the grid plans in ``setting``; None if unknown."""
    tasks = {t for (s, t, label) in planned if s == setting and label == SYSTEM}
    if not tasks:
        return None
    return sum(len(planned[(setting, t, SYSTEM)] & planned.get((setting, t, baseline), set())) for t in tasks)


CLAIMS = {"full": "full fine-tuning", PRETRAINED: "DAPT+TAPT (TAPT where no domain text)", "unipelt": "UniPELT",
          "pfeiffer": "(Pfeiffer adapter)", "lora": "(LoRA)"}
SETTINGS = {"full": "full data", "k100": "K = 100", "k1000": "K = 1,000"}


def markdown(out: dict) -> str:
    """The README's claim table: per baseline and setting the paired difference, its interval, the wins and the
    verdict (bold where the interval excludes zero; "interim" where pairs the grid plans are still to run), and
    the parameters against the row's on full data."""
    rows = {(r["setting"], r["baseline"]): r for r in out["comparisons"]}
    settings = [s for s in SETTINGS if any(k[0] == s for k in rows)]
    lines = ["| claim: UniPELT + prompt ≈ | " + " | ".join(SETTINGS[s] for s in settings)
             + " | parameters (UniPELT + prompt / row) |", "|---|" + "---|" * (len(settings) + 1)]
    for baseline, name in CLAIMS.items():
        cells = []
        for setting in settings:
            r = rows.get((setting, baseline))
            if r is None:
                cells.append("-")
                continue
            text = (f"{r['mean_difference']:+.2f} [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}], "
                    f"wins {r['wins']}/{r['pairs']}: {r['verdict']}")
            text = f"**{text}**" if r["verdict"] in ("above", "below") else text
            if r["complete"] is False:  # a reading of the pairs so far, with how many the grid plans
                planned = r["planned_pairs"]
                text += f" (interim: {r['pairs']} of {planned} pairs)" if planned else " (interim)"
            cells.append(text)
        r = rows.get(("full", baseline)) or next((v for k, v in rows.items() if k[1] == baseline), None)
        system, other = (r["trainable_system"], r["trainable_baseline"]) if r else (math.nan, math.nan)
        more = ("-" if r is None else f"{system / other:.3g}x: fewer" if system < other
                else "equal" if system == other
                else f"{system / other:.{5 if system < 1.1 * other else 3}g}x: {system - other:,.0f} more")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {more} |")
    return "\n".join(lines)


PLOTTED = {"full": "full fine-tuning", PRETRAINED: "DAPT+TAPT (TAPT where no domain text)", "unipelt": "UniPELT"}


def plot(out: dict, path: Path, setting: str = "full"):
    """Draw ``setting``'s paired differences of UniPELT + prompt against the claim's baselines: per task the mean
    over seeds (``by_task``) as bars, and on top the mean over all pairs with its 95% interval. Returns the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = {r["baseline"]: r for r in out["comparisons"] if r["setting"] == setting and r["baseline"] in PLOTTED}
    if not rows:
        raise ValueError(f"no comparison of setting {setting!r} to plot")
    tasks = sorted({t for r in rows.values() for t in r["by_task"]}, reverse=True)
    height = 0.8 / len(rows)
    fig = Figure(figsize=(8, 0.45 * (len(tasks) + 2) + 1.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    top = len(tasks) + 0.5
    # slots among the baselines present, so that the bars stay in their task's band; colours stay per baseline
    for slot, baseline in enumerate(b for b in PLOTTED if b in rows):
        r, i = rows[baseline], list(PLOTTED).index(baseline)
        offset = (slot - (len(rows) - 1) / 2) * height
        widths = [r["by_task"].get(t, math.nan) for t in tasks]
        ax.barh([y + offset for y in range(len(tasks))], widths, height=height, color=f"C{i}",
                label=f"{PLOTTED[baseline]}: {r['mean_difference']:+.2f} [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]"
                      + ("" if r["complete"] is not False else f" ({r['pairs']} of {r['planned_pairs']} pairs)"))
        ax.errorbar([r["mean_difference"]], [top + offset], xerr=[[r["mean_difference"] - r["ci95"][0]],
                    [r["ci95"][1] - r["mean_difference"]]], fmt="o", color=f"C{i}", capsize=4)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks([*range(len(tasks)), top], [*tasks, "all pairs (95% CI)"])
    ax.set_xlabel("UniPELT + prompt minus the baseline, points (SQuAD F1)")
    ax.set_title(f"seed001, {SETTINGS.get(setting, setting)}: paired by task and seed")
    ax.grid(True, axis="x", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize=8)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))  # a reader never sees half a PNG
    return fig


def _robustness(row: dict) -> str:
    """One line on the leave-one-task-out reading: the range of the means and any verdict that changes."""
    loto = row["leave_one_task_out"]
    if not loto["mean_range"]:
        return "-"
    low, high = loto["mean_range"]
    changed = ", ".join(f"{v} without {t}" for t, v in loto["verdict_changes_without"].items())
    return f"{low:+.2f} to {high:+.2f}; " + (changed or "verdict unchanged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the README's claim table, write nothing")
    parser.add_argument("--no-write", action="store_true", help="print the table, write no file")
    args = parser.parse_args()
    out = compare()
    if args.markdown:
        print(markdown(out))
        return
    if not args.no_write:
        atomic_write_text(RESULTS / "verdict.json", json.dumps(out, indent=1) + "\n")
        if any(r["setting"] == "full" for r in out["comparisons"]):
            plot(out, RESULTS / "verdict.png")
    rows = out["comparisons"]
    print(f"{'setting':8} {'baseline':14} {'pairs':>9} {'diff':>6} {'95% interval':>16} {'wins':>6}  "
          f"{'verdict':20} {'params':>8}  one task left out")
    for r in rows:
        ratio = r["trainable_system"] / r["trainable_baseline"]
        pairs = f"{r['pairs']}/{r['planned_pairs']}" if r["planned_pairs"] else str(r["pairs"])
        print(f"{r['setting']:8} {r['baseline']:14} {pairs:>9} {r['mean_difference']:+6.2f} "
              f"[{r['ci95'][0]:+6.2f}, {r['ci95'][1]:+6.2f}] {r['wins']:3d}/{r['pairs']:<3d} {r['verdict']:20} "
              f"{ratio:>7.3g}x  {_robustness(r)}")


if __name__ == "__main__":
    main()
