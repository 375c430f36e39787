"""The ``mloptimizer`` command line."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from mloptimizer.flags import env_flag
from mloptimizer.formats import DEFAULT_FORMATS, formats_help
from mloptimizer.logs import set_verbose

__all__ = ["main"]

# Set by a trainer restarting itself in place: the trials it served before (--max-trials).
TRIALS_DONE_ENV = "MLOPT_TRIALS_DONE"

DESCRIPTION = """\
Distributed AutoML with TPE. Write one ArchitectureSearch file; check it with
`mloptimizer validate`, preview what it samples with `mloptimizer space`, run
it on this machine with `mloptimizer run FILE`, or on a cluster with
`kubectl apply -f FILE` (then `mloptimizer fetch NAMESPACE/NAME --to DIR`
downloads the model it delivered to spec.output).
"""


def _cmd_validate(args: argparse.Namespace) -> int:
    import optuna

    from mloptimizer.checks import size_issues, space_issues
    from mloptimizer.loading import SpecError, load_search
    from mloptimizer.sizing import trainer_budget

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    failed = 0
    for path in args.files:
        try:
            search = load_search(path)
            errors, warnings = space_issues(search.spec)
            if not errors:
                size_errors, size_warnings = size_issues(search.spec, trainer_budget(search.spec))
                errors, warnings = size_errors, warnings + size_warnings
            if errors:
                raise SpecError(path, errors)
        except SpecError as error:
            failed += 1
            print(error, file=sys.stderr)
            continue
        for warning in warnings:
            print(f"{path}: warning: {warning}", file=sys.stderr)
        print(f"{path}: ok ({search.name}, {search.spec.budget.max_trials} trials)")
    return 1 if failed else 0


def _cmd_space(args: argparse.Namespace) -> int:
    import optuna

    from mloptimizer.checks import fitted_space
    from mloptimizer.loading import SpecError, load_search
    from mloptimizer.space import sample_architecture, space_size

    try:
        search = load_search(args.file)
    except SpecError as error:
        print(error, file=sys.stderr)
        return 1
    space = fitted_space(search.spec)
    seed = args.seed if args.seed is not None else search.spec.sampler.seed
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # What TPE proposes before it has results is a random draw: show exactly that.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    print(f"{'#':>3}  architecture")
    for number in range(args.samples):
        architecture = sample_architecture(study.ask(), space, search.spec.training.augmentation)
        print(f"{number:>3}  {architecture.summary()}")
    print(f"\nspace: {space_size(space)}")
    return 0


def _cmd_trainer(args: argparse.Namespace) -> int:
    import signal

    from mloptimizer.logs import configure_logging

    configure_logging()
    if not args.broker or not args.search:
        print(
            "mloptimizer trainer: --broker and --search are required (or set "
            "MLOPT_BROKER_URL and MLOPT_SEARCH)",
            file=sys.stderr,
        )
        return 2
    from mloptimizer.trainer import sharing

    if args.trainers_per_gpu != "1" and sharing.SHARE_ENV not in os.environ:
        code = sharing.run_shared(
            args.trainers_per_gpu, args.trainer_memory_mb, args.worker_id, args.intra_op_threads
        )
        if code is not None:
            return code
    limit = os.environ.get(sharing.LIMIT_ENV)
    from mloptimizer.trainer.device import configure_threads

    sharing.configure_gpu_memory(int(limit) if limit else None)  # before the first op
    configure_threads(args.intra_op_threads, args.inter_op_threads)
    from mloptimizer.trainer.worker import Worker, WorkerConfig

    config = WorkerConfig(
        broker_url=args.broker,
        search=args.search,
        cache_dir=Path(args.cache_dir),
        base_dir=Path(args.data_dir) if args.data_dir else None,
        keep_models=Path(args.keep_models) if args.keep_models else None,
        output_dir=Path(args.output_dir) if args.output_dir else None,
        checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None,
        heartbeat=args.heartbeat,
        grace_seconds=args.grace_period,
        queue_prefix=args.queue_prefix,
        max_trials=args.max_trials,
        recycle_memory_mb=args.recycle_memory_mb or None,
        trials_done=int(os.environ.get(TRIALS_DONE_ENV, "0")),
        **({"worker_id": args.worker_id} if args.worker_id else {}),
    )
    worker = Worker(config)
    signal.signal(signal.SIGTERM, lambda *_: worker.request_stop())
    signal.signal(signal.SIGINT, lambda *_: worker.request_stop())
    code = worker.run()
    if worker.recycle_due and not worker.stopping:
        # A fresh process image in the same process: the pod's container does not restart
        # (no kubelet back-off), the dataset cache on disk stays, the count goes on.
        os.environ[TRIALS_DONE_ENV] = str(worker.trials_done)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, sys.orig_argv)
    return code


def _cmd_run(args: argparse.Namespace) -> int:
    import logging

    import optuna

    from mloptimizer.app.runner import RunOptions, memory_budget, run_search
    from mloptimizer.checks import size_issues, space_issues
    from mloptimizer.loading import SpecError, load_search
    from mloptimizer.study import StudyMismatch

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # pika logs every failed reconnect with a traceback; the runner says what it waits for.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    workers = args.workers
    try:
        search = load_search(args.file)
        if workers is None:
            workers = 0 if args.broker else search.spec.budget.parallelism
        errors, warnings = space_issues(search.spec)
        if not errors:
            budget = memory_budget(search, RunOptions(Path("."), workers, broker=args.broker))
            size_errors, size_warnings = size_issues(search.spec, budget)
            errors, warnings = size_errors, warnings + size_warnings
        if errors:
            raise SpecError(args.file, errors)
    except (OSError, SpecError) as error:
        print(error, file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if search.spec.workers.gpu_pool is not None:
        print(
            "note: spec.workers.gpuPool rents machines only under the operator; "
            "`mloptimizer run` trains on this machine and rents nothing",
            file=sys.stderr,
        )
    out = Path(args.out) if args.out else Path("runs") / search.name
    options = RunOptions(
        out=out,
        workers=workers,
        storage=args.storage,
        broker=args.broker,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
    )
    try:
        outcome = run_search(search, options)
    except StudyMismatch as error:
        print(f"mloptimizer run: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; run the same command again to resume:\n  {_resume_command()}")
        return 130
    except Exception:
        traceback.print_exc()
        print(
            f"mloptimizer run: crashed (a bug, or a service that never came back); nothing "
            f"finished is lost, run the same command again to resume:\n  {_resume_command()}",
            file=sys.stderr,
        )
        return 70
    print(f"search ended ({outcome.reason}): {outcome.message}")
    if outcome.reason == "interrupted":
        print(f"run the same command again to resume:\n  {_resume_command()}")
        return 130
    if not args.no_report:
        code = _report(out, args.storage)
        if code:
            return code
    return 1 if outcome.failed else 0


def _resume_command() -> str:
    """This command as typed, every option kept, passwords replaced by ``***``."""
    from mloptimizer.urls import redact_text

    return redact_text(shlex.join(["mloptimizer", *sys.argv[1:]]))


def _report(out: Path, storage: str | None) -> int:
    from mloptimizer.app.report import ReportError, build_report

    try:
        page = build_report(out, storage=storage)
    except ReportError as error:
        print(f"mloptimizer report: {error}", file=sys.stderr)
        return 2
    print(f"report: {page}")
    listed = page.parent / "export" / "export.json"
    if listed.exists():  # the best model in output.formats, each run and timed
        made = [a for a in json.loads(listed.read_text()) if not a["error"]]
        shown = ", ".join(f"{a['format']} {a['bytes'] / 1024:.1f} KB" for a in made)
        print(f"export: {listed.parent} ({shown})")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    return _report(Path(args.dir), args.storage)


def _cmd_export(args: argparse.Namespace) -> int:
    from mloptimizer.app.export import ExportError, export_run

    try:
        artifacts = export_run(Path(args.dir), tuple(args.format) if args.format else None)
    except ExportError as error:
        print(f"mloptimizer export: {error}", file=sys.stderr)
        return 2
    print(f"{'format':<15} {'size KB':>9} {'accuracy':>9} {'ms/image':>9}  file")
    for a in artifacts:
        if a["error"]:
            print(f"{a['format']:<15} {'-':>9} {'-':>9} {'-':>9}  failed: {a['error'][:200]}")
            continue
        print(
            f"{a['format']:<15} {a['bytes'] / 1024:>9.1f} {a['accuracy']:>9.4f} "
            f"{a['latency_ms']:>9.3f}  {a['path']}"
        )
    return 1 if any(a["error"] for a in artifacts) else 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from mloptimizer.app.fetch import FetchError, fetch

    kubectl = [args.kubectl]
    if args.kubeconfig:
        kubectl += ["--kubeconfig", args.kubeconfig]
    if args.context:
        kubectl += ["--context", args.context]
    try:
        fetch(
            args.search,
            Path(args.to),
            kubectl=kubectl,
            endpoint_url=args.endpoint_url,
            from_dir=Path(args.from_dir) if args.from_dir else None,
        )
    except FetchError as error:
        print(f"mloptimizer fetch: {error}", file=sys.stderr)
        return 2
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    from mloptimizer.operator.config import config_from_args
    from mloptimizer.operator.main import run_operator

    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"mloptimizer operator: {error}", file=sys.stderr)
        return 2
    return run_operator(config)


def _cmd_crd(args: argparse.Namespace) -> int:
    from mloptimizer.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def _add_verbose(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--verbose",
        action="store_true",
        help="also show the native libraries' own log lines (TensorFlow, LiteRT, absl), "
        "which are kept off the console by default",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one sub-command per job."""
    parser = argparse.ArgumentParser(
        prog="mloptimizer",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser(
        "validate",
        help="check search files against the ArchitectureSearch schema",
        description="Check each search file (a whole ArchitectureSearch or only its spec) "
        "with the same rules the Kubernetes API server applies. Prints every error with "
        "its field path and the fix; exits 1 if any file is invalid.",
    )
    validate.add_argument("files", nargs="+", metavar="FILE", help="search file(s) to check")
    validate.set_defaults(func=_cmd_validate)

    space = commands.add_parser(
        "space",
        help="show architectures the search would sample, and the size of its space",
        description="Sample architectures from a search file's space the way the search's "
        "first (random start-up) trials do, and print them with the size of the space.",
    )
    space.add_argument("file", metavar="FILE", help="search file")
    space.add_argument(
        "--samples", type=int, default=10, metavar="N", help="how many to sample (default 10)"
    )
    space.add_argument(
        "--seed", type=int, default=None, help="sampling seed (default: spec.sampler.seed)"
    )
    space.set_defaults(func=_cmd_space)

    trainer = commands.add_parser(
        "trainer",
        help="run a trainer: consume a search's trials from RabbitMQ and train them",
        description="A long-lived trainer. Takes one trial at a time from the search's "
        "queue, trains it (the dataset stays cached in memory across trials), sends "
        "per-epoch progress (honouring prune replies) and the result, and only then acks "
        "the trial. SIGTERM requeues the trial in hand and exits 0.",
    )
    env_flag(
        trainer, "--broker", env="MLOPT_BROKER_URL", shown="required",
        help="AMQP URL, such as amqp://user:pass@host:5672/%%2F",
    )  # fmt: skip
    env_flag(
        trainer, "--search", env="MLOPT_SEARCH", shown="required",
        help="the search's study name, <namespace>.<name>",
    )  # fmt: skip
    env_flag(
        trainer, "--cache-dir", env="MLOPT_CACHE_DIR", default="/var/cache/mloptimizer",
        help="where downloaded datasets are cached; mount a volume here",
    )  # fmt: skip
    env_flag(
        trainer, "--data-dir", env="MLOPT_DATA_DIR", shown="the current folder",
        help="base folder for relative imageFolder paths",
    )  # fmt: skip
    env_flag(
        trainer, "--keep-models", env="MLOPT_KEEP_MODELS", shown="none kept",
        help="folder where this trainer keeps the model of its best trial, so that the "
        "report need not train it again (mloptimizer run --broker --workers N sets "
        "<out>/models)",
    )  # fmt: skip
    env_flag(
        trainer, "--checkpoint-dir", env="MLOPT_CHECKPOINT_DIR", shown="none kept",
        help="folder where each trial's state is kept after every epoch, so that a trial "
        "whose trainer died goes on from its last epoch on whichever trainer gets it next "
        "(mloptimizer run sets <out>/checkpoints; the operator sets the search's folder of "
        "its output.pvc)",
    )  # fmt: skip
    env_flag(
        trainer, "--output-dir", env="MLOPT_OUTPUT_DIR", shown="none",
        help="where the search's output.pvc is mounted: the final job writes the best "
        "model there (the operator sets it on the trainers of a search with output.pvc)",
    )  # fmt: skip
    env_flag(
        trainer, "--worker-id", env="MLOPT_WORKER_ID", shown="<host>-<pid>",
        help="this trainer's name in results and logs",
    )  # fmt: skip
    env_flag(
        trainer, "--heartbeat", env="MLOPT_HEARTBEAT", default=30, type=int,
        help="AMQP heartbeat in seconds",
    )  # fmt: skip
    env_flag(
        trainer, "--grace-period", env="MLOPT_GRACE_PERIOD", default=20.0, type=float,
        help="seconds to stop a trial on SIGTERM; keep it below the pod's "
        "terminationGracePeriodSeconds",
    )  # fmt: skip
    env_flag(
        trainer, "--queue-prefix", env="MLOPT_QUEUE_PREFIX", default="mlopt",
        help="queue name prefix: queues are <prefix>.<search>.trials etc.",
    )  # fmt: skip
    env_flag(
        trainer, "--max-trials", env="MLOPT_MAX_TRIALS", type=int, shown="run until stopped",
        help="exit 0 after this many trials",
    )  # fmt: skip
    env_flag(
        trainer, "--recycle-memory-mb", env="MLOPT_RECYCLE_MEMORY_MB", default=1024.0,
        type=float,
        help="restart in place, between trials, once resident memory grew this much after "
        "the first trial: Keras keeps ~8 MB per model built and trials slow down with it; "
        "0 turns it off",
    )  # fmt: skip
    env_flag(
        trainer, "--intra-op-threads", env="MLOPT_INTRA_OP_THREADS", type=int,
        shown="all cores", help="TensorFlow intra-op threads",
    )  # fmt: skip
    env_flag(
        trainer, "--inter-op-threads", env="MLOPT_INTER_OP_THREADS", type=int,
        shown="TensorFlow's", help="TensorFlow inter-op threads",
    )  # fmt: skip
    env_flag(
        trainer, "--trainers-per-gpu", env="MLOPT_TRAINERS_PER_GPU", default="1",
        help="trainer processes on each GPU, each with an equal share of its memory as a "
        "hard limit (1 to 8, or auto: as many as --trainer-memory-mb fits); without a GPU "
        "one runs (the operator sets it from workers.trainersPerGpu)",
    )  # fmt: skip
    env_flag(
        trainer, "--trainer-memory-mb", env="MLOPT_TRAINER_MEMORY_MB", type=float,
        shown="none", help="GPU memory one trainer needs, for --trainers-per-gpu auto",
    )  # fmt: skip
    trainer.set_defaults(func=_cmd_trainer)

    run = commands.add_parser(
        "run",
        help="run a whole search on this machine: live progress, a report, resume",
        description="Run the search in FILE here: an Optuna study (SQLite in the output "
        "folder, or --storage), trials trained by local trainer processes (or, with "
        "--broker, by `mloptimizer trainer` processes anywhere), a live progress bar, and a "
        "report with plots and the best model's test scores at the end. Run the same "
        "command again to resume: finished trials are never repeated. Ctrl-C stops cleanly. "
        "A database or broker that goes away is waited for.",
        epilog="exit codes: 0 the search ended (maxTrials, target, timeout, maxCostUSD); "
        "1 the search failed (budget.maxFailedTrials); 2 a bad search file or a study that "
        "cannot go on under it; 70 the runner crashed (resume by running it again); "
        "130 interrupted (Ctrl-C).",
    )
    run.add_argument("file", help="the ArchitectureSearch file")
    run.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local trainer processes (default: budget.parallelism; with --broker: 0, "
        "trainers run elsewhere)",
    )
    env_flag(
        run, "--storage", env="MLOPT_STORAGE", shown="SQLite in the output folder",
        help="Optuna storage URL, such as postgresql://user@host/db; prefer the variable "
        "for a URL with a password: argv is visible to every user in `ps`",
    )  # fmt: skip
    env_flag(
        run, "--broker", env="MLOPT_BROKER", shown="none",
        help="AMQP URL: send trials through RabbitMQ to `mloptimizer trainer` workers; "
        "prefer the variable for a URL with a password: argv is visible in `ps`",
    )  # fmt: skip
    run.add_argument("--out", help="output folder (default: runs/<metadata.name>)")
    run.add_argument("--cache-dir", help="dataset download cache (default: <out>/cache)")
    run.add_argument("--no-report", action="store_true", help="skip the report at the end")
    _add_verbose(run)
    run.set_defaults(func=_cmd_run)

    report = commands.add_parser(
        "report",
        help="rebuild the report of a run folder, or of a folder a cluster delivered to",
        description="Rebuild DIR/report.md: summary.json, the plots, the best model "
        "(best.keras, retrained only when missing or stale) and its scores on the "
        "held-out test split. DIR may also be where a search in a cluster delivered its "
        "model (output.pvc or output.s3, copied here): the same page is drawn from its "
        "summary.json, and with --storage the study's part is read afresh.",
    )
    report.add_argument("dir", help="the output folder of `mloptimizer run`, or a delivered folder")
    env_flag(
        report, "--storage", env="MLOPT_STORAGE", shown="the run folder's SQLite",
        help="the study's storage URL, when the run used one (the variable keeps its "
        "password out of `ps`)",
    )  # fmt: skip
    _add_verbose(report)
    report.set_defaults(func=_cmd_report)

    export = commands.add_parser(
        "export",
        help="the best model of a run folder as files for devices (LiteRT int8, ...)",
        description="Convert DIR/best.keras (written by the report) into each --format under "
        "DIR/export/, run each artifact on the test split to measure its accuracy (LiteRT's "
        "interpreter for .tflite files) and its median latency for one image on this "
        "machine, and list them in DIR/export/export.json. A format that fails is reported "
        "with the reason; the others are still written (exit code 1).",
    )
    export.add_argument("dir", help="the output folder of `mloptimizer run`")
    export.add_argument(
        "--format",
        action="append",
        metavar="FORMAT",
        help=f"{formats_help()}; repeatable (default: the search's output.formats, which "
        f"default to {' and '.join(DEFAULT_FORMATS)})",
    )
    _add_verbose(export)
    export.set_defaults(func=_cmd_export)

    fetch = commands.add_parser(
        "fetch",
        help="download the model a search in a cluster delivered (status.artifacts)",
        description="Read the search's status.artifacts with kubectl and download each file "
        "into DIR, checking its size: from S3 with your own credentials (AWS_ACCESS_KEY_ID "
        "and AWS_SECRET_ACCESS_KEY, ~/.aws, ...), from a PersistentVolumeClaim through "
        "--from-dir. Exit 2 when the search delivered nothing yet, saying why.",
    )
    fetch.add_argument("search", metavar="NAMESPACE/NAME", help="the ArchitectureSearch")
    fetch.add_argument("--to", required=True, metavar="DIR", help="folder to write the files to")
    fetch.add_argument(
        "--endpoint-url",
        help="S3 endpoint as seen from here (default: the search's spec.output.s3.endpoint, "
        "which may be a cluster-internal name)",
    )
    fetch.add_argument(
        "--from-dir",
        metavar="DIR",
        help="where the output PersistentVolumeClaim's content is on this machine (its root)",
    )
    fetch.add_argument("--kubeconfig", help="kubeconfig file (default: kubectl's)")
    fetch.add_argument("--context", help="kubeconfig context (default: the current one)")
    fetch.add_argument("--kubectl", default="kubectl", help="the kubectl binary (default: kubectl)")
    fetch.set_defaults(func=_cmd_fetch)

    operator = commands.add_parser(
        "operator",
        help="run the Kubernetes operator (in the cluster, or against ~/.kube/config)",
        description="Watch ArchitectureSearch resources: run each one's TPE study in "
        "PostgreSQL, send its trials through RabbitMQ to a trainer Deployment scaled with "
        "the work, and keep its status, Events and Prometheus metrics current.",
    )
    from mloptimizer.operator.config import add_arguments

    add_arguments(operator)
    operator.set_defaults(func=_cmd_operator)

    crd = commands.add_parser(
        "crd",
        help="print the ArchitectureSearch CRD (kubectl apply -f -)",
        description="Print the CustomResourceDefinition generated from the spec model, the "
        "same text as crds/architecturesearch.yaml.",
    )
    crd.set_defaults(func=_cmd_crd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        set_verbose()
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
