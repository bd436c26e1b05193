"""The ``unipelt`` command: a thin layer over the library.

    unipelt train --task sst2 --method unipelt --k-shot 100 --data-dir ../shared/data/glue
    unipelt eval --task sst2 --delta out/run [--split dev|test]
    unipelt methods [--model PATH]
    unipelt pretrain --mlm --text FILE... --out DIR
    unipelt report RUN_DIRS...
    unipelt sweep SPEC.yaml --out DIR --jobs N
    unipelt federated --task sst2 --method lora --clients 10 --per-round 5 --rounds 20 --alpha 0.5
        [--serve HOST:PORT | --connect HOST:PORT --cid I]

Bad input (unknown task or method, missing data, a model without a tokenizer, ...) prints one line
``error: ...`` and exits with code 2; a diverged loss exits with code 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT, EXIT_DIVERGED = 2, 3


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON where it parses (numbers, booleans, lists), a list for ``a,b``, else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text.split(",") if "," in text else text


def method_options(sets: list[str], config_file: str | None) -> dict[str, Any]:
    from .config import ConfigError

    options: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:
            raise ConfigError(f"cannot parse {path}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of method options")
        options.update(data)
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        options[key.strip()] = parse_value(value.strip())
    options.pop("method", None)
    return options


def part_lrs(items: list[str]) -> dict[str, float]:
    from .config import ConfigError

    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--part-lr takes METHOD=LR, got {item!r}") from None
        if not eq:
            raise ConfigError(f"--part-lr takes METHOD=LR, got {item!r}")
    return out


def _train(args: argparse.Namespace) -> int:
    from .train import RunConfig, run

    if args.method is None:
        args.method = "poly" if args.from_inventory else "unipelt"
    cfg = RunConfig(
        task=args.task, method=args.method, model=args.model, k_shot=args.k_shot, seed=args.seed,
        epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
        max_length=args.max_length, data_dir=args.data_dir, out=args.out or f"out/{args.task}-{args.method}",
        device=args.device, eval_every=args.eval_every, patience=args.patience,
        method_options=method_options(args.set, args.config), resume=args.resume,
        mixed_precision=args.mixed_precision, progress=not args.no_progress, part_lr=part_lrs(args.part_lr),
        compile=args.compile, from_inventory=args.from_inventory, routing_only=args.routing_only,
        report_split=args.report_split, dapt=args.dapt, tapt=args.tapt, pretrain_cache=args.pretrain_cache,
        pretrain_options={k: v for k, v in (("max_steps", args.pretrain_max_steps),) if v is not None},
        save=not args.no_save, fsdp=args.fsdp,
    )
    run(cfg)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .train import evaluate

    metrics = evaluate(args.delta, split=args.split, task_name=args.task, data_dir=args.data_dir, device=args.device)
    for name, value in metrics.items():
        print(f"{name:<14} {value:.4f}")
    split = args.split or json.loads((Path(args.delta) / "run.json").read_text())["config"].get("report_split") or "dev"
    out = Path(args.delta) / f"eval_{split}.json"
    from .serialization import atomic_write_text

    atomic_write_text(out, json.dumps({"task": args.task, "split": split, "metrics": metrics}, indent=2) + "\n")
    return 0


def _methods(args: argparse.Namespace) -> int:
    import warnings

    from transformers import AutoModelForSequenceClassification

    from . import core
    from .models import load_model

    model = load_model(args.model, AutoModelForSequenceClassification, num_labels=2)
    from .config import registry
    from .train.loop import default_lr

    print(f"{'method':<16} {'trainable':>12} {'% of base':>9} {'lr':>7}  description")
    base = sum(p.numel() for p in model.parameters())
    why_not: list[str] = []
    for name, description in core.methods().items():
        if name == "composition":
            count = "-"
            pct = ""
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    core.attach(model, name, train_head=False)
                n = core.trainable_parameters(model)["total"]
                count, pct = f"{n:,}", f"{100 * n / base:.3f}%"
            except Exception as e:  # a method that does not apply to this model, or needs more than a name
                count, pct = "n/a", "see below"
                why_not.append(f"  {name}: {str(e).splitlines()[0][:150]}")
            finally:
                core.detach(model)
        rate = "" if name == "composition" else f"{default_lr(name, registry()[name].config_class):.0e}"
        print(f"{name:<16} {count:>12} {pct:>9} {rate:>7}  {description}")
    if why_not:
        print("\nNot counted on this model:")
        print("\n".join(why_not))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .train.pretrain import run_mlm

    if not args.mlm:
        raise ConfigError("pretrain supports masked-LM pretraining only: pass --mlm")
    summary = run_mlm(args.text, args.out, model=args.model, epochs=args.epochs, max_steps=args.max_steps,
                      lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                      device=args.device or "cpu")
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import report

    result = report(args.runs, args.out)
    print(result["table"])
    print(f"wrote {result['json']} and {result['png']}")
    return 0


def _say(line: str) -> None:
    """Print a line of a long command's progress. If the reader has gone (``| head``), the command goes on
    without printing: a sweep that stopped at a closed pipe would also stop keeping its deadline, and its runs
    would run on past it."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())  # also takes the unflushed rest, at exit too
        except (AttributeError, OSError, ValueError):  # a stdout without a file descriptor
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stdout for the rest of the process
        finally:
            os.close(devnull)


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import export_runs, import_runs, load_spec, run_sweep, write_report

    spec = load_spec(args.spec)
    spec.data_dir = args.data_dir or spec.data_dir
    spec.model = args.model or spec.model
    if args.import_runs:
        counts = import_runs(spec, args.out, args.import_runs)
        _say(f"imported {counts['imported']} finished runs from {args.import_runs} ({counts['kept']} finished "
              f"here already, {counts['not_in_grid']} not in this grid)")
    if args.report_only:
        summary = write_report(spec, args.out)
    else:
        gpus = args.gpus.split(",") if args.gpus else None
        only = {name: getattr(args, name).split(",") for name in ("tasks", "settings", "methods", "seeds")
                if getattr(args, name)}
        summary = run_sweep(spec, args.out, jobs=args.jobs, gpus=gpus, deadline=args.deadline, device=args.device,
                            only=only, log=_say, start_late=args.start_late, export_to=args.export_runs)
    if summary["table"]:
        _say(summary["table"].rstrip("\n"))
    if args.export_runs:
        _say(f"exported {export_runs(spec, args.out, args.export_runs)} finished runs to {args.export_runs}")
    return 0


