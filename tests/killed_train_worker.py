"""``unipelt train`` with the arguments given, killed right after its second checkpoint is written, as a kill
would stop it (rank 0 writes the checkpoints; a launcher stops the other processes when it dies). For
tests/test_cli.py's resume of an FSDP run: ``accelerate launch ... killed_train_worker.py train ...``."""

from __future__ import annotations

import os
import sys

from unipelt.cli import main
from unipelt.train import loop

real_save = loop._atomic_torch_save
saves = []


def save_then_die(obj, path) -> None:
    real_save(obj, path)
    saves.append(path)
    if len(saves) == 2:
        os._exit(9)  # no clean-up, as a kill


loop._atomic_torch_save = save_then_die
sys.exit(main(sys.argv[1:]))
