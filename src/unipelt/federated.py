"""Federated PEFT on Flower: FedPETuning's setting (Zhang et al., ACL Findings 2023) for any unipelt method.

Each client holds one shard of the task's training data (IID, or label-skewed by a Dirichlet split with
concentration ``alpha``), receives the global delta, trains it for a few local epochs and sends its delta back;
the server averages the deltas weighted by the clients' example counts (FedAvg). What travels is the trainable
state only: a PEFT method's parameters (gates and prompts included) and the task head, or the whole model for
``method="full"``, the baseline. Payloads are ``safetensors`` bytes, so the bytes counted are the bytes sent.

The server is Flower's (``flwr.server.Server`` with the strategy ``DeltaFedAvg``, a ``FedAvg``), the clients
are Flower clients (``PeftClient``). Three ways to run them:

- ``run_federated(cfg)``: the simulation, every client in this process, reached by a direct call;
- ``serve(cfg, address)`` and ``connect(cfg, cid, address)``: the server and each client as processes of their
  own, over Flower's gRPC transport (on one machine or several).

The server writes into ``cfg.out``:

- ``results.json``: per round the global delta's validation score, the bytes each client sent up and
  received, its local compute time and the clients that failed; the final score on the report split;
- ``server_state.safetensors``: the last aggregated delta and the round history, written atomically after
  every round, so a restarted server (``resume=True``) continues from the round after it;
- ``delta.safetensors`` + ``unipelt.json`` (the final global delta), or ``model/`` for full fine-tuning.

A client that raises or drops out during its round is recorded as a failure and left out of that round's
average; the run goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.client import Client
from flwr.common import (
    Code,
    DisconnectRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Parameters,
    Status,
)
from flwr.server import Server, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from . import serialization
from .config import ConfigError
from .serialization import atomic_write_text
from .train import loop

TENSOR_TYPE = "safetensors"
STATE_FILE, RESULTS_FILE = "server_state.safetensors", "results.json"


@dataclass
class FederatedConfig:
    task: str
    method: str = "lora"
    model: str | None = None
    data_dir: str | None = None
    out: str = "out/federated"
    clients: int = 10
    per_round: int = 5
    rounds: int = 20
    local_epochs: float = 1.0
    alpha: float | None = None  # None: IID shards; else a Dirichlet label split with this concentration
    seed: int = 1
    lr: float | None = None  # None: the method's default (loop.default_lr)
    batch_size: int = 16
    eval_batch_size: int = 64
    max_length: int | None = None
    k_shot: int | None = None  # K training examples in all (split over the clients) and K to validate
    device: str | None = "cpu"
    method_options: dict[str, Any] = field(default_factory=dict)
    resume: bool = False


_RUN_FIELDS = {f.name for f in fields(loop.RunConfig)}  # the fields above that each local run takes as they are


# ------------------------------------------------------------------------------------------------ shards


def iid_shards(n: int, clients: int, seed: int) -> list[list[int]]:
    """``n`` example indices dealt out at random into ``clients`` shards of (nearly) equal size."""
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(part.tolist()) for part in np.array_split(order, clients)]


def dirichlet_shards(labels: list[Any], clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Label-skewed shards: each class's examples are split over the clients in proportions drawn from
    Dirichlet(``alpha``); small ``alpha`` gives each client few classes, large ``alpha`` tends to IID."""
    if alpha <= 0:
        raise ConfigError(f"--alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    shards: list[list[int]] = [[] for _ in range(clients)]
    for label in sorted({str(x) for x in labels}):
        idx = np.array([i for i, x in enumerate(labels) if str(x) == label])
        rng.shuffle(idx)
        cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha)))[:-1] * len(idx)).astype(int)
        for c, part in enumerate(np.split(idx, cuts)):
            shards[c].extend(part.tolist())
    return [sorted(s) for s in shards]


# ---------------------------------------------------------------------------------------------- payloads


def encode(tensors: dict[str, torch.Tensor]) -> bytes:
    """The payload: ``safetensors`` bytes of the tensors (its length is what goes over the wire)."""
    return save_bytes({k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())})


def decode(payload: bytes) -> dict[str, torch.Tensor]:
    return load_bytes(payload)


def to_parameters(tensors: dict[str, torch.Tensor]) -> Parameters:
    return Parameters(tensors=[encode(tensors)], tensor_type=TENSOR_TYPE)


