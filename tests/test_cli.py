from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import typer.main as typer_main
from typer.testing import CliRunner

from pneumotriage import __version__
from pneumotriage.cli import app

runner = CliRunner()


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"pneumotriage {__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("inspect", "synth", "demo"):
        assert command in result.stdout


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "pneumotriage", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and __version__ in done.stdout


def test_the_console_script_ends_at_once_when_its_command_is_done() -> None:
    """main() ends the process as soon as its command is done, with the command's exit code: threads still running
    are waited for, at-exit handlers run and buffered output is flushed, as at any exit; the interpreter's teardown
    (freeing each object: ~0.16 s after a scan, torch unregistering its operators) is skipped. What lives was frozen
    first, so that an exit that does tear down (``python -i``) does not walk it either."""
    code = (
        "import atexit, gc, os, sys, threading, time\n"
        "from pneumotriage.cli import main\n"
        "def torn_down(event, args, write=os.write):  # the interpreter's teardown says so to audit hooks\n"
        "    if event == 'cpython.PyInterpreterState_Clear':\n"
        "        write(1, b'torn down\\n')\n"
        "sys.addaudithook(torn_down)\n"
        "atexit.register(lambda: print('at exit', gc.get_freeze_count() > 1000))\n"
        "def late():\n"
        "    time.sleep(0.5)\n"
        "    print('thread done')\n"
        "threading.Thread(target=late).start()\n"
        "sys.stdout.write('x' * 100_000 + '\\n')\n"
        "sys.argv = ['pneumotriage'] + sys.argv[1:]\n"
        "main()\n"
    )
    for args, status in ((["--version"], 0), (["scan", "--nonsense"], 2)):
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == status, (args, done.stdout, done.stderr)
        lines = done.stdout.splitlines()
        assert lines[0] == "x" * 100_000
        assert lines[-2:] == ["thread done", "at exit True"], (args, lines[1:])
        assert "torn down" not in done.stdout
    # An ordinary exit is torn down (what the check above would miss if the hook never printed).
    plain = code.replace("main()\n", "raise SystemExit(0)\n")
    done = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "torn down" in done.stdout, done.stdout


