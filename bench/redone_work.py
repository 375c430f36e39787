"""Work trained again when trainers die: epochs trained / epochs needed, with checkpoints
against without.

The fault drill's trainer faults on a real search: ``mloptimizer run --broker amqp://…``
(SQLite in the run folder, the machine's RabbitMQ) with three external ``mloptimizer
trainer`` processes searches ``--trials`` digits trials of ``--epochs`` epochs. Each time
the trainers have logged another ``--every`` epochs, one trainer that is in the middle of a
trial (it told at least one epoch of it, not the last) is killed, by turns with SIGKILL and
with SIGTERM, and a new one is started. The search runs twice with the same seeded faults:
once with the trainers keeping checkpoints in a shared folder (as a search's claim or the
run folder gives them), once without (every trial a trainer lost starts over: the figure
before checkpoints).

Epochs needed: the epochs of the trials told. Epochs trained: those, plus the told epochs
trained again (the study's ``redone_epochs``), plus one for every attempt that went away
(the epoch it was in, counted whole: the partial epoch no report shows).

Run: ``python bench/redone_work.py`` on a quiet machine (3 min). Prints each run's epochs
trained / epochs needed (target with checkpoints <= 1.05) and ``ratio with/without``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import optuna
import pika
import yaml

from mloptimizer.messages import QueueNames
from mloptimizer.study import Attr, records

BROKER = os.environ.get("MLOPT_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/%2F")
TRAINERS = 3
EPOCH_LINE = re.compile(r"trial (\d+) epoch (\d+)/(\d+)")


@dataclass
class Run:
    needed: int
    redone: int
    lost_attempts: int
    kills: int
    seconds: float

    @property
    def trained(self) -> int:
        return self.needed + self.redone + self.lost_attempts

    @property
    def ratio(self) -> float:
        return self.trained / self.needed


def exe(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed beside {sys.executable}"
    return found


class Trainer:
    def __init__(self, folder: Path, search: str, name: str, checkpoints: Path | None) -> None:
        self.log_path = folder / f"{name}.log"
        keep = ["--checkpoint-dir", str(checkpoints)] if checkpoints else []
        self.process = subprocess.Popen(
            [exe("mloptimizer"), "trainer", "--broker", BROKER, "--search", search,
             "--worker-id", name, "--cache-dir", str(folder / "cache"),
             "--intra-op-threads", "1", "--inter-op-threads", "1", *keep],
            stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
            env={**os.environ, "KERAS_HOME": str(folder / "keras")},
        )  # fmt: skip

    def epochs(self) -> list[tuple[int, int, int]]:
        return [tuple(map(int, m)) for m in EPOCH_LINE.findall(self.log_path.read_text())]  # type: ignore[misc]

    def mid_trial(self) -> bool:
        """Alive, and the last epoch it logged was not its trial's last."""
        told = self.epochs()
        return self.process.poll() is None and bool(told) and told[-1][1] < told[-1][2]


def search_once(folder: Path, trials: int, epochs: int, every: int, seed: int, keep: bool) -> Run:
    name = f"redone-{uuid.uuid4().hex[:8]}"
    search = f"default.{name}"
    spec = {
        "apiVersion": "mloptimizer.io/v1alpha1",
        "kind": "ArchitectureSearch",
        "metadata": {"name": name},
        "spec": {
            "dataset": {"builtin": "digits"},
            "budget": {"maxTrials": trials, "parallelism": TRAINERS, "maxFailedTrials": 10},
            "sampler": {"seed": seed, "nStartupTrials": 8},
            "pruner": {"type": "none"},
            "training": {"epochs": epochs, "batchSize": 32},
            "searchSpace": {
                "architectures": ["cnn"],
                "cnn": {
                    "blocks": {"min": 1, "max": 2},
                    "filters": {"min": 8, "max": 32, "step": 8},
                },
                "classifier": {"types": ["gap"]},
            },
        },
    }
    spec_file = folder / "search.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    out = folder / "out"
    checkpoints = folder / "checkpoints" if keep else None
    started = time.monotonic()
    runner = subprocess.Popen(
        [exe("mloptimizer"), "run", str(spec_file), "--broker", BROKER, "--workers", "0",
         "--out", str(out)],
        stdout=(folder / "runner.log").open("w"), stderr=subprocess.STDOUT,
        env={**os.environ, "KERAS_HOME": str(folder / "keras")},
    )  # fmt: skip
    trainers = [Trainer(folder, search, f"t{i}", checkpoints) for i in range(1, TRAINERS + 1)]
    rng = random.Random(seed)
    kills, next_at = 0, every
    try:
        while runner.poll() is None:
            logged = sum(len(t.epochs()) for t in trainers)
            busy = [t for t in trainers if t.mid_trial()]
            if logged >= next_at and busy:
                victim = rng.choice(busy)
                victim.process.send_signal(signal.SIGKILL if kills % 2 == 0 else signal.SIGTERM)
                victim.process.wait()
                kills += 1
                next_at = logged + every
                trainers.append(Trainer(folder, search, f"t{len(trainers) + 1}", checkpoints))
            time.sleep(0.1)
        assert runner.returncode == 0, (folder / "runner.log").read_text()[-3000:]
    finally:
        for trainer in trainers:
            if trainer.process.poll() is None:
                trainer.process.kill()
                trainer.process.wait()
        if runner.poll() is None:
            runner.kill()
        connection = pika.BlockingConnection(pika.URLParameters(BROKER))
        channel = connection.channel()
        for queue in QueueNames(search).all:
            channel.queue_delete(queue)
        connection.close()
    seconds = time.monotonic() - started
    study = optuna.load_study(study_name=search, storage=f"sqlite:///{out / 'study.db'}")
    told = [t for t in records(study) if t.counted and t.attrs.get(Attr.EPOCHS)]
    return Run(
        needed=sum(int(t.attrs[Attr.EPOCHS]) for t in told),
        redone=sum(int(t.attrs.get(Attr.REDONE_EPOCHS, 0)) for t in told),
        lost_attempts=sum(int(t.attrs.get(Attr.ATTEMPT, 1)) - 1 for t in told),
        kills=kills,
        seconds=seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--every", type=int, default=25, help="epochs logged between kills")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs: dict[str, Run] = {}
    for label, keep in (("with checkpoints", True), ("without", False)):
        with tempfile.TemporaryDirectory(prefix="redone-") as tmp:
            runs[label] = search_once(
                Path(tmp), args.trials, args.epochs, args.every, args.seed, keep
            )
        run = runs[label]
        print(
            f"{label:17s} {args.trials} trials x {args.epochs} epochs, {run.kills} trainers "
            f"killed mid-trial: epochs needed {run.needed}, told again {run.redone}, attempts "
            f"lost {run.lost_attempts}; trained/needed {run.ratio:.3f} ({run.seconds:.0f} s)"
        )
    ratio = runs["with checkpoints"].ratio / runs["without"].ratio
    target = "met" if runs["with checkpoints"].ratio <= 1.05 else "NOT met"
    print(f"ratio with/without {ratio:.3f}; with checkpoints <= 1.05: {target}")
    print(json.dumps({k: vars(v) for k, v in runs.items()}))


if __name__ == "__main__":
    main()