def from_parameters(parameters: Parameters) -> dict[str, torch.Tensor]:
    if parameters.tensor_type != TENSOR_TYPE or len(parameters.tensors) != 1:
        raise ValueError(f"expected one {TENSOR_TYPE} payload, got {len(parameters.tensors)} of "
                         f"{parameters.tensor_type!r}")
    return decode(parameters.tensors[0])


def weighted_mean(deltas: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """FedAvg: the mean of the deltas weighted by each client's example count (computed in float64)."""
    total = sum(n for _, n in deltas)
    if total <= 0:
        raise ValueError("no examples to weight the deltas by")
    keys = deltas[0][0].keys()
    for delta, _ in deltas[1:]:
        if delta.keys() != keys:
            raise ValueError("the clients' deltas hold different tensors")
    return {k: sum(d[k].double() * (n / total) for d, n in deltas).to(deltas[0][0][k].dtype) for k in keys}


# ------------------------------------------------------------------------------------------ client side


class ClientFailure(RuntimeError):
    """A client's round failed; carries the client's index so the round's record can name it."""

    def __init__(self, cid: int, error: BaseException) -> None:
        super().__init__(f"client {cid}: {type(error).__name__}: {error}")
        self.cid = cid


def base_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the frozen weights. Every process builds its own base model; a client whose base differs from
    the server's (another --model, or another --seed for freshly initialised frozen parts such as a pooler)
    would train a delta for another function, so the client refuses the round instead."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if not p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class LocalTrainer:
    """The model a client trains: load the global delta, train it on a shard, read it back. The simulated
    clients take turns on one model (the server evaluates on it too)."""

    def __init__(self, model: torch.nn.Module, pad_id: int, lr: float, batch_size: int, device: str,
                 grad_clip: float = 1.0) -> None:
        self.model, self.pad_id, self.lr, self.batch_size = model, pad_id, lr, batch_size
        self.device, self.grad_clip = device, grad_clip
        self.fingerprint = base_fingerprint(model)

    def state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors: the method's delta (gates and prompts included) and the head."""
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if tensors.keys() != params.keys():
            missing, unknown = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
            raise ValueError(f"the payload does not match this model's trainable tensors (missing {missing[:3]}, "
                             f"unknown {unknown[:3]}): give every process the same --method, --set and --model")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value.to(params[name].device))

    def train(self, rows: list[dict[str, torch.Tensor]], epochs: float, seed: int) -> float:
        """Local AdamW (fresh each round, as in FedPETuning) over ``rows`` for ``epochs``; the mean loss."""
        torch.manual_seed(seed)
        model = self.model
        groups, _ = loop.parameter_groups(model, self.lr, {})
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(groups, lr=self.lr)
        steps_per_epoch = max(1, math.ceil(len(rows) / self.batch_size))
        total = max(1, math.ceil(epochs * steps_per_epoch))
        losses: list[float] = []
        model.train()
        for step in range(total):
            if step % steps_per_epoch == 0:
                order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + step)).tolist()
            b = step % steps_per_epoch
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            batch = {k: v.to(self.device) for k, v in loop.collate([rows[i] for i in idx], self.pad_id).items()}
            loss = model(**batch).loss
            if not torch.isfinite(loss.detach()):
                raise loop.TrainingDiverged(f"the local loss became {loss.item()}; lower --lr (now {self.lr:g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            optimizer.step()
            losses.append(loss.item())
        return sum(losses) / len(losses)


class PeftClient(Client):
    """A Flower client: trains the received delta on its own shard, returns its delta and example count."""

    def __init__(self, cid: int, trainer: LocalTrainer, rows: list[dict[str, torch.Tensor]]) -> None:
        self.cid, self.trainer, self.rows = cid, trainer, rows

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        return GetPropertiesRes(status=Status(Code.OK, "ok"), properties={"cid": self.cid})

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        return GetParametersRes(status=Status(Code.OK, "ok"), parameters=to_parameters(self.trainer.state()))

    def fit(self, ins: FitIns) -> FitRes:
        expected = ins.config.get("base")
        if expected is not None and expected != self.trainer.fingerprint:
            raise ConfigError(f"client {self.cid}: its base model differs from the server's ({self.trainer.fingerprint}"
                              f" vs {expected}); give every process the same --model and --seed")
        self.trainer.load(from_parameters(ins.parameters))
        if not self.rows:  # an empty shard (possible under a skewed split) trains nothing and weighs nothing
            return FitRes(Status(Code.OK, "empty shard"), ins.parameters, 0,
                          {"cid": self.cid, "train_time_s": 0.0, "loss": 0.0})
        seed = int(ins.config["seed"]) * 1_000_003 + int(ins.config["round"]) * 1009 + self.cid
        start = time.perf_counter()
        loss = self.trainer.train(self.rows, float(ins.config["local_epochs"]), seed)
        elapsed = time.perf_counter() - start
        return FitRes(Status(Code.OK, "ok"), to_parameters(self.trainer.state()), len(self.rows),
                      {"cid": self.cid, "train_time_s": elapsed, "loss": loss})


class InProcessProxy(ClientProxy):
    """How the simulation's server reaches a client: a direct call (no Ray, no sockets). ``fail(round, cid)``,
    when given, runs before each fit and may raise (the fault tests use it; a real client fails on its own)."""

    def __init__(self, client: PeftClient, fail: Callable[[int, int], None] | None = None) -> None:
        super().__init__(str(client.cid))
        self.client, self.fail = client, fail

    def get_properties(self, ins, timeout, group_id):  # noqa: D102 (Flower's signature)
        return self.client.get_properties(ins)

    def get_parameters(self, ins, timeout, group_id):  # noqa: D102
        return self.client.get_parameters(ins)

    def fit(self, ins, timeout, group_id):  # noqa: D102
        try:
            if self.fail is not None:
                self.fail(int(ins.config["round"]), self.client.cid)
            return self.client.fit(ins)
        except Exception as error:
            raise ClientFailure(self.client.cid, error) from error

    def evaluate(self, ins, timeout, group_id):  # noqa: D102 (the server evaluates centrally)
        raise NotImplementedError("unipelt's federated server evaluates the global delta itself")

    def reconnect(self, ins, timeout, group_id):  # noqa: D102
        return DisconnectRes(reason="")


# ------------------------------------------------------------------------------------------ server side


class DeltaFedAvg(FedAvg):
    """FedAvg over ``safetensors`` delta payloads: the example-weighted mean of the clients' deltas.

    Each round picks ``per_round`` of the ``clients`` clients by a generator seeded with (seed, round), so a
    run and its resumption pick the same clients. A failed client is left out of its round's average
    (``accept_failures``); a round with no usable result keeps the previous delta. After each round
    ``on_round(round, payload, record)`` scores the global delta and saves the server state; the record
    holds the bytes each client sent and received, its compute time and the failures.
    """

    def __init__(self, *, initial: bytes, clients: int, per_round: int, seed: int, local_epochs: float,
                 on_round: Callable[[int, bytes, dict[str, Any]], float], base: str | None = None,
                 rounds_done: int = 0, connect_timeout: float = 86400.0) -> None:
        super().__init__(accept_failures=True)  # the picks are configure_fit's own: FedAvg's fractions unused
        self.initial, self.clients, self.per_round, self.seed = initial, clients, per_round, seed
        self.local_epochs, self.on_round, self.base = local_epochs, on_round, base
        self.rounds_done, self.connect_timeout = rounds_done, connect_timeout
        self.index: dict[str, int] = {}  # Flower's client id -> the client's own --cid
        self.record: dict[str, Any] | None = None

    def initialize_parameters(self, client_manager):  # noqa: D102 (Flower's signature)
        return Parameters(tensors=[self.initial], tensor_type=TENSOR_TYPE)

    def _cid(self, proxy: ClientProxy, rnd: int) -> int:
        if proxy.cid not in self.index:
            res = proxy.get_properties(GetPropertiesIns({}), timeout=60, group_id=rnd)
            self.index[proxy.cid] = int(res.properties["cid"])
        return self.index[proxy.cid]

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: D102
        rnd = self.rounds_done + server_round
        if not client_manager.wait_for(self.clients, timeout=int(self.connect_timeout)):
            raise RuntimeError(f"only {client_manager.num_available()} of {self.clients} clients connected")
        proxies = sorted(client_manager.all().values(), key=lambda p: self._cid(p, rnd))
        picked = sorted(np.random.default_rng([self.seed, rnd]).choice(len(proxies), self.per_round, replace=False))
        config = {"round": rnd, "seed": self.seed, "local_epochs": float(self.local_epochs)}
        if self.base is not None:
            config["base"] = self.base
        down = len(parameters.tensors[0])
        self.record = {"round": rnd, "clients": [{"client": self._cid(proxies[i], rnd), "bytes_down": down}
                                                 for i in picked]}
        return [(proxies[i], FitIns(parameters, dict(config))) for i in picked]

    def aggregate_fit(self, server_round, results, failures):  # noqa: D102
        entries = {e["client"]: e for e in self.record["clients"]}
        pairs = []
        for proxy, res in sorted(results, key=lambda r: self.index[r[0].cid]):  # a fixed order: exact resumes
            cid = self.index[proxy.cid]
            entries[cid].update(bytes_up=len(res.parameters.tensors[0]), examples=res.num_examples,
                                train_time_s=float(res.metrics["train_time_s"]), loss=float(res.metrics["loss"]))
            pairs.append((from_parameters(res.parameters), res.num_examples))
        for failure in failures:
            if isinstance(failure, ClientFailure):
                cid = failure.cid
            elif isinstance(failure, tuple):
                cid = self.index.get(failure[0].cid)
            else:  # a lost connection names no client: mark the first picked client without a result
                cid = next((c for c, e in entries.items() if "bytes_up" not in e and "failed" not in e), None)
            if cid in entries:
                entries[cid].update(failed=str(failure)[:300] or type(failure).__name__, bytes_up=0)
        for entry in entries.values():
            entry.setdefault("bytes_up", 0)
        if not pairs or sum(n for _, n in pairs) == 0:
            return None, {}
        metrics = {"clients": len(pairs), "failures": len(failures), "examples": sum(n for _, n in pairs)}
        return to_parameters(weighted_mean(pairs)), metrics

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: D102
        return []  # the server scores the global delta on its validation split (evaluate below)

    def evaluate(self, server_round, parameters):  # noqa: D102
        if server_round == 0:
            return None
        record = self.record or {"round": self.rounds_done + server_round, "clients": []}
        self.record = None
        score = self.on_round(record["round"], parameters.tensors[0], record)
        return 0.0, {"validation": score}


def save_state(path: Path, payload: bytes, round_: int, history: list[dict[str, Any]]) -> None:
    """The last aggregated delta with the round and history in its metadata, in one atomic write."""
    tensors = decode(payload)
    meta = {"round": str(round_), "history": json.dumps(history)}
    serialization._atomic_write(path, lambda tmp: Path(tmp).write_bytes(save_bytes(tensors, metadata=meta)))


def load_state(path: Path) -> tuple[bytes, int, list[dict[str, Any]]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no mapping)
    except Exception as e:
        raise ConfigError(f"{path} cannot be read ({e}); delete it to start the run afresh") from None
    if "round" not in meta:
        raise ConfigError(f"{path} is not a unipelt federated server state; delete it or choose another --out")
    return encode(tensors), int(meta["round"]), json.loads(meta.get("history", "[]"))


# -------------------------------------------------------------------------------------------- the run


@dataclass
class _Setup:
    """What the server and every client build alike from the same config: the task's splits, the model
    with the method attached (seeded), the shards."""

    prep: Any
    trainer: LocalTrainer
    shards: list[list[int]]

    def rows(self, cid: int) -> list[dict[str, torch.Tensor]]:
        shard = self.shards[cid]
        prep = self.prep
        return prep.task.featurize([prep.train[i] for i in shard], prep.tokenizer, prep.cfg.max_length).rows \
            if shard else []


def _check(cfg: FederatedConfig) -> None:
    if cfg.clients < 1 or not 1 <= cfg.per_round <= cfg.clients:
        raise ConfigError(f"--per-round must be between 1 and --clients ({cfg.clients}), got {cfg.per_round}")
    if cfg.rounds < 1 or not cfg.local_epochs > 0:
        raise ConfigError("--rounds and --local-epochs must be positive")


def _setup(cfg: FederatedConfig, out: Path) -> _Setup:
    _check(cfg)
    device = loop._device(cfg.device)
    shared = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name in _RUN_FIELDS}  # the local run's fields
    run_cfg = loop.RunConfig(**{**shared, "out": str(out), "device": device, "resume": False,
                                "method_options": dict(cfg.method_options)})
    prep = loop._prepare(run_cfg)
    if cfg.method == "full":
        for p in prep.model.parameters():
            p.requires_grad_(True)
    prep.model.to(device)
    lr = cfg.lr if cfg.lr is not None else loop.default_lr(cfg.method, prep.method_cfg)
    pad_id = prep.tokenizer.pad_token_id if prep.tokenizer.pad_token_id is not None else 0
    if cfg.alpha is None:
        shards = iid_shards(len(prep.train), cfg.clients, cfg.seed)
    else:
        shards = dirichlet_shards([getattr(e, "label", None) for e in prep.train], cfg.clients, cfg.alpha, cfg.seed)
    return _Setup(prep, LocalTrainer(prep.model, pad_id, lr, cfg.batch_size, device), shards)