def _federated(args: argparse.Namespace) -> int:
    from .config import ConfigError

    try:
        from . import federated
    except ImportError as e:
        raise ConfigError(f"unipelt federated needs Flower ({e}); pip install 'unipelt[federated]'") from None
    if args.report:
        result = federated.report(args.report, args.out or "out/federated-report")
        print(result["table"], end="")
        print(f"wrote {result['json']} and {result['png']}")
        return 0
    if not args.task:
        raise ConfigError("unipelt federated needs --task (or --report RUN_DIRS...)")
    cfg = federated.FederatedConfig(
        task=args.task, method=args.method, model=args.model, data_dir=args.data_dir,
        out=args.out or f"out/federated-{args.task}-{args.method}", clients=args.clients, per_round=args.per_round,
        rounds=args.rounds, local_epochs=args.local_epochs, alpha=args.alpha, seed=args.seed, lr=args.lr,
        batch_size=args.batch_size, max_length=args.max_length, k_shot=args.k_shot, device=args.device,
        method_options=method_options(args.set, args.config), resume=args.resume,
    )
    if args.connect:
        if args.cid is None:
            raise ConfigError("a client (--connect) needs --cid: which shard of the training data it holds")
        federated.connect(cfg, args.cid, args.connect)
    elif args.serve:
        federated.serve(cfg, args.serve)
    else:
        federated.run_federated(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .train.loop import COMPILE_MODES

    parser = argparse.ArgumentParser(prog="unipelt", description="Parameter-efficient fine-tuning of transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a method on a task")
    t.add_argument("--task", required=True, help="sst2, rte, mrpc, stsb, cola, qqp, mnli, mnli_mm, qnli, wnli, "
                                                 "squad, ner, text (JSONL) or a DAPT domain name")
    t.add_argument("--method", default=None, help="a method name (see 'unipelt methods') or 'full'; default unipelt")
    t.add_argument("--model", default=None, help="model folder or Hub name (default: the embedded all-MiniLM-L6-v2)")
    t.add_argument("--k-shot", type=int, default=None, help="K training (and K validation) examples; absent: all")
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--epochs", type=float, default=20.0)
    t.add_argument("--max-steps", type=int, default=None,
                   help="train this many steps (overrides --epochs, as the Trainer's max_steps does)")
    t.add_argument("--lr", type=float, default=None, help="default: the method's usual learning rate")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--max-length", type=int, default=None, help="tokens per example (default: 128; SQuAD 384)")
    t.add_argument("--data-dir", default=None, help="local task files; absent: load from the Hugging Face Hub")
    t.add_argument("--report-split", default=None, choices=["dev", "test"],
                   help="split to report on (default: GLUE dev; the DAPT tasks and a SQuAD test file: test)")
    t.add_argument("--dapt", nargs="+", default=[], metavar="FILE",
                   help="domain-adaptive pretraining (masked LM) on these text files before fine-tuning")
    t.add_argument("--tapt", action="store_true",
                   help="task-adaptive pretraining on the task's training text before fine-tuning (after --dapt)")
    t.add_argument("--pretrain-max-steps", type=int, default=None, help="cap on each DAPT/TAPT stage's steps")
    t.add_argument("--pretrain-cache", default=None, metavar="DIR",
                   help="where adapted models are kept (default: $UNIPELT_CACHE/pretrained or ~/.cache/unipelt)")
    t.add_argument("--no-save", action="store_true", help="write results.json only (no delta or model)")
    t.add_argument("--out", default=None, help="run folder (default out/TASK-METHOD)")
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    t.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default: each epoch)")
    t.add_argument("--patience", type=int, default=10, help="validations without improvement before stopping")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method option, e.g. r=8")
    t.add_argument("--config", default=None, help="JSON or YAML file of method options")
    t.add_argument("--part-lr", action="append", default=[], metavar="METHOD=LR",
                   help="a learning rate for one part of a composition, e.g. prefix=2e-4")
    t.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    t.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--from-inventory", default=None, metavar="DIR",
                   help="start from a Poly delta trained on other tasks (--task a,b,c --method poly): "
                        "a new routing row for this task over its inventory")
    t.add_argument("--routing-only", action="store_true", help="with --from-inventory: train the routing row "
                                                                "and the head only")
    t.add_argument("--compile", default=None, choices=COMPILE_MODES,
                   help="train through torch.compile in this mode (reduce-overhead: with CUDA graphs)")
    t.add_argument("--fsdp", action="store_true",
                   help="under 'accelerate launch --multi_gpu': shard the model with FSDP2 (a group per layer) "
                        "instead of a whole copy per process")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="score a finished run")
    e.add_argument("--delta", required=True, help="the --out folder of 'unipelt train'")
    e.add_argument("--task", default=None)
    e.add_argument("--split", default=None, choices=["dev", "test"], help="default: the split the run reported on")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--device", default=None)
    e.set_defaults(func=_eval)

    m = sub.add_parser("methods", help="the catalogue, with trainable parameters on a model")
    m.add_argument("--model", default=None)
    m.set_defaults(func=_methods)

    p = sub.add_parser("pretrain", help="continued masked-LM pretraining (DAPT/TAPT)")
    p.add_argument("--mlm", action="store_true")
    p.add_argument("--text", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_pretrain)

    r = sub.add_parser("report", help="aggregate runs into a table and a plot")
    r.add_argument("runs", nargs="+")
    r.add_argument("--out", default="out/report")
    r.set_defaults(func=_report)

    w = sub.add_parser("sweep", help="run a grid of tasks x methods x seeds x settings, then report")
    w.add_argument("spec", help="YAML or JSON file: tasks, methods, seeds, settings (see docs/sweep.md)")
    w.add_argument("--out", default="out/sweep", help="sweep folder: runs/, summary.json, table.txt, plot.png")
    w.add_argument("--jobs", type=int, default=1, help="runs at a time on each GPU (or on the CPU)")
    w.add_argument("--gpus", default=None, help="GPU ids to spread runs over, e.g. 0,1 (default: every visible)")
    w.add_argument("--device", default=None, help="cpu to run on the CPU even where a GPU is visible")
    w.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="stop after this long: nothing new starts, running runs stop and resume next time")
    w.add_argument("--start-late", action="store_true",
                   help="under --deadline, also start runs that cannot finish in time (by their cell's finished "
                        "runs): for a machine that stays up, where the next sweep resumes them from checkpoints")
    w.add_argument("--report-only", action="store_true", help="write the report from the runs finished so far")
    w.add_argument("--data-dir", default=None, help="the data root (overrides the spec's data_dir)")
    w.add_argument("--model", default=None, help="the base model (overrides the spec's model)")
    w.add_argument("--import-runs", default=None, metavar="FILE.jsonl",
                   help="first take the finished runs of this file (from --export-runs): they are not run again")
    w.add_argument("--export-runs", default=None, metavar="FILE.jsonl",
                   help="write every finished run's results into this one file, to carry elsewhere; a running "
                        "sweep keeps it current after each run, so a kill loses no finished run")
    for name in ("tasks", "settings", "methods", "seeds"):
        w.add_argument(f"--{name}", default=None, metavar="A,B", help=f"run only these {name} of the grid")
    w.set_defaults(func=_sweep)

    f = sub.add_parser("federated", help="federated PEFT on Flower: simulated clients, FedAvg of the deltas")
    f.add_argument("--task", default=None)
    f.add_argument("--method", default="lora", help="a method name or 'full' (the baseline); default lora")
    f.add_argument("--model", default=None)
    f.add_argument("--data-dir", default=None)
    f.add_argument("--clients", type=int, default=10)
    f.add_argument("--per-round", type=int, default=5, help="clients sampled in each round")
    f.add_argument("--rounds", type=int, default=20)
    f.add_argument("--local-epochs", type=float, default=1.0)
    f.add_argument("--alpha", type=float, default=None,
                   help="Dirichlet concentration of a label-skewed split (absent: IID shards)")
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("--lr", type=float, default=None)
    f.add_argument("--batch-size", type=int, default=16)
    f.add_argument("--max-length", type=int, default=None)
    f.add_argument("--k-shot", type=int, default=None, help="K training examples over all clients (and K to validate)")
    f.add_argument("--device", default="cpu")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    f.add_argument("--config", default=None)
    f.add_argument("--out", default=None, help="run folder (default out/federated-TASK-METHOD)")
    f.add_argument("--resume", action="store_true", help="restart the server from the last aggregated delta")
    f.add_argument("--serve", default=None, metavar="HOST:PORT",
                   help="run the server alone (Flower gRPC) at this address; start --clients clients with --connect")
    f.add_argument("--connect", default=None, metavar="HOST:PORT", help="run one client alone, of the server there")
    f.add_argument("--cid", type=int, default=None, help="with --connect: this client's shard, 0 .. --clients - 1")
    f.add_argument("--report", nargs="+", default=None, metavar="RUN_DIR",
                   help="instead of training: a table and a score-against-bytes plot of these runs into --out")
    f.set_defaults(func=_federated)

    # listed here for --help; its options belong to unipelt.bench (main() hands the arguments over)
    sub.add_parser("bench", help="training speed and memory of every method beside peft and adapters")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    import transformers

    # Library chatter (load reports, weight-loading bars) would bury the command's own output.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from .config import ConfigError
    from .families import UnsupportedModelError
    from .serialization import DeltaFileError
    from .tasks import TaskDataError
    from .train import TrainingDiverged

    try:
        return args.func(args)
    except (ConfigError, TaskDataError, UnsupportedModelError, DeltaFileError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED


if __name__ == "__main__":
    sys.exit(main())
