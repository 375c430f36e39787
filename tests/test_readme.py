"""README.md and docs/*.md hold, command by command: documents that drift from the code fail here.

Every check covers README.md and every docs/*.md; a block or table counts in whichever file
holds it (each table is in exactly one).

* Every ```bash block carries a ``<!-- readme-test: KIND -->`` comment on the line before it
  and runs as written, in a copy of the repository: ``run`` blocks with the test venv
  (linked as ``.venv``), ``setup``, ``main`` and ``after-main`` on a fresh copy in that
  order, as a newcomer would (a new venv, the main job, what comes after it: all in README),
  ``until-stopped`` ones until they print their ready line, then SIGTERM (exit 0);
  ``skip (why)`` ones (a cluster, a registry) are only listed.
* Every ```console block is a command (``$ ...``) and its exact output.
* Every ```yaml block is a search file that validates without errors or warnings.
* Every flag, variable and default in the flags tables is what ``--help`` and the parser say,
  and every flag of the parser is in its table; every chart value in the values table is in
  ``values.yaml`` with that default; every CRD field is in the spec reference; the live/fixed
  table is ``mloptimizer.changes``; every file the layout and run-folder tables name exists.
* Every link and ``#anchor`` resolves; every ``tests/...py::test_...`` named exists; every
  benchmark row names its own script and a line that script prints.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pytest
import yaml
from services import RABBITMQ_URL

from mloptimizer.app.cli import build_parser
from mloptimizer.changes import FIXED, LIVE
from mloptimizer.checks import space_issues
from mloptimizer.loading import parse_search
from mloptimizer.messages import QueueNames

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
VENV = Path(sys.prefix)

KINDS = {"run", "setup", "main", "after-main", "until-stopped", "skip"}


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int  # of the opening fence
    kind: str = ""  # from the readme-test comment before it
    detail: str = ""  # its parenthesised part: the reason to skip, the ready line
    file: str = "README.md"  # relative to the repository

    def __str__(self) -> str:
        return f"{self.file}:{self.line} ({self.lang or 'text'}, {self.kind or 'unmarked'})"


def name_of(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix()


def blocks(text: str | None = None, doc: Path = README) -> list[Block]:
    lines = (text if text is not None else doc.read_text()).splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[index])
        if not fence:
            index += 1
            continue
        start = index
        index += 1
        body: list[str] = []
        while index < len(lines) and lines[index] != "```":
            body.append(lines[index])
            index += 1
        index += 1
        previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = re.match(r"<!-- readme-test: ([\w-]+)(?: \((.*)\))? -->", previous)
        kind, detail = (marker.group(1), marker.group(2) or "") if marker else ("", "")
        found.append(
            Block(fence.group(1), "\n".join(body) + "\n", start + 1, kind, detail, name_of(doc))
        )
    return found


def of_lang(*langs: str) -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc=doc) if b.lang in langs]


def block_id(block: Block) -> str:
    return f"{block.file}:{block.line}"


def repo_copy(where: Path) -> Path:
    """The files git tracks, as a fresh clone would have them (plus the working tree's edits)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            target = where / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return where


def environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLOPT_", "VIRTUAL_ENV"))}
    return {**env, "KERAS_HOME": str(home / "keras"), "TF_CPP_MIN_LOG_LEVEL": "3"}


def run_block(block: Block, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.text],
        cwd=cwd, env=environment(cwd), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, f"{block} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done


# --- the markers ------------------------------------------------------------------------


def test_the_parser_reads_fences_and_markers() -> None:
    text = (
        "a\n<!-- readme-test: skip (no cluster) -->\n```bash\nkubectl get x\n```\n"
        "```yaml\nk: v\n```\n"
    )
    skip, plain = blocks(text)
    assert (skip.lang, skip.kind, skip.detail, skip.text) == ("bash", "skip", "no cluster",
                                                              "kubectl get x\n")  # fmt: skip
    assert (plain.lang, plain.kind, plain.line) == ("yaml", "", 6)


def test_every_shell_block_is_marked_and_every_skip_says_why() -> None:
    shell = of_lang("bash", "sh", "shell")
    assert len(shell) >= 10
    for block in shell:
        assert block.lang == "bash", f"{block}: write ```bash"
        assert block.kind in KINDS, f"{block}: add <!-- readme-test: run|skip (why)|... -->"
        if block.kind in ("skip", "until-stopped"):
            assert block.detail, f"{block}: say why in parentheses"
    kinds = [b.kind for b in shell]
    assert kinds.count("setup") == 1
    assert kinds.count("main") == 1


# --- commands that run with the test venv ----------------------------------------------


@pytest.mark.parametrize("block", [b for b in of_lang("bash") if b.kind == "run"], ids=block_id)
def test_run_block_works_as_written(block: Block, tmp_path: Path) -> None:
    copy = repo_copy(tmp_path / "repo")
    (copy / ".venv").symlink_to(VENV)
    run_block(block, copy, timeout=300)


@pytest.mark.parametrize("block", [b for b in of_lang("console")], ids=block_id)
def test_console_block_prints_what_readme_shows(block: Block, tmp_path: Path) -> None:
    copy = repo_copy(tmp_path / "repo")
    (copy / ".venv").symlink_to(VENV)
    command, *expected = block.text.splitlines()
    assert command.startswith("$ "), f"{block}: the first line is the command"
    done = subprocess.run(
        ["bash", "-c", command[2:]], cwd=copy, env=environment(copy),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (done.stdout + done.stderr).splitlines() == expected


def test_until_stopped_blocks_start_and_stop_cleanly(tmp_path: Path) -> None:
    copy = repo_copy(tmp_path / "repo")
    (copy / ".venv").symlink_to(VENV)
    started = [b for b in of_lang("bash") if b.kind == "until-stopped"]
    assert started
    try:
        for block in started:
            ready = re.search(r'ready when it prints "([^"]+)"', block.detail)
            assert ready, f'{block}: say (ready when it prints "...")'
            log = tmp_path / "out.log"
            with log.open("w") as out:
                process = subprocess.Popen(
                    ["bash", "-c", f"exec {block.text.strip()}"], cwd=copy,
                    env=environment(copy), stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            deadline = time.monotonic() + 60
            while ready.group(1) not in log.read_text():  # a process's log: nothing to await
                assert process.poll() is None, f"{block} exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"{block} never got ready:\n{log.read_text()}"
                time.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0, log.read_text()
            assert "Traceback" not in log.read_text()
    finally:
        connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        channel = connection.channel()
        for queue in QueueNames("default.digits-quick").all:
            channel.queue_delete(queue)
        connection.close()


# --- the newcomer's path: a fresh venv, the main job, its results --------------------------


def shape(line: str) -> str:
    """A printed line with its architecture and numbers blanked: what does not vary by run."""
    line = re.sub(r"(cnn|inception)\[\S*\] (gap|mlp\d+) drop\S+ lr\S+", "ARCH", line)
    return " ".join(re.sub(r"\d+(\.\d+)?", "N", line).split())


@pytest.mark.slow
def test_a_newcomer_sets_up_runs_the_main_job_and_reads_the_results(tmp_path: Path) -> None:
    copy = repo_copy(tmp_path / "repo")
    ordered = {b.kind: b for b in of_lang("bash") if b.kind in ("setup", "main", "after-main")}
    assert {b.file for b in ordered.values()} == {"README.md"}, "the newcomer's path is README's"
    run_block(ordered["setup"], copy, timeout=1200)
    assert (copy / ".venv" / "bin" / "mloptimizer").exists()
    main = run_block(ordered["main"], copy, timeout=1200)
    printed = main.stdout
    # what the first search promises: TPE past its start-up trials, a pruned trial, refine
    assert "search ended (maxTrials)" in printed, printed
    startup = yaml.safe_load((copy / "examples" / "digits-quick.yaml").read_text())["spec"][
        "sampler"
    ]["nStartupTrials"]
    assert len(re.findall(r"^trial +\d+ explore ", printed, re.M)) > startup, printed
    assert re.search(r"^trial +\d+ explore .* pruned$", printed, re.M), printed
    assert re.search(r"^trial +\d+ refine ", printed, re.M), printed
    # README's sample output is what it prints: every line's shape, and the start-up trials
    # (the sampler's seed's) word for word
    sample = next(b for b in blocks() if b.lang == "text" and b.line > ordered["main"].line)
    shapes = {shape(line) for line in printed.splitlines()}
    for line in sample.text.splitlines():
        if line != "...":
            assert shape(line) in shapes, f"README's sample line {line!r} is not printed"
        started = re.match(r"trial +(\d+) started \(explore\)", line)
        if started and int(started.group(1)) < startup:
            assert line in printed.splitlines(), line
    out = copy / "runs" / "digits-quick"
    for name in run_folder_files():
        written = (out / name).is_dir() if name.endswith("/") else (out / name).is_file()
        assert written, f"README's run-folder table names {name}; not written"
    # the folder alone rebuilds the report, moved elsewhere too (paths are relative)
    moved = tmp_path / "elsewhere" / "digits-quick"
    moved.parent.mkdir()
    shutil.move(out, moved)
    done = subprocess.run(
        [str(copy / ".venv" / "bin" / "mloptimizer"), "report", str(moved)],
        cwd=tmp_path, env=environment(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "best" in (moved / "report.md").read_text()
    shutil.move(moved, out)
    after = [b for b in of_lang("bash") if b.kind == "after-main"]
    outputs = [run_block(block, copy, timeout=600).stdout for block in after]
    assert any("report: runs/digits-quick/report.md" in o for o in outputs), outputs
    # the export block: every default format written and run
    assert any("tflite-int8" in o for o in outputs), outputs
    exported = json.loads((out / "export" / "export.json").read_text())
    assert [a["format"] for a in exported] == ["keras", "tflite-int8"]
    assert all(a["error"] is None for a in exported), exported


# --- YAML -----------------------------------------------------------------------------


@pytest.mark.parametrize("block", of_lang("yaml"), ids=block_id)
def test_yaml_block_is_a_clean_search_file(block: Block) -> None:
    search = parse_search(yaml.safe_load(block.text), str(block))
    assert space_issues(search.spec) == ([], []), block


# --- tables -----------------------------------------------------------------------------


def section(title: str) -> str:
    """The section under the one heading ``title`` of README.md or docs/*.md."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for start in re.finditer(rf"^#+ {re.escape(title)}\s*$", text, re.M):
            level = len(start.group(0).split()[0])
            end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, start.end())
            found.append(text[start.end() : end.start() if end else len(text)])
    assert len(found) == 1, f"{len(found)} sections {title!r} in README.md and docs/*.md"
    return found[0]


def holding(header: str) -> str:
    """The text of the one document holding a table whose header row starts with ``header``."""
    docs = [d for d in DOCS if any(line.startswith(header) for line in d.read_text().splitlines())]
    assert len(docs) == 1, f"{header!r} is a table of {[name_of(d) for d in docs]}"
    return docs[0].read_text()


def table(text: str, header: str) -> list[list[str]]:
    """Rows of the markdown table whose header row starts with ``header``, cells stripped."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def parser_of(command: str) -> Any:
    commands = next(
        a
        for a in build_parser()._actions
        if isinstance(a, argparse._SubParsersAction)  # the one way argparse offers
    )
    return commands.choices[command]


@pytest.mark.parametrize(("command", "title"), [("operator", "Operator flags"),
                                                 ("trainer", "The trainer")])  # fmt: skip
def test_flag_tables_are_what_help_and_the_parser_say(command: str, title: str) -> None:
    parser = parser_of(command)
    help_text = " ".join(parser.format_help().split())
    actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings[0] != "-h"}
    listed = set()
    for flag_cell, env_cell, default, _ in table(section(title), "| flag | env | default |"):
        env = ticked(env_cell)[0]
        if flag_cell == "—":  # an environment variable with no flag
            assert env in help_text, f"--help of {command} does not mention {env}"
            continue
        flag = ticked(flag_cell)[0]
        listed.add(flag)
        action = actions.get(flag)
        assert action is not None, f"{flag} is in the flags table but not a flag of {command}"
        assert action.env == env, (flag, action.env, env)
        assert action.shown_default == default.strip("`"), (flag, action.shown_default, default)
        assert f"(env {env}; default {action.shown_default})" in help_text, flag
    assert listed == set(actions), f"flags missing from the table: {set(actions) - listed}"


def test_every_flag_of_the_daemons_has_a_variable_in_help() -> None:
    for command in ("operator", "trainer"):
        parser = parser_of(command)
        help_text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.option_strings[0] == "-h":
                continue
            env = getattr(action, "env", None)
            assert env, f"{command} {action.option_strings[0]} has no variable"
            assert env.startswith("MLOPT_"), env
            assert f"(env {env};" in help_text


def test_the_run_flags_table_names_the_flags_of_run() -> None:
    parser = parser_of("run")
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings}
    rows = table(section("Run flags"), "| flag of `mloptimizer run` |")
    listed = {ticked(row[0])[0] for row in rows}
    assert listed == flags - {"-h"}


def run_folder_files() -> list[str]:
    rows = table(section("Read the results"), "| file | what |")
    return [name for row in rows for name in ticked(row[0])]


def test_the_layout_table_names_files_that_exist_and_every_module() -> None:
    rows = table(section("Layout"), "| folder | import name |")
    folders = {ROOT / ticked(row[0])[0] for row in rows}
    for row in rows:
        folder = ROOT / ticked(row[0])[0]
        assert folder.is_dir(), folder
        named = [n for n in ticked(row[2]) if n.endswith(".py")]
        for name in named:
            assert (folder / name).is_file(), f"{folder.name}/{name} is named in Layout"
        if folder.name in ("mloptimizer", "app", "operator", "trainer"):
            packages = [n for n in ticked(row[2]) if re.fullmatch(r"\w+/", n)]
            for name in packages:
                assert (folder / name / "__init__.py").is_file(), f"{folder.name}/{name} in Layout"
            modules = {p.name for p in folder.glob("*.py") if p.name != "__init__.py"}
            modules |= {
                f"{p.parent.name}/"
                for p in folder.glob("*/__init__.py")
                if p.parent not in folders  # a package with a row of its own
            }
            listed = set(named) | set(packages)
            assert modules <= listed, f"not in Layout: {sorted(modules - listed)}"


def _value(values: dict[str, Any], dotted: str) -> Any:
    node: Any = values
    for key in dotted.split("."):
        assert isinstance(node, dict), f"values.yaml has no {dotted}"
        assert key in node, f"values.yaml has no {dotted}"
        node = node[key]
    return node


def test_the_chart_values_table_is_values_yaml() -> None:
    values = yaml.safe_load((ROOT / "charts" / "mloptimizer" / "values.yaml").read_text())
    appversion = yaml.safe_load((ROOT / "charts" / "mloptimizer" / "Chart.yaml").read_text())
    rows = table(section("Chart values"), "| value | default |")
    assert len(rows) >= 10
    for value_cell, default_cell, _ in rows:
        keys = ticked(value_cell)
        defaults = [d.strip() for d in default_cell.split(", ")]
        assert len(defaults) == len(keys), value_cell
        for key, default in zip(keys, defaults, strict=True):
            actual = _value(values, key)
            if default == "appVersion":
                assert actual == "", key  # empty tag: the chart's appVersion
                assert appversion["appVersion"]
                continue
            shown = yaml.safe_load(default) if default not in ("", '""') else ""
            assert actual == shown, (key, actual, default)


def test_the_spec_reference_covers_every_field_of_the_crd() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "architecturesearch.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rows = table(section("Spec reference"), "| field | meaning |")
    text = "\n".join(" | ".join(row) for row in rows)
    for name, field in spec["properties"].items():
        assert f"`{name}." in text, f"spec.{name} is not in the spec reference"
        for sub in field.get("properties", {}):
            assert re.search(rf"`{name}\.{sub}`|\b{sub}\b", text), f"spec.{name}.{sub}"


def test_the_live_and_fixed_fields_are_those_of_the_rule() -> None:
    rows = re.findall(r"^\| `spec\.(\w+)` \| (fixed|live) \|", holding("| field | while"), re.M)
    assert {name for name, kind in rows if kind == "fixed"} == set(FIXED)
    assert {name for name, kind in rows if kind == "live"} == set(LIVE)


@pytest.mark.parametrize("doc", DOCS, ids=name_of)
def test_files_named_exist(doc: Path) -> None:
    text = doc.read_text()
    for path in set(re.findall(r"`((?:examples|bench|scripts|docs|crds|charts)/[\w./-]+)`", text)):
        assert (ROOT / path).exists(), f"{name_of(doc)} names {path}"


# --- links, tests named, benchmarks ------------------------------------------------------


def prose(text: str) -> str:
    """``text`` without its fenced blocks (a link or heading there is code)."""
    return re.sub(r"^```.*?^```$", "", text, flags=re.M | re.S)


def anchors(doc: Path) -> set[str]:
    """GitHub's anchors of ``doc``'s headings: lowercased, punctuation dropped, spaces to -."""
    found: set[str] = set()
    for heading in re.findall(r"^#+ (.+?)\s*$", prose(doc.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in found:
            n += 1
            anchor = f"{slug}-{n}"
        found.add(anchor)
    return found


def test_anchors_follow_github() -> None:
    page = ROOT / "README.md"
    assert {"1-images", "set-up", "change-a-running-search"} <= anchors(page)
    assert "mloptimizer-run-in-detail" in anchors(ROOT / "docs" / "reference.md")


@pytest.mark.parametrize("doc", DOCS, ids=name_of)
def test_links_and_anchors_resolve(doc: Path) -> None:
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(doc.read_text()))
    assert targets or doc != README, "README links to its documents"
    for target in targets:
        if re.match(r"\w+://", target):
            continue  # the web: not fetched here
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.exists(), f"{name_of(doc)} links to {target}: no such file"
        if anchor:
            assert linked.suffix == ".md", f"{name_of(doc)} links to {target}"
            assert anchor in anchors(linked), f"{name_of(doc)} links to {target}: no such heading"


@pytest.mark.parametrize("doc", DOCS, ids=name_of)
def test_tests_named_exist(doc: Path) -> None:
    for path, name in set(re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", doc.read_text())):
        assert (ROOT / path).is_file(), f"{name_of(doc)} names {path}"
        if name:
            source = (ROOT / path).read_text()
            assert re.search(rf"^(async )?def {name}\(", source, re.M), f"{path}::{name}"


def test_every_benchmark_row_names_its_own_script_and_a_line_it_prints() -> None:
    header = "| what | ours | baseline | ratio | target | command | its line |"
    rows = table(holding(header), header)
    assert len(rows) >= 10
    named = set()
    for row in rows:
        what, command, line = row[0], row[5], row[6]
        scripts = set(re.findall(r"bench/\w+\.py", command))
        assert len(scripts) == 1, f"{what[:40]}: name the one script of its figures, not {command}"
        script = ROOT / scripts.pop()
        assert script.is_file(), script
        named.add(script.name)
        printed = ticked(line)
        assert len(printed) == 1, f"{what[:40]}: its line, in backticks"
        assert printed[0] in script.read_text(), f"{script.name} prints no {printed[0]!r}"
    scripts = {p.name for p in (ROOT / "bench").glob("*.py")}
    assert scripts <= named, f"benchmarks with no row: {sorted(scripts - named)}"