def run_federated(cfg: FederatedConfig, log: Callable[[str], None] = print,
                  fail: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Simulate ``cfg.rounds`` rounds in this process: Flower's server loop (``flwr.server.Server``) with
    ``DeltaFedAvg``, reaching each client through a direct call; returns the results."""
    setup = _setup(cfg, Path(cfg.out))
    proxies = [InProcessProxy(PeftClient(c, setup.trainer, setup.rows(c)), fail) for c in range(cfg.clients)]
    return _serve(cfg, setup, log, lambda server, rounds: _fit_in_process(server, proxies, rounds))


def serve(cfg: FederatedConfig, address: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The server as a process of its own (Flower's gRPC server at ``address``): waits for ``cfg.clients``
    clients started with ``connect``, runs the rounds, scores and saves as ``run_federated`` does."""
    from flwr.server import ServerConfig, start_server

    setup = _setup(cfg, Path(cfg.out))

    def fit(server, rounds: int) -> None:
        start_server(server_address=address, server=server, config=ServerConfig(num_rounds=rounds))

    return _serve(cfg, setup, log, fit)


def connect(cfg: FederatedConfig, cid: int, address: str) -> None:
    """One client as a process of its own: builds the same model and split as the server (same config and
    seed), keeps shard ``cid`` of the training data, and serves Flower's server at ``address`` until it ends."""
    from flwr.client import start_client

    if not 0 <= cid < cfg.clients:
        raise ConfigError(f"--cid must be between 0 and {cfg.clients - 1}, got {cid}")
    setup = _setup(cfg, Path(cfg.out))
    start_client(server_address=address, client=PeftClient(cid, setup.trainer, setup.rows(cid)), insecure=True)


def _fit_in_process(server: Server, proxies: list[InProcessProxy], rounds: int) -> None:
    for proxy in proxies:
        server.client_manager().register(proxy)
    server.set_max_workers(1)  # the simulated clients share one model: one at a time
    server.fit(num_rounds=rounds, timeout=None)


def _serve(cfg: FederatedConfig, setup: _Setup, log: Callable[[str], None], fit) -> dict[str, Any]:
    out = Path(cfg.out)
    with loop.exclusive_folder(out, "federated run"):
        state_path = out / STATE_FILE
        if not cfg.resume and (out / RESULTS_FILE).exists():
            raise ConfigError(f"{out} already holds a finished run; choose another --out (nothing was overwritten)")
        if not cfg.resume and state_path.exists():
            raise ConfigError(f"{out} holds an interrupted federated run; pass --resume to continue it, or choose "
                              f"another --out")
        prep, trainer = setup.prep, setup.trainer
        task, model = prep.task, prep.model
        val_feats = task.featurize(prep.val, prep.tokenizer, prep.cfg.max_length)
        predict = loop.make_predict(model, trainer.pad_id, cfg.eval_batch_size, trainer.device, contextlib.nullcontext)

        payload, history, done = encode(trainer.state()), [], 0
        if cfg.resume and state_path.exists():
            payload, done, history = load_state(state_path)
            trainer.load(decode(payload))
            log(f"resuming {out} after round {done} of {cfg.rounds}")
        run = {"config": asdict(cfg), "lr": trainer.lr, "device": trainer.device, "model_path": prep.model_path,
               "model_kwargs": prep.model_kwargs}
        atomic_write_text(out / "run.json", json.dumps(run, indent=2, default=str) + "\n")

        def on_round(rnd: int, aggregated: bytes, record: dict[str, Any]) -> float:
            trainer.load(decode(aggregated))
            score = task.score(model, val_feats, prep.val, predict)[task.main_metric]
            clients = record["clients"]
            history.append({"round": rnd, "validation": score, "clients": clients,
                            "bytes_up": sum(e.get("bytes_up", 0) for e in clients),
                            "bytes_down": sum(e["bytes_down"] for e in clients),
                            "failures": sum("failed" in e for e in clients),
                            "train_time_s": sum(e.get("train_time_s", 0.0) for e in clients)})
            save_state(state_path, aggregated, rnd, history)
            log(f"round {rnd}/{cfg.rounds}: validation {task.main_metric} {score:.4f}, "
                f"{history[-1]['bytes_up'] + history[-1]['bytes_down']:,} bytes"
                + (f", {history[-1]['failures']} client(s) failed" if history[-1]["failures"] else ""))
            return score

        if done < cfg.rounds:
            strategy = DeltaFedAvg(initial=payload, clients=cfg.clients, per_round=cfg.per_round, seed=cfg.seed,
                                   local_epochs=cfg.local_epochs, on_round=on_round, base=trainer.fingerprint,
                                   rounds_done=done)
            quiet = logging.getLogger("flwr")
            level, quiet.level = quiet.level, logging.WARNING
            try:
                fit(Server(client_manager=SimpleClientManager(), strategy=strategy), cfg.rounds - done)
            finally:
                quiet.setLevel(level)
            if len(history) < cfg.rounds:
                raise RuntimeError(f"the server stopped after round {len(history)} of {cfg.rounds}; "
                                   f"pass --resume to continue")
            payload = load_state(state_path)[0]
            trainer.load(decode(payload))

        report_feats = task.featurize(prep.report, prep.tokenizer, prep.cfg.max_length)
        report_metrics = task.score(model, report_feats, prep.report, predict)
        results = {
            "federated": True, "task": cfg.task, "method": cfg.method, "model": cfg.model or loop.DEFAULT_MODEL,
            "seed": cfg.seed, "k_shot": cfg.k_shot, "clients": cfg.clients, "per_round": cfg.per_round,
            "rounds": cfg.rounds, "local_epochs": cfg.local_epochs, "alpha": cfg.alpha, "lr": trainer.lr,
            "split": prep.cfg.report_split, "main_metric": task.main_metric,
            "score": report_metrics[task.main_metric], "metrics": report_metrics,
            "shard_sizes": [len(s) for s in setup.shards], "payload_bytes": len(payload), "history": history,
            "bytes_total": sum(h["bytes_up"] + h["bytes_down"] for h in history),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        if prep.method_cfg is not None:
            serialization.save(model, out)
        else:
            loop._save_full(model, prep.tokenizer, out / "model")
        atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
        log(f"{cfg.task} / {cfg.method} federated: {task.main_metric} {results['score']:.4f} on "
            f"{results['split']}, {results['bytes_total']:,} bytes communicated")
        return results


# ----------------------------------------------------------------------------------------------- report


def report(paths: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """A table of federated runs and a plot of validation score against cumulative bytes communicated,
    one line per method (and alpha). Writes ``federated.json`` and ``federated.png`` into ``out_dir``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure


    runs = []
    for path in map(Path, paths):
        file = path if path.is_file() else path / RESULTS_FILE
        if not file.exists():
            raise ConfigError(f"no {RESULTS_FILE} in {path}")
        data = json.loads(file.read_text())
        if not data.get("federated"):
            raise ConfigError(f"{file} is not a federated run's results")
        runs.append(data)
    if not runs:
        raise ConfigError("no federated runs given")
    lines = [f"{'task':<8} {'method':<12} {'alpha':>6} {'rounds':>6} {'score':>8} {'MB total':>10} "
             f"{'MB/client/rd':>12}"]
    for r in runs:
        per = [c["bytes_up"] + c["bytes_down"] for h in r["history"] for c in h["clients"]]
        alpha = "iid" if r["alpha"] is None else f"{r['alpha']:g}"
        lines.append(f"{r['task']:<8} {r['method']:<12} {alpha:>6} {r['rounds']:>6} {r['score']:>8.4f} "
                     f"{r['bytes_total'] / 1e6:>10.3f} {np.mean(per) / 1e6 if per else 0.0:>12.4f}")
    table = "\n".join(lines) + "\n"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.4, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in runs:
        xs = np.cumsum([h["bytes_up"] + h["bytes_down"] for h in r["history"]])
        label = r["method"] + ("" if r["alpha"] is None else f" (alpha {r['alpha']:g})")
        ax.plot(np.maximum(xs, 1), [h["validation"] for h in r["history"]], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("bytes communicated (cumulative, up + down)")
    ax.set_ylabel(f"validation {runs[0]['main_metric']}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    png, js = out_dir / "federated.png", out_dir / "federated.json"
    serialization._atomic_write(png, lambda tmp: fig.savefig(tmp, format="png"))
    serialization._atomic_write(js, lambda tmp: Path(tmp).write_text(json.dumps({"table": table, "runs": [
        {k: r[k] for k in ("task", "method", "alpha", "rounds", "score", "bytes_total")} for r in runs]}, indent=2)))
    return {"table": table, "json": js, "png": png}
