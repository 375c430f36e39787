"""The command line: validate, space, crd and --help, as a user runs them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mloptimizer.app.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def mloptimizer(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run the installed console script, as README tells users to."""
    exe = shutil.which("mloptimizer", path=str(Path(sys.executable).parent))
    assert exe, "the mloptimizer console script is not installed in this environment"
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd, check=False)


def test_validate_every_example_exits_0() -> None:
    result = mloptimizer("validate", *map(str, EXAMPLES))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": ok") == len(EXAMPLES)


def test_three_mistakes_print_three_errors_with_paths(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: mloptimizer.io/v1alpha1\n"
        "kind: ArchitectureSearch\n"
        "metadata: {name: bad}\n"
        "spec:\n"
        "  dataset: {builtin: imagenet}\n"
        "  budget: {maxTrials: 4, parallelism: 8}\n"
        "  training: {epoch: 5}\n"
    )
    result = mloptimizer("validate", str(bad))
    assert result.returncode == 1
    errors = [line.strip() for line in result.stderr.splitlines() if line.startswith("  ")]
    assert len(errors) == 3, result.stderr
    assert errors[0].startswith("spec.dataset.builtin: Input should be 'mnist'")
    assert errors[1].startswith("spec.budget.parallelism: parallelism must not exceed maxTrials")
    assert errors[2] == "spec.training.epoch: unknown field; did you mean 'epochs'?"


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (bytes(range(256)) * 4, "(file): a binary file, not YAML"),
        ("dataset: {builtin: digits}\nname: é\n".encode("latin-1"), "(file): not UTF-8 text"),
        (b"dataset: {builtin: digits}\ndataset: {builtin: mnist}\n", "duplicate key 'dataset'"),
        (
            b"apiVersion: mloptimizer.io/v1alpha1\nkind: ArchitectureSearch\n"
            b"metadata: {name: ok}\nspek: {}\nspec: {dataset: {builtin: digits}}\n",
            "spek: unknown top-level key; did you mean 'spec'?",
        ),
        (
            b"metadata: {name: ../../../tmp/escape}\nspec: {dataset: {builtin: digits}}\n",
            "metadata.name: '../../../tmp/escape' is not a DNS-1123 subdomain",
        ),
        (
            b"metadata: {name: ok, namespace: Team_A}\nspec: {dataset: {builtin: digits}}\n",
            "metadata.namespace: 'Team_A' is not a DNS-1123 label",
        ),
        (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "(file): "),
        (b"x" * (1024 * 1024 + 1), "(file): over 1024 KiB"),
    ],
)
def test_a_hostile_search_file_gets_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, error: str
) -> None:
    path = tmp_path / "search.yaml"
    path.write_bytes(content)
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert error in err, err
    assert "Traceback" not in err


def test_run_never_writes_outside_the_folder_it_names(tmp_path: Path) -> None:
    (tmp_path / "escape.yaml").write_text(
        "metadata: {name: ../../escape}\nspec: {dataset: {builtin: digits}}\n"
    )
    result = mloptimizer("run", "escape.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "metadata.name" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["escape.yaml"]


def test_validate_warns_when_many_models_exceed_the_trainers_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = (
        "dataset: {imageFolder: {path: imgs, imageSize: [96, 96]}}\n"
        "searchSpace: {architectures: [cnn], classifier: {types: [mlp]}}\n"
    )
    (tmp_path / "big.yaml").write_text(base + "workers: {resources: {memory: 2Gi}}\n")
    (tmp_path / "none.yaml").write_text(base + "workers: {resources: {memory: 512Mi}}\n")
    assert main(["validate", str(tmp_path / "big.yaml")]) == 0
    err = capsys.readouterr().err
    assert "warning: spec.searchSpace: " in err
    assert "of sampled models need more than" in err
    assert main(["validate", str(tmp_path / "none.yaml")]) == 1
    assert "no sampled model fits a trainer's 0.5 GiB" in capsys.readouterr().err


def test_validate_reports_file_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "two.yaml").write_text("dataset: {builtin: digits}\n---\nfoo: 1\n")
    (tmp_path / "broken.yaml").write_text("dataset: [\n")
    (tmp_path / "wrongkind.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nspec: {dataset: {builtin: digits}}\n"
    )
    files = [str(tmp_path / n) for n in ("two.yaml", "broken.yaml", "wrongkind.yaml", "nope.yaml")]
    assert main(["validate", *files]) == 1
    err = capsys.readouterr().err
    assert "expected one YAML document, found 2" in err
    assert "not valid YAML" in err
    assert "apiVersion: must be 'mloptimizer.io/v1alpha1', got 'v1'" in err
    assert "kind: must be 'ArchitectureSearch', got 'Pod'" in err
    assert "cannot read: No such file or directory" in err


def test_space_prints_samples_and_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["space", str(ROOT / "examples" / "digits-quick.yaml"), "--samples", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line[:3].strip().isdigit()]
    assert len(rows) == 4
    assert all(("cnn[" in r) or ("inception[" in r) for r in rows)
    assert out[-1] == "space: 5,640 discrete architectures x 2 continuous (dropout, learning_rate)"


def test_space_is_repeatable_by_seed(capsys: pytest.CaptureFixture[str]) -> None:
    example = str(ROOT / "examples" / "cifar10.yaml")
    outputs = []
    for seed in ("1", "1", "2"):
        main(["space", example, "--samples", "5", "--seed", seed])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