def test_help_and_inspect_start_without_torch() -> None:
    """Commands that run no model (help, inspect, weights list) start without importing torch (~1.7 s of a
    2-core machine's start): nothing on the command line's import path imports it at module level."""
    code = (
        "import sys\n"
        "from pneumotriage.cli import app\n"
        "for args in (['--help'], ['scan', '--help'], ['inspect', '--help']):\n"
        "    app(args, standalone_mode=False)\n"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_inspect_json_and_exit_codes(study) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(app, ["inspect", "--json", str(study.out)])
    assert result.exit_code == 4  # manifest.json and the two CSVs are not DICOM
    rows = json.loads(result.stdout)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 12 and {r["image_id"] for r in ok} == {im.image_id for im in study.images}
    assert all(r["rows"] == 128 and r["transfer_syntax"] == "1.2.840.10008.1.2.4.50" for r in ok)
    skipped = {Path(r["path"]).name: r["reason"] for r in rows if r["status"] == "skip"}
    assert skipped == dict.fromkeys(("manifest.json", "sample_submission.csv", "train-rle.csv"), "not a DICOM file")
    one = study.out / study.images[0].path
    result = runner.invoke(app, ["inspect", "--decode", str(one)])
    assert result.exit_code == 0 and "ok" in result.stdout


def test_inspect_reports_damaged_pixels_with_decode(study, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = (study.out / study.images[1].path).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(src[: len(src) * 2 // 3])
    assert runner.invoke(app, ["inspect", "--json", str(cut)]).exit_code == 0  # the header alone looks fine
    result = runner.invoke(app, ["inspect", "--json", "--decode", str(cut)])
    assert result.exit_code == 4
    assert json.loads(result.stdout)[0]["status"] == "skip"


def test_missing_path_is_one_line_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "nope: no such file or folder" in result.output


def test_a_missing_label_file_is_a_usage_error_like_a_missing_folder(study, models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for command in (["evaluate", str(study.out)], ["tune", str(study.out)]):
        args = [*command, "--labels", str(tmp_path / "nope.csv"), "--classifier", str(models["classifier"])]
        result = runner.invoke(app, [*args, "--segmenter", str(models["segmenter"]), "--out", str(tmp_path / "o")])
        assert result.exit_code == 2, result.output
        assert "nope.csv: cannot be read" in result.output and "Traceback" not in result.output


def test_an_empty_scan_leaves_no_folders_behind_and_keeps_what_was_there(models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image\n")
    for out, existed in ((tmp_path / "new", False), (tmp_path / "old", True)):
        if existed:
            (out / "masks").mkdir(parents=True)
        args = ["scan", str(tmp_path / "empty"), "--out", str(out), "--classifier", str(models["classifier"])]
        result = runner.invoke(app, [*args, "--no-progress"])
        assert result.exit_code == 2 and "no DICOM files found" in result.output, result.output
        if existed:
            assert sorted(p.name for p in out.iterdir()) == ["masks"]
        else:
            assert not out.exists()


def test_train_on_a_folder_without_dicoms_says_so_before_any_download(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "labels.csv").write_text("ImageId,EncodedPixels\na,-1\n")
    args = ["train", "classifier", str(tmp_path / "empty"), "--labels", str(tmp_path / "labels.csv")]
    env = {"PNEUMOTRIAGE_HOME": str(tmp_path / "home"), "PNEUMOTRIAGE_OFFLINE": ""}
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "run")], env=env)
    assert result.exit_code == 2, result.output
    assert "empty: no DICOM files found" in result.output and "ImageNet" not in result.output
    assert not (tmp_path / "home" / "weights").exists()  # nothing was fetched


def test_synth_command_and_bad_option(tmp_path: Path) -> None:
    result = runner.invoke(app, ["synth", str(tmp_path / "s"), "--n", "3", "--size", "64", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "s").rglob("*.dcm"))) == 3
    assert (tmp_path / "s" / "train-rle.csv").is_file()
    result = runner.invoke(app, ["synth", str(tmp_path / "t"), "--size", "big"])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output


def _console(*args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    """The console entry point as a user runs it, in a terminal ``columns`` wide."""
    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pneumotriage", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_tables_fit_80_columns_and_ids_are_never_cut_across_lines(study) -> None:  # type: ignore[no-untyped-def]
    """inspect and weights list at 80 columns: no line is longer, an image id is shown as its last 12 characters
    on one line (the full id stays in --json), and a word like "classifier" is never split."""
    done = _console("inspect", str(study.out))
    assert done.returncode == 4  # the label CSV and manifest beside the images are not DICOM
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for image in study.images:
        assert any(line.startswith("…" + image.image_id[-12:]) for line in lines), image.image_id
    full = json.loads(_console("inspect", str(study.out), "--json").stdout)
    assert {r["image_id"] for r in full if "image_id" in r} == {i.image_id for i in study.images}
    listed = _console("weights", "list")
    assert listed.returncode == 0 and max(len(line) for line in listed.stdout.splitlines()) <= 80
    assert any(" classifier " in line for line in listed.stdout.splitlines())
    for done in (_console("inspect", str(study.out)), listed):  # and no line padded with spaces
        assert all(line == line.rstrip() for line in done.stdout.splitlines())


def test_the_console_worklist_says_why_in_80_columns(scan_input: Path, models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The scan's table at 80 columns: each row's reason (an unreadable file's too, in words), no line longer, none
    padded with spaces."""
    args = ["scan", str(scan_input), "--out", str(tmp_path / "o"), "--classifier", str(models["classifier"])]
    done = _console(*args, "--segmenter", str(models["segmenter"]), "--workers", "0", "--no-progress")
    assert done.returncode == 4, done.stderr  # the broken file
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and all(line == line.rstrip() for line in lines)
    assert ["rank", "tier", "probability", "image", "why"] in [line.split() for line in lines]
    broken = [i for i, line in enumerate(lines) if " broken " in f"{line} "]
    assert broken and "unreadable:" in lines[broken[0]], done.stdout
    assert any("classifier 0." in line for line in lines), done.stdout


def test_one_flag_per_no_option_required_options_and_one_error_prefix(tmp_path: Path) -> None:
    """--no-segment, --no-phi and --no-cache are single flags (no --no-no-… twin); required options say so in
    --help; the parser's own errors read like every other error: one line starting "error:", exit 2."""
    scan_help = _console("scan", "--help", columns=200).stdout
    tune_help = _console("tune", "--help", columns=200).stdout
    assert "--no-segment" in scan_help and "--no-phi" in scan_help and "--no-cache" in tune_help
    assert "--no-no-" not in scan_help + tune_help
    assert tune_help.count("[required]") == 3  # DATA, --labels, --segmenter
    for args, text in (
        (["scan", "--bogus"], "error: No such option: --bogus"),
        (["tune", str(tmp_path)], "error: Missing option '--labels'"),
        (["evaluate", str(tmp_path)], "error: Missing option '--labels'"),
    ):
        done = _console(*args)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith(text), done.stderr


def test_a_bare_command_group_shows_its_help_and_no_empty_error() -> None:
    for args in ((), ("weights",), ("train",)):
        done = _console(*args)
        assert "Usage: " in done.stdout + done.stderr and "Commands" in done.stdout + done.stderr, args
        assert "error:" not in done.stderr, (args, done.stderr)


_COMMANDS = (
    "inspect", "synth", "scan", "merge", "submit", "convert", "evaluate", "tune", "demo", "weights list",
    "weights fetch", "weights verify", "weights import", "weights path", "train classifier", "train segmenter",
)  # fmt: skip


def test_every_help_fits_80_columns_with_whole_option_names_and_plain_metavars() -> None:
    """At 80 columns: no line is longer, every option's name is whole on its line (followed by a plain metavar
    such as PATH or FLOAT, never a Python type like <list[Path]> or <bool>), and descriptions are wrapped by the
    formatter, not cut into a narrow column."""
    import re

    from pneumotriage.cli.help import PlainCommand

    command = typer_main.get_command(app)
    for name in _COMMANDS:
        words = name.split()
        done = _console(*words, "--help")
        assert done.returncode == 0, (name, done.stderr)
        text = done.stdout
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= 80, name
        assert not re.search(r"<(list|bool|str|int|float|path)", text, re.IGNORECASE), (name, text)
        assert "{" not in lines[0] and "[[" not in lines[0], lines[0]  # the usage line: PATHS..., [DATA]
        sub = command
        for word in words:
            sub = sub.commands[word]  # type: ignore[attr-defined]
        assert isinstance(sub, PlainCommand), name
        for param in sub.params:
            for opt in getattr(param, "opts", []) if param.param_type_name == "option" else []:
                shown = [line for line in lines if re.match(rf"\s+(\S+ / |\S+, )?{re.escape(opt)}(\s|,|$)", line)]
                assert shown, (name, opt)  # whole, on a line of its own
        # No description is squeezed into a narrow column: wrapped lines of text use most of the width.
        described = [line for line in lines if line.startswith(" " * 34) and line.strip()]
        assert not described or max(len(line) for line in described) >= 70, (name, described)
    submit = _console("submit", "--help").stdout
    assert "--sample-submission PATH" in submit and "[required]" in submit
    assert _console("scan", "--help").stdout.count("\n") < 100


def test_exit_codes_have_one_definition_that_readme_lists() -> None:
    """README's list of exit codes is :data:`EXIT_MEANINGS`, and no command exits with a bare number."""
    import ast
    import re

    from pneumotriage.errors import EXIT_MEANINGS, ExitCode

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    section = readme.split("Exit codes:\n", 1)[1].lstrip("\n").split("\n\n", 1)[0]
    listed = dict(re.findall(r"^- (\d+) (.+)$", section, flags=re.MULTILINE))
    assert listed == {str(int(code)): meaning for code, meaning in EXIT_MEANINGS.items()}
    assert set(EXIT_MEANINGS) == set(ExitCode)
    bare = []
    for path in (repo / "pneumotriage").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            exiting = isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "Exit",
                "SystemExit",
            )
            if exiting and node.args and isinstance(node.args[0], ast.Constant):  # type: ignore[attr-defined]
                bare.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "exit_code" for t in node.targets):
                if isinstance(node.value, ast.Constant):
                    bare.append(f"{path.name}:{node.lineno}")
    assert not bare, f"exit codes written as numbers, not ExitCode: {bare}"