def test_crd_command_prints_the_committed_crd() -> None:
    result = mloptimizer("crd")
    assert result.returncode == 0
    assert result.stdout == (ROOT / "crds" / "architecturesearch.yaml").read_text()


@pytest.mark.parametrize("command", [[], ["validate"], ["space"], ["crd"]])
def test_help_on_every_command(command: list[str]) -> None:
    result = mloptimizer(*command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: mloptimizer")
    assert len(result.stdout.splitlines()) > 4


def test_validate_refuses_a_space_the_images_cannot_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(
        "apiVersion: mloptimizer.io/v1alpha1\nkind: ArchitectureSearch\nmetadata: {name: d}\n"
        "spec:\n  dataset: {builtin: digits}\n"
        "  searchSpace: {architectures: [cnn], cnn: {blocks: {min: 4, max: 4}}}\n"
    )
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "spec.searchSpace.cnn.blocks.min: 4 blocks need images of at least 16x16" in err
    # only some samples too deep: valid, with a warning naming the fix
    path.write_text(path.read_text().replace("min: 4, max: 4", "min: 1, max: 4"))
    assert main(["validate", str(path)]) == 0
    captured = capsys.readouterr()
    assert "warning: spec.searchSpace.cnn.blocks.max" in captured.err
    assert "lower cnn.blocks.max to 3" in captured.err
    assert "ok (d, 20 trials)" in captured.out


def test_a_resource_without_apiversion_and_kind_is_a_search_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "small.yaml"
    path.write_text("metadata: {name: small}\nspec:\n  dataset:\n    builtin: digits\n")
    assert main(["validate", str(path)]) == 0
    captured = capsys.readouterr()
    assert "ok (small, 20 trials)" in captured.out
    assert captured.err == ""  # the default space fits digits: no warning
    path.write_text("apiVersion: v2\nspec:\n  dataset:\n    builtin: digits\n")
    assert main(["validate", str(path)]) == 1
    assert "apiVersion: must be 'mloptimizer.io/v1alpha1', got 'v2'" in capsys.readouterr().err


def test_report_of_a_folder_whose_study_is_gone_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run.json").write_text('{"search": "default.x", "storage": "study.db"}')
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'study.db'} is missing" in err
    assert "Traceback" not in err


def test_the_resume_command_keeps_every_option_and_hides_passwords(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mloptimizer.app.cli import _resume_command

    argv = ["mloptimizer", "run", "s.yaml", "--workers", "3", "--cache-dir", "/data/c"]
    argv += ["--broker", "amqp://u:s3cret@mq/%2F", "--storage", "postgresql://p:pw9@db/x"]
    monkeypatch.setattr(sys, "argv", argv)
    command = _resume_command()
    assert command.startswith("mloptimizer run s.yaml --workers 3 --cache-dir /data/c")
    assert "s3cret" not in command
    assert "pw9" not in command
    assert "amqp://u:***@mq/%2F" in command


def test_runner_trainers_get_the_broker_url_in_env_not_argv_and_images_beside_the_spec(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import subprocess

    from mloptimizer.app import runner

    started: list[tuple[list[str], dict[str, str]]] = []

    def popen(args: list[str], env: dict[str, str]) -> str:
        started.append((args, env))
        return "process"

    monkeypatch.setattr(subprocess, "Popen", popen)
    options = runner.RunOptions(out=tmp_path, workers=2, broker="amqp://u:s3cret@mq/%2F")
    assert len(runner._broker_trainers(options, "default.s", tmp_path / "searches")) == 2
    for args, env in started:
        assert not any("s3cret" in a for a in args)
        # a relative imageFolder.path: next to the search file, as without --broker
        assert args[args.index("--data-dir") + 1] == str(tmp_path / "searches")
        # each keeps its best model in the run folder, for the report
        assert args[args.index("--keep-models") + 1] == str(tmp_path / "models")
        assert env["MLOPT_BROKER_URL"] == "amqp://u:s3cret@mq/%2F"


def test_run_takes_its_database_and_broker_urls_from_variables_kept_out_of_ps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mloptimizer.app import runner

    storage, broker = "postgresql://p:pw9@db/x", "amqp://u:s3cret@mq/%2F"
    monkeypatch.setenv("MLOPT_STORAGE", storage)
    monkeypatch.setenv("MLOPT_BROKER", broker)
    seen: list[runner.RunOptions] = []

    def run_search(search: object, options: runner.RunOptions) -> object:
        seen.append(options)
        raise KeyboardInterrupt  # stop there: nothing to train

    monkeypatch.setattr(runner, "run_search", run_search)
    argv = ["run", str(ROOT / "examples" / "digits-quick.yaml"), "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["mloptimizer", *argv])
    assert main(argv) == 130
    (options,) = seen
    assert (options.storage, options.broker) == (storage, broker)
    assert options.workers == 0  # a broker: trainers run elsewhere
    # the resume command needs no URL: the variables still hold them
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert "pw9" not in out
    # the flags still work, and win over the variables; --help says why the variables
    parser_help = mloptimizer("run", "--help").stdout
    help_text = " ".join(parser_help.split())
    assert "(env MLOPT_STORAGE;" in help_text
    assert "(env MLOPT_BROKER;" in help_text
    assert "`ps`" in help_text
    from mloptimizer.app.cli import build_parser

    flagged = build_parser().parse_args(["run", "s.yaml", "--storage", "sqlite:///x.db"])
    assert (flagged.storage, flagged.broker) == ("sqlite:///x.db", broker)
