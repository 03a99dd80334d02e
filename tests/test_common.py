"""The foundation shared by every mode: tag specs, discovery, runtime, logs, exit status."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dicom_sar
from conftest import (
    FREE_THREADED_BUILD,
    TOOL,
    dcmdump,
    instances,
    need,
    property_settings,
    readability_cases,
    run_tool,
)
from dicom_sar import Step, UsageError, parse_tag_specs

PID, PNAME = 0x00100020, 0x00100010


@pytest.mark.parametrize("text", ["10,20", "(10,20)", "(0010, 0020)", "0010,0020", "00100020",
                                  "PatientID", " ( 0010 ,0020 ) ", "(0010,0020)"])
def test_lazy_forms_name_patient_id(text: str) -> None:
    specs = parse_tag_specs(text)
    assert [s.steps for s in specs] == [(Step(PID),)]


@pytest.mark.parametrize("text", ["(0010, 0020), (0010,0010)", "PatientID,PatientName",
                                  "10,20, 10,10", "PatientID, (0010,0010)"])
def test_several_tags_at_once(text: str) -> None:
    assert [s.leaf.tag for s in parse_tag_specs(text)] == [PID, PNAME]


def test_sequence_paths() -> None:
    (spec,) = parse_tag_specs("(0008,1110)[0].(0008,1155)")
    assert spec.steps == (Step(0x00081110, item=0), Step(0x00081155))
    (spec,) = parse_tag_specs("ReferencedStudySequence[*].ReferencedSOPInstanceUID")
    assert spec.steps == (Step(0x00081110, item=None), Step(0x00081155))
    assert spec.label() == "(0008,1110)[*].(0008,1155)"


@pytest.mark.parametrize("text", ['(0029,"SIEMENS CSA HEADER",10)',
                                  '0029,"SIEMENS CSA HEADER",10'])
def test_private_tag_by_creator(text: str) -> None:
    (spec,) = parse_tag_specs(text)
    assert spec.leaf == Step(0x00290010, creator="SIEMENS CSA HEADER")


def test_private_tag_resolves_to_the_creator_block() -> None:
    ds = pydicom.Dataset()
    ds.private_block(0x0029, "OTHER", create=True).add_new(0x10, "LO", "x")
    ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True).add_new(0x10, "LO", "y")
    (spec,) = parse_tag_specs('(0029,"SIEMENS CSA HEADER",10)')
    assert [(t, ds[t].value) for _, t in dicom_sar.find_elements(ds, spec, deep=False)] == [
        (0x00291110, "y")]


@pytest.mark.parametrize(("text", "needle"), [
    ("PatientId", "did you mean PatientID?"), ("PatientNmae", "did you mean PatientName?"),
    ("(0010,", "cannot read"), ("10,20 junk", "cannot read"), ("(0010,0020)[0]", "item index"),
    ('(0010,"X",10)', "odd group"), ("", "empty")])
def test_bad_specs_are_usage_errors(text: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle.replace("?", r"\?").replace("(", r"\(")):
        parse_tag_specs(text)


def test_unknown_keyword_exits_2_with_one_line(tmp_path: Path) -> None:
    run = run_tool("--dump", "--tag", "PatientId", "--path", tmp_path, cwd=tmp_path)
    assert run.code == 2
    assert "did you mean PatientID?" in run.err
    assert len(run.err.strip().splitlines()) == 1


# ── discovery ───────────────────────────────────────────────────────────────────────────


@pytest.fixture
def mixed_tree(tmp_path: Path, generated: Path, manifest: dict) -> Path:
    """Extension-less DICOM, a no-preamble dataset, text, nested dirs, a symlink loop."""
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    mg = instances(manifest, scenario="default")
    shutil.copy(generated / mg[0]["path"], tree / "1.2.3.4")
    shutil.copy(generated / mg[1]["path"], tree / "a" / "b" / "1.2.3.5")
    shutil.copy(generated / instances(manifest, scenario="no_preamble")[0]["path"],
                tree / "a" / "bare")
    (tree / "a" / "notes").write_text("not dicom at all\n")
    (tree / "a" / "loop").symlink_to(tree, target_is_directory=True)
    return tree


def summary_of(run, tmp_path: Path) -> dict:
    return json.loads((tmp_path / "summary.json").read_text())


def test_discovery_by_content(mixed_tree: Path, tmp_path: Path) -> None:
    run = run_tool("--dump", "--tag", "PatientID", "--with-filename", "--path", mixed_tree,
                   "--summary-json", tmp_path / "summary.json", "--log-dir", tmp_path / "logs",
                   cwd=tmp_path)
    assert run.code == 0, run.err
    files = [line.split(":")[0] for line in run.out.splitlines()]
    assert files == [str(mixed_tree / "1.2.3.4"), str(mixed_tree / "a" / "b" / "1.2.3.5"),
                     str(mixed_tree / "a" / "bare")]  # sorted walk order, loop not followed
    s = summary_of(run, tmp_path)
    assert (s["dicom_files"], s["skipped_not_dicom"], s["errors"]) == (3, 1, 0)


def test_walk_hands_workers_the_path_it_found(mixed_tree: Path) -> None:
    opts = dicom_sar.options_from_args(dicom_sar.build_parser().parse_args(
        ["--dump", "--path", str(mixed_tree)]))
    cands = list(dicom_sar.discover(opts, []))
    plain = [c for c in cands if c.problem is None]
    assert len(plain) == 4  # three DICOM files and the notes; the loop is not followed
    for cand in plain:
        assert cand.found_as and cand.file == cand.found_as == str(cand.path)


def test_follow_symlinks_detects_the_loop(mixed_tree: Path, tmp_path: Path) -> None:
    run = run_tool("--dump", "--tag", "PatientID", "--follow-symlinks", "--path", mixed_tree,
                   "--summary-json", tmp_path / "summary.json", cwd=tmp_path, timeout=60)
    assert run.code == 0, run.err
    assert summary_of(run, tmp_path)["dicom_files"] == 3
    assert "symlink loop" in run.log()


@pytest.mark.parametrize("follow", [[], ["--follow-symlinks"]])
def test_fifos_sockets_and_devices_are_skipped_not_opened(mixed_tree: Path, tmp_path: Path,
                                                          follow: list[str]) -> None:
    """Opening a FIFO waits for a writer: the walk must not hand one to a worker (the run
    would hang until the time limit). A named one is an error, a walked one a skip."""
    import socket

    (mixed_tree / "a" / "loop").unlink()
    os.mkfifo(mixed_tree / "a" / "fifo")
    (mixed_tree / "a" / "fifo-link").symlink_to(mixed_tree / "a" / "fifo")
    (mixed_tree / "null").symlink_to("/dev/null")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(mixed_tree / "sock"))
        run = run_tool("--dump", "--tag", "PatientID", "--path", mixed_tree, *follow,
                       "--summary-json", tmp_path / "summary.json", cwd=tmp_path, timeout=60)
        assert run.code == 0, run.err
        s = summary_of(run, tmp_path)
        assert (s["dicom_files"], s["errors"]) == (3, 0)
        # the FIFO and the socket; the two symlinks too (as symlinks, or as what they lead to)
        assert s["skipped_other"] == 4
        assert run.log().count("not a regular file") == (4 if follow else 2)
        named = run_tool("--dump", "--path", mixed_tree / "a" / "fifo", cwd=tmp_path,
                         timeout=60)
        assert named.code == 1
        assert "not a regular file" in named.log("errors.log")


def test_unreadable_entry_is_an_error_for_that_entry_only(mixed_tree: Path,
                                                          tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root reads mode-000 files; a dangling link is unreadable for all
        (mixed_tree / "gone").symlink_to(mixed_tree / "does-not-exist")
        extra = ["--follow-symlinks"]
    else:
        (mixed_tree / "gone").write_bytes(b"x")
        (mixed_tree / "gone").chmod(0)
        extra = []
    (mixed_tree / "a" / "loop").unlink()
    run = run_tool("--dump", "--tag", "PatientID", "--path", mixed_tree, *extra,
                   "--summary-json", tmp_path / "summary.json", cwd=tmp_path)
    assert run.code == 1
    s = summary_of(run, tmp_path)
    assert (s["dicom_files"], s["errors"]) == (3, 1)
    errors = (tmp_path / "errors.log").read_text().splitlines()
    assert len(errors) == 1 and "gone" in errors[0]


def test_glob_narrows_names(mixed_tree: Path, tmp_path: Path) -> None:
    run = run_tool("--dump", "--tag", "PatientID", "--glob", "1.2.3.*", "--with-filename",
                   "--path", mixed_tree, cwd=tmp_path)
    assert {line.split(":")[0].rsplit("/", 1)[1] for line in run.out.splitlines()} == {
        "1.2.3.4", "1.2.3.5"}


def test_own_output_and_logs_are_not_scanned(mixed_tree: Path) -> None:
    (mixed_tree / "a" / "loop").unlink()
    args = ["--sar", "--tag", "PatientID", "--regex_search", "^", "--regex_replace", "Z",
            "--path", ".", "--summary-json", "s.json"]
    first = run_tool(*args, cwd=mixed_tree)
    assert first.code == 0, first.err
    second = run_tool(*args, cwd=mixed_tree)
    s1 = json.loads((mixed_tree / "s.json").read_text())
    assert second.code == 0
    assert (mixed_tree / "dicom_sar_output" / "1.2.3.4").exists()
    assert s1["dicom_files"] == 3 and s1["skipped_not_dicom"] == 1  # only 'notes'


def test_leftover_temporary_files_are_never_input(mixed_tree: Path, tmp_path: Path) -> None:
    shutil.copy(mixed_tree / "1.2.3.4", mixed_tree / (dicom_sar.TEMP_PREFIX + "abc"))
    run = run_tool("--dump", "--tag", "PatientID", "--with-filename", "--path", mixed_tree,
                   cwd=tmp_path)
    assert dicom_sar.TEMP_PREFIX not in run.out
    assert "leftover temporary file" in run.log()


# ── runtime, output order, logs, exit status ────────────────────────────────────────────


def test_workers_1_and_4_give_identical_output(generated: Path, tmp_path: Path) -> None:
    outs = [run_tool("--dump", "--tag", "PatientID,StudyInstanceUID,ImageType",
                     "--with-filename", "-j", n, "--path", generated, cwd=tmp_path).out
            for n in ("1", "4")]
    assert outs[0] == outs[1]
    assert outs[0].count("\n") > 400


def test_free_threaded_mode_is_reported(generated: Path, tmp_path: Path) -> None:
    run = run_tool("--dump", "--tag", "Modality", "-j", "2", "--path", generated,
                   "--summary-json", tmp_path / "summary.json", cwd=tmp_path)
    s = summary_of(run, tmp_path)
    assert s["free_threaded"] is FREE_THREADED_BUILD  # GIL still off at the end of the run
    assert f"free-threaded: {'yes' if FREE_THREADED_BUILD else 'no'}" in run.log()
    assert ("GIL enabled" in run.err) is not FREE_THREADED_BUILD


@pytest.mark.skipif(not FREE_THREADED_BUILD, reason="a GIL build has no GIL to keep off")
def test_gil_disabled_after_imports() -> None:
    """No import (pydicom, pynetdicom, tqdm) turned the GIL back on under 3.13t."""
    assert not sys._is_gil_enabled()
    assert dicom_sar.gil_disabled()


@pytest.mark.parametrize(("before", "after"), [("", "True"), ("gc.disable(); ", "False")])
def test_the_collector_is_off_only_while_importing(before: str, after: str) -> None:
    """Importing the module leaves the cyclic GC as it found it."""
    code = f"import gc; {before}import dicom_sar; print(gc.isenabled())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(dicom_sar.__file__).parent, check=True)
    assert proc.stdout.strip() == after


def test_default_workers_leave_four_cpus() -> None:
    assert dicom_sar.default_workers() == max(1, len(os.sched_getaffinity(0)) - 4)


def test_exit_statuses(mixed_tree: Path, tmp_path: Path) -> None:
    (mixed_tree / "a" / "loop").unlink()
    assert run_tool("--dump", "--path", mixed_tree, cwd=tmp_path).code == 0
    assert run_tool("--dump", "--path", tmp_path / "missing", cwd=tmp_path).code == 2
    assert run_tool("--sar", "--regex_search", "x", "--regex_replace", "y", "--path",
                    mixed_tree, cwd=tmp_path).code == 2  # no --tag and no --force
    truncated = mixed_tree / "cut"
    truncated.write_bytes((mixed_tree / "1.2.3.4").read_bytes()[:300])
    assert run_tool("--dump", "--path", mixed_tree, cwd=tmp_path).code == 1


def test_logs_name_files_not_values(generated: Path, manifest: dict, tmp_path: Path) -> None:
    entry = instances(manifest, scenario="default")[0]
    source = tmp_path / "in" / "1.2.840.99"  # the generated tree's paths contain PatientIDs
    source.parent.mkdir()
    shutil.copy(generated / entry["path"], source)
    run = run_tool("--sar", "--tag", "PatientID,PatientName", "--regex_search", "^(.*)$",
                   "--regex_replace", r"GENHOSP\1", "--path", source.parent,
                   "--output", tmp_path / "out", cwd=tmp_path)
    assert run.code == 0, run.err
    text = run.log() + run.log("errors.log")
    assert "1.2.840.99" in text and "PatientID" in text
    assert entry["patient_id"] not in text and entry["patient_name"] not in text
    assert oct((tmp_path / "dicom_sar.log").stat().st_mode & 0o777) == "0o600"


def test_a_name_that_is_not_utf8_is_logged_as_its_own_bytes(generated: Path, manifest: dict,
                                                            tmp_path: Path) -> None:
    """A Latin-1 file name (an old share's) is neither dropped from the logs with a
    'Logging error' traceback nor mangled: the line names the file byte for byte."""
    tree = tmp_path / "in"
    tree.mkdir()
    good, bad = os.fsdecode(b"M\xdcLLER-1"), os.fsdecode(b"M\xdcLLER-2")
    shutil.copy(generated / instances(manifest, scenario="default")[0]["path"], tree / good)
    (tree / bad).write_bytes((tree / good).read_bytes()[:300])  # truncated: an error
    run = run_tool("--sar", "--tag", "PatientID", "--regex_search", "^(.*)$", "--regex_replace",
                   r"GENHOSP\1", "--path", tree, "--output", tmp_path / "out", cwd=tmp_path)
    assert run.code == 1
    assert "Logging error" not in run.err
    assert b"modified: " + os.fsencode(tree / good) in (tmp_path / "dicom_sar.log").read_bytes()
    assert os.fsencode(tree / bad) + b": " in (tmp_path / "errors.log").read_bytes()


def test_version_names_every_component(tmp_path: Path) -> None:
    out = run_tool("--version", cwd=tmp_path).out
    for word in ("dicom_sar", "Python", "free-threaded", "pydicom", "pynetdicom", "tqdm"):
        assert word in out


# ── the shell: completions and colour ───────────────────────────────────────────────────


@pytest.fixture(scope="module")
def fish_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fish")
    script = base / "dicom_sar.fish"
    script.write_text(run_tool("--completions", "fish", cwd=base).out)
    (base / "subdir_a").mkdir()
    return script


def complete(script: Path, line: str) -> list[str]:
    fish = need("fish")
    proc = subprocess.run([fish, "-c", f"source {script}; complete --do-complete {line!r}"],
                          capture_output=True, text=True, cwd=script.parent, check=True)
    return [row.split("\t")[0] for row in proc.stdout.splitlines()]


@pytest.mark.parametrize(("line", "expected"), [
    ("./dicom_sar.py --", {"--dump", "--sar", "--generate", "--send", "--echo"}),
    ("python dicom_sar.py --d", {"--dump"}),
    ("venv/bin/python dicom_sar.py --sar --inpl", {"--inplace"}),
    ("./dicom_sar.py --dump --tag PatientNa", {"PatientName"}),
    ("./dicom_sar.py --generate --scenario cu_bits", {"cu_bits_mismatch"}),
    ("./dicom_sar.py --dump --path sub", {"subdir_a/"}),
    ("./dicom_sar.py --send -", {"-H", "-p", "-a", "-c", "-t"}),
])
def test_fish_completions(fish_script: Path, line: str, expected: set[str]) -> None:
    assert expected <= set(complete(fish_script, line))


def test_fish_offers_mode_flags_first_and_nothing_for_other_scripts(fish_script: Path) -> None:
    first = set(complete(fish_script, "./dicom_sar.py --"))
    assert "--inplace" not in first and "--tag" not in first
    assert not {"--dump", "--sar"} & set(complete(fish_script, "python other.py --"))


def test_bash_and_zsh_scripts(tmp_path: Path) -> None:
    bash = run_tool("--completions", "bash", cwd=tmp_path).out
    (tmp_path / "c.bash").write_text(bash)
    subprocess.run(["bash", "-n", str(tmp_path / "c.bash")], check=True)
    assert "--regex_search" in bash
    assert run_tool("--completions", "zsh", cwd=tmp_path).out.startswith("#compdef")


@pytest.mark.parametrize(("no_color", "coloured"), [("", True), ("1", False)])
def test_colour_only_on_a_terminal_without_no_color(no_color: str, coloured: bool,
                                                    tmp_path: Path) -> None:
    import pty
    master, slave = pty.openpty()
    env = {**os.environ, "NO_COLOR": no_color} if no_color else \
        {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    proc = subprocess.run([sys.executable, str(dicom_sar.__file__), "--dump", "--tag",
                           "Nonsense"], stderr=slave, stdout=subprocess.DEVNULL, env=env,
                          cwd=tmp_path)
    os.close(slave)
    err = os.read(master, 65536).decode()
    os.close(master)
    assert proc.returncode == 2
    assert ("\x1b[31m" in err) is coloured
    piped = run_tool("--dump", "--tag", "Nonsense", cwd=tmp_path)
    assert "\x1b[" not in piped.err  # never when stderr is not a terminal


def test_time_limit_gives_up_on_a_stuck_file_and_commits_nothing_for_it(tmp_path: Path) -> None:
    """The engine: a file past the limit is an error in its place; later files still run."""
    release = dicom_sar.threading.Event()
    names = [f"f{i:02d}" for i in range(40)]

    stuck: list[dicom_sar.threading.Thread] = []

    def task(cand: dicom_sar.Candidate) -> dicom_sar.FileResult:
        if cand.path.name == "f05":
            stuck.append(dicom_sar.threading.current_thread())
            release.wait(60)  # stuck (sleeping releases the GIL, so both builds can test this)
            dicom_sar.write_bytes_atomic(b"late", tmp_path / "f05.out", fsync=False)
        return dicom_sar.FileResult(cand.path, "ok")

    t0 = time.monotonic()
    try:
        cands = (dicom_sar.Candidate(tmp_path / n, tmp_path) for n in names)
        results = list(dicom_sar.run_ordered(cands, task, 2, dicom_sar.threading.Event(),
                                             time_limit=0.5, batch=4))
        assert time.monotonic() - t0 < 30  # the pool did not wait for the stuck thread (60 s)
    finally:
        release.set()  # the abandoned worker wakes up and must not commit its write
    assert [r.path.name for r in results] == names
    assert [r.path.name for r in results if r.status == "error"] == ["f05"]
    assert results[5].error_type == "TimeLimit" and "left as it was" in results[5].message
    stuck[0].join(30)  # the abandoned worker has tried its late write
    assert not stuck[0].is_alive()
    assert not (tmp_path / "f05.out").exists()
    assert not list(tmp_path.glob(".dicom_sar-tmp-*"))


@pytest.mark.parametrize("ahead", [0, 256])
def test_the_walk_runs_ahead_by_a_few_batches_per_worker_plus_a_commit_batch(
        tmp_path: Path, ahead: int) -> None:
    """Backpressure: when the first result comes out, the walk has been read only as far as
    the batches in flight; a writing mode (ahead(): its commit batch) keeps more of them,
    so that the workers go on while the main thread commits."""
    pulled = 0

    def walk() -> Iterator[dicom_sar.Candidate]:
        nonlocal pulled
        for i in range(2000):
            pulled += 1
            yield dicom_sar.Candidate(tmp_path / f"f{i:04d}", tmp_path)

    results = dicom_sar.run_ordered(walk(), lambda c: dicom_sar.FileResult(c.path, "ok"), 2,
                                    dicom_sar.threading.Event(), batch=16,
                                    ahead=lambda: ahead)
    first = next(results)
    assert first.path.name == "f0000"
    assert pulled == (2 * 3 + ahead // 16) * 16
    assert [r.path.name for r in [first, *results]] == [f"f{i:04d}" for i in range(2000)]


@pytest.mark.parametrize(("size", "files"), [(0, 0), (525_000, 256), (100 << 20, 2)])
def test_a_commit_batch_holds_as_many_files_as_the_mean_size_allows(
        tmp_path: Path, size: int, files: int) -> None:
    """What the workers may stage ahead: a batch's 256 files, or fewer where 256 MB fills
    first (100 MB files: two), nothing before the first file is known."""
    committer = dicom_sar.Committer(fsync=False)
    if size:
        staged = dicom_sar.Staged(tmp_path / "tmp", tmp_path / "target", 1, size)
        assert committer.add(dicom_sar.FileResult(tmp_path / "f", "written",
                                                  staged=staged)) == []
    assert committer.batch_files() == files
    committer.abandon()


def test_after_a_stop_a_stuck_file_is_given_up_on_within_the_grace(tmp_path: Path,
                                                                    monkeypatch) -> None:
    """Ctrl-C must not wait out a 600 s limit: in-flight files get STOP_GRACE, then roll back."""
    monkeypatch.setattr(dicom_sar, "STOP_GRACE", 0.5)
    release, stop = dicom_sar.threading.Event(), dicom_sar.threading.Event()

    stuck: list[dicom_sar.threading.Thread] = []

    def task(cand: dicom_sar.Candidate) -> dicom_sar.FileResult:
        if cand.path.name == "f02":
            stuck.append(dicom_sar.threading.current_thread())
            stop.set()  # the signal arrives while this file is stuck
            release.wait(60)
            dicom_sar.write_bytes_atomic(b"late", tmp_path / "f02.out", fsync=False)
        return dicom_sar.FileResult(cand.path, "ok")

    t0 = time.monotonic()
    try:
        cands = (dicom_sar.Candidate(tmp_path / f"f{i:02d}", tmp_path) for i in range(100))
        results = list(dicom_sar.run_ordered(cands, task, 1, stop, time_limit=600, batch=4))
    finally:
        release.set()
    assert time.monotonic() - t0 < 10
    assert [r.status for r in results[:4]] == ["ok", "ok", "error", "ok"]
    assert "after the stop signal" in results[2].message
    assert len(results) < 100  # no new files were taken after the stop
    stuck[0].join(30)  # the abandoned worker has tried its late write
    assert not stuck[0].is_alive()
    assert not (tmp_path / "f02.out").exists()


def test_pydicom_is_configured_once_and_other_warnings_still_show(tmp_path: Path) -> None:
    code = (f"import sys, warnings; sys.path.insert(0, {str(TOOL.parent)!r})\n"
            "import dicom_sar, pydicom.charset\n"
            "dicom_sar.load_pydicom(); n = len(warnings.filters)\n"
            "dicom_sar.load_pydicom(); assert len(warnings.filters) == n\n"
            "pydicom.charset.decode_bytes(b'x', ['from pydicom'], set())\n"
            "warnings.warn('from another library', UserWarning)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "from another library" in proc.stderr and "from pydicom" not in proc.stderr


def under_a_terminal(args: list[str | Path], cwd: Path, columns: int = 120) -> str:
    """Run the tool with stderr on a pseudo-terminal of that width (stdout discarded): all
    it drew there, frames as tqdm wrote them."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, str(TOOL), *map(str, args)], cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
                            env={**os.environ, "COLUMNS": str(columns)})
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=300)
    os.close(master)
    assert proc.returncode == 0
    return b"".join(chunks).decode("utf-8", "replace")


def test_the_progress_bar_knows_its_total(tmp_path: Path) -> None:
    """Under a terminal: n/total files with the time left once the walk has counted, and
    the last frame total/total; in a pipe, no bar at all."""
    import re
    tree = tmp_path / "t"
    made = run_tool("--generate", "--scenario", "multi_patient", "--patients", "375",
                    "--studies", "1", "--size", "16x16", "--layout", "flat", "--output", tree,
                    "--no-progress", "-j", "2", cwd=tmp_path)
    assert made.code == 0, made.err
    (tree / "manifest.json").unlink()
    drawn = under_a_terminal(["--dump", "--tag", "PatientID", "-j", "1", "--path", tree],
                             tmp_path)
    frames = [f for f in re.split(r"[\r\n]", drawn) if " files" in f]
    known = [f for f in frames if re.search(r"\d[\d,]*/1,500 files \[[\d:]+<[\d:?]+, ", f)]
    assert known, frames[-5:]
    assert re.search(r"100%\|.*\| 1,500/1,500 files", known[-1]), known[-1]
    assert "files/s" in known[-1]
    assert re.search(r"total time +\d", drawn)  # the summary in human units
    piped = run_tool("--dump", "--tag", "PatientID", "--path", tree, cwd=tmp_path)
    assert " files [" not in piped.err and "files/s" not in piped.err
    generated = under_a_terminal(["--generate", "--scenario", "default", "--output",
                                  tmp_path / "g"], tmp_path)
    assert re.search(r"4/4 files", generated)


# ── past one machine: --files-from, --shard, --merge-summaries ──────────────────────────

@property_settings(40)
@given(st.lists(st.text("abcxyz0189._-", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")), min_size=1, max_size=40,
                unique=True), st.integers(1, 7), st.integers(0, 3))
def test_property_shards_partition_the_tree(names: list[str], n: int, depth: int) -> None:
    """For any tree and N: the shards' files are disjoint, together the whole tree, and the
    same under another mount point."""
    import dicom_sar
    with tempfile.TemporaryDirectory() as tmp:
        trees = [Path(tmp) / "mnt" / "archive", Path(tmp) / "elsewhere"]
        for tree in trees:
            for i, name in enumerate(names):
                path = tree.joinpath(*[f"d{i % (k + 2)}" for k in range(depth)], name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"x")
        partitions = []
        for tree in trees:
            shards = []
            for i in range(1, n + 1):
                opts = dicom_sar.options_from_args(dicom_sar.build_parser().parse_args(
                    ["--dump", "--path", str(tree), "--shard", f"{i}/{n}"]))
                shards.append({str(c.path.relative_to(tree)) for c in dicom_sar.discover(opts, [])})
            everything = [f for s in shards for f in s]
            assert len(everything) == len(set(everything)) == len(names)  # disjoint, all
            partitions.append(shards)
        assert partitions[0] == partitions[1]  # the mount point does not matter


def test_files_from_lists_files_with_the_walks_rules(generated: Path, manifest: dict,
                                                     tmp_path: Path) -> None:
    tree = tmp_path / "t"
    for i, e in enumerate(instances(manifest, scenario="multi_patient")[:5]):
        (tree / f"d{i}").mkdir(parents=True)
        shutil.copy(generated / e["path"], tree / f"d{i}" / f"f {i}")  # a space in the name
    (tree / "notes").write_text("not DICOM")
    os.mkfifo(tree / "fifo")
    names = [f"t/d{i}/f {i}" for i in range(5)] + ["t/notes", "t/fifo", "t/d0", "/etc/passwd"]
    (tmp_path / "list0").write_bytes(b"\0".join(n.encode() for n in names) + b"\0")
    run = run_tool("--dump", "--tag", "PatientID", "--files-from", "list0", "-0",
                   "--with-filename", "--summary-json", "s.json", "--path", "t", cwd=tmp_path)
    assert run.code == 1  # /etc/passwd is not below the --path root
    assert len(run.out.splitlines()) == 5
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["dicom_files"], s["skipped_not_dicom"], s["skipped_other"], s["errors"]) == \
        (5, 1, 1, 1)
    assert "not below --path t" in (tmp_path / "errors.log").read_text()
    piped = subprocess.run([sys.executable, str(TOOL), "--dump", "--tag", "PatientID",
                            "--files-from", "-", "-q"], cwd=tmp_path, capture_output=True,
                           input="\n".join(names[:5]).encode())
    assert piped.returncode == 0 and len(piped.stdout.splitlines()) == 5


def tree_and_single_run(tree: Path, tmp_path: Path, patients: int) -> tuple[Path, Path]:
    """A generated tree to shard, and a copy of it after one unsharded in-place SAR (its
    summary in tmp_path/one.json): what the shards must add up to."""
    made = run_tool("--generate", "--scenario", "multi_patient", "--patients", str(patients),
                    "--size", "16x16", "--output", tree, "--no-progress", cwd=tmp_path)
    assert made.code == 0, made.err
    (tree / "manifest.json").unlink()
    single = tmp_path / "single"
    shutil.copytree(tree, single)
    one = run_tool("--sar", "--inplace", "--no-backup", "--tag", "PatientID",
                   "--regex_search", "^(.*)$", "--regex_replace", r"GENHOSP\1", "--path",
                   single, "--summary-json", tmp_path / "one.json", "--log-dir",
                   tmp_path / "onelogs", cwd=tmp_path)
    assert one.code == 0, one.err
    return tree, single


def test_gnu_parallel_shards_add_up_to_one_run(tmp_path: Path) -> None:
    """4 shards of an in-place SAR under GNU parallel: every file modified exactly once, and
    the merged summary counts what a single run counts."""
    tree, single = tree_and_single_run(tmp_path / "tree", tmp_path, patients=20)
    command = (f"{sys.executable} {TOOL} --sar --inplace --no-backup --tag PatientID "
               f"--regex_search '^(.*)$' --regex_replace 'GENHOSP\\1' --path {tree} "
               f"--log-dir {tmp_path / 'logs'} --no-progress -q --shard {{}}/4")
    proc = subprocess.run([need("fish"), "-c", f"{need('parallel')} -q {command} ::: (seq 4)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summaries = sorted((tmp_path / "logs").glob("dicom_sar-summary.shard-*-of-4.json"))
    assert len(summaries) == 4
    assert len(list((tmp_path / "logs").glob("dicom_sar.shard-*-of-4.log"))) == 4
    for path in tree.rglob("*"):
        if path.is_file():
            rel = path.relative_to(tree)
            assert path.read_bytes() == (single / rel).read_bytes(), rel  # once, not twice
    merged = run_tool("--merge-summaries", *summaries, "--summary-json", tmp_path / "m.json",
                      cwd=tmp_path)
    assert merged.code == 0, merged.err
    m, o = json.loads((tmp_path / "m.json").read_text()), json.loads(
        (tmp_path / "one.json").read_text())
    for key in ("files_seen", "dicom_files", "processed", "errors", "modified",
                "elements_changed", "rejected", "unchanged"):
        assert m[key] == o[key], key
    missing = run_tool("--merge-summaries", *summaries[:3], cwd=tmp_path)
    assert missing.code == 1 and "shard 4/4 is missing" in missing.err


@pytest.fixture
def slurm(tmp_path: Path):
    """A single-node Slurm of the test's own on localhost: a private munged (its own key and
    socket), slurmctld and slurmd on free ports, stopped afterwards; yields its environment."""
    import socket
    for program in ("munged", "slurmctld", "slurmd", "sbatch"):
        need(program)
    d = tmp_path / "slurm"
    (d / "state").mkdir(parents=True)
    (d / "spool").mkdir()
    (d / "munge.key").write_bytes(os.urandom(1024))
    (d / "munge.key").chmod(0o400)
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    host = socket.gethostname()
    (d / "slurm.conf").write_text(textwrap.dedent(f"""\
        ClusterName=dsartest
        SlurmctldHost={host}
        SlurmUser=root
        SlurmctldPort={ports[0]}
        SlurmdPort={ports[1]}
        AuthType=auth/munge
        AuthInfo=socket={d}/munge.socket
        CredType=cred/munge
        StateSaveLocation={d}/state
        SlurmdSpoolDir={d}/spool
        SlurmctldPidFile={d}/slurmctld.pid
        SlurmdPidFile={d}/slurmd.pid
        ProctrackType=proctrack/linuxproc
        TaskPlugin=task/none
        SelectType=select/cons_tres
        SelectTypeParameters=CR_Core
        JobAcctGatherType=jobacct_gather/none
        MpiDefault=none
        ReturnToService=2
        SlurmctldLogFile={d}/slurmctld.log
        SlurmdLogFile={d}/slurmd.log
        NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
        PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
        """))
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    subprocess.run([need("munged"), f"--key-file={d}/munge.key", f"--socket={d}/munge.socket",
                    f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
                    f"--seed-file={d}/munge.seed", "--force"], check=True, env=env)
    daemons = [subprocess.Popen([need(p), "-D", *extra], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for p, extra in (("slurmctld", ["-i"]), ("slurmd", []))]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                                   text=True).stdout.strip()
            if state in ("idle", "mix"):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"Slurm did not come up: {(d / 'slurmctld.log').read_text()[-2000:]}")
        yield env
    finally:
        for proc in daemons:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((d / "munged.pid").read_text()), signal.SIGTERM)


def test_the_readme_slurm_array_script_adds_up(slurm: dict, tmp_path: Path) -> None:
    """tools/dicom_sar.sbatch as an array of 4 on a real (single-node) Slurm: every file
    modified once, the merged summary as a single run's."""
    work = tmp_path / "work"
    (work / "venv" / "bin").mkdir(parents=True)
    (work / "logs").mkdir()
    wrapper = work / "venv" / "bin" / "dicom_sar"  # the installed command, for this checkout
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {TOOL} \"$@\"\n")
    wrapper.chmod(0o755)
    tree, single = tree_and_single_run(work / "tree", tmp_path, patients=10)
    job = subprocess.run(["sbatch", "--wait", "--array=1-4", "--export=ALL,SHARDS=4",
                          str(TOOL.parent / "tools" / "dicom_sar.sbatch"), str(tree)],
                         cwd=work, env=slurm, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr + "".join(
        p.read_text() for p in (work / "logs").glob("slurm-*.out"))
    for path in tree.rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (single / path.relative_to(tree)).read_bytes()
    summaries = sorted((work / "logs").glob("dicom_sar-summary.shard-*-of-4.json"))
    merged = run_tool("--merge-summaries", *summaries, "--summary-json", tmp_path / "m.json",
                      cwd=tmp_path)
    assert merged.code == 0, merged.err
    m, o = (json.loads((tmp_path / name).read_text()) for name in ("m.json", "one.json"))
    assert (m["modified"], m["files_seen"], m["errors"]) == (o["modified"], o["files_seen"], 0)


# ── One rule for "readable", equal to DCMTK's ───────────────────────────────────────────

def refused_by(mode: list[str], tree: Path, cwd: Path) -> set[str]:
    """The files of tree that a run of mode reports unreadable in errors.log (a file read
    whole that lacks what the mode needs, such as a send's UIDs, is not one)."""
    cwd.mkdir()
    run = run_tool(*mode, "--path", tree, "--no-progress", "-q", cwd=cwd)
    assert run.code in (0, 1) and "Traceback" not in run.err, run.err
    lines = [line.split(" ERROR ", 1)[1].split(": ", 2)
             for line in (cwd / "errors.log").read_text().splitlines() if " ERROR " in line]
    return {path.rsplit("/", 1)[-1] for path, kind, _ in lines
            if kind not in ("MissingAttribute", "Rejected", "Duplicate")}


def test_every_mode_decides_readability_as_dcmdump_does(real_files: list[Path],
                                                        tmp_path: Path) -> None:
    """A file dcmdump refuses is refused by every mode that reads files; one it reads
    without a word is read by all: over the real files and the built edge cases (a compressed
    icon in an undefined-length item at depth 1 and 2; a sequence delimiter in an item)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name, data in readability_cases().items():
        (tree / name).write_bytes(data)
    for i, path in enumerate(real_files):
        shutil.copyfile(path, tree / f"real{i:03d}_{path.name}")
    errors, clean = set(), set()
    for path in tree.iterdir():
        with path.open("rb") as f:
            if dicom_sar.sniff_dicom(f.read(132), path.stat().st_size) is None:
                continue  # not DICOM by its content: no mode reads it
        proc = dcmdump(path)
        if proc.returncode:
            errors.add(path.name)
        elif not proc.stderr.strip():
            clean.add(path.name)
    assert {"seqdelim_in_item_depth1", "seqdelim_in_item_depth2"} <= errors
    assert {"icon_depth1", "icon_depth2"} <= clean
    modes = {"dump": ["--dump"], "tag dump": ["--dump", "--tag", "PatientID"],
             "sar": ["--sar", "--force", "--regex_search", "^$", "--regex_replace", "",
                     "--output", tmp_path / "out"],
             "send": ["--send", "--dry-run", "-H", "127.0.0.1", "-p", "104", "-a", "ANY"],
             "deid": ["--deid", "--key", tmp_path / "key", "--allow-burned-in", "--output",
                      tmp_path / "deid"],
             "deid-audit": ["--deid-audit"]}
    (tmp_path / "key").write_bytes(bytes(range(32)))
    for i, (name, mode) in enumerate(modes.items()):
        refused = refused_by(mode, tree, tmp_path / f"run{i}")
        assert errors <= refused, (name, sorted(errors - refused))
        assert not refused & clean, (name, sorted(refused & clean))


def test_files_from_without_path_takes_the_listed_paths_as_they_are(
        generated: Path, manifest: dict, tmp_path: Path) -> None:
    """`find /abs/tree -print0 | dicom_sar --dump --files-from - -0` reads every listed file,
    wherever it is; shards split the list by the path as listed; a --path that the list is
    not below is one usage error, before any file; --sar needs --path (its output mirrors it)."""
    tree = tmp_path / "elsewhere"
    for e in instances(manifest, scenario="multi_patient")[:6]:
        (tree / e["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(generated / e["path"], tree / e["path"])
    work = tmp_path / "work"
    work.mkdir()
    listing = subprocess.run(["find", str(tree), "-type", "f", "-print0"], capture_output=True,
                             check=True).stdout

    def piped(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(TOOL), *args, "--files-from", "-", "-0",
                               "--no-progress"], cwd=work, input=listing.decode(),
                              capture_output=True, text=True, timeout=120)

    whole = piped("--dump", "--tag", "PatientID", "--with-filename", "-q")
    assert whole.returncode == 0, whole.stderr
    assert sorted(line.split(": ")[0] for line in whole.stdout.splitlines()) == \
        sorted(os.fsdecode(n) for n in listing.split(b"\0") if n)
    assert not (work / "errors.log").read_text()
    halves = [piped("--dump", "--tag", "PatientID", "--with-filename", "-q", "--shard",
                    f"{i}/2") for i in (1, 2)]
    assert sorted(line for h in halves for line in h.stdout.splitlines()) == \
        sorted(whole.stdout.splitlines())
    wrong = piped("--dump", "--tag", "PatientID", "--path", str(work), "-q")
    assert wrong.returncode == 2 and not wrong.stdout
    assert len(wrong.stderr.strip().splitlines()) == 1 and "not below --path" in wrong.stderr
    sar = piped("--sar", "--tag", "PatientID", "--regex_search", "A", "--regex_replace", "B",
                "--inplace")
    assert sar.returncode == 2 and "--sar with --files-from needs --path" in sar.stderr


# ── Every option with every mode ─────────────────────────────────────────────────────────

EVERY_MODE = {"dump": ["--dump"], "sar": ["--sar", "--tag", "PatientID", "--regex_search",
                                           "A", "--regex_replace", "B"],
              "generate": ["--generate"], "send": ["--send", "-H", "h", "-p", "104"],
              "echo": ["--echo", "-H", "h", "-p", "104"],
              "check_ingest": ["--check-ingest", "MANIFEST", "-H", "h", "-p", "104"],
              "ingest_test": ["--ingest-test", "--output", "OUT", "-H", "h", "-p", "104"],
              "merge_summaries": ["--merge-summaries", "MANIFEST"], "ui": ["--ui"],
              "deid": ["--deid", "--key", "KEY"], "deid_audit": ["--deid-audit"]}
SAMPLE = {"tag": "PatientID", "shard": "1/2", "size": "8x8", "scenario": "default",
          "regex_search": "A", "regex_replace": "B", "port": "105", "workers": "2",
          "deid_option": "clean-graphics", "key": "KEY", "new_key": "OUT"}
EVERY_MODE_TAKES = {"help", "log_dir", "no_progress", "verbose", "quiet"}


def test_an_option_a_mode_would_ignore_is_a_usage_error(tmp_path: Path) -> None:
    """Every option with every mode: the modes the table names take it; any other refuses it
    naming the modes it belongs to (today --dump --inplace and --generate --tag ran and
    ignored them). Every option is in the table or taken by every mode."""
    parser = dicom_sar.build_parser()
    mode_flags = {a.dest for a in parser._mutually_exclusive_groups[0]._group_actions}
    options = [a for a in parser._actions if a.option_strings and a.dest not in mode_flags]
    assert {a.dest for a in options} - set(dicom_sar.OPTION_MODES) == EVERY_MODE_TAKES
    (tmp_path / "MANIFEST").write_text('{"instances": []}')
    (tmp_path / "KEY").write_bytes(bytes(range(32)))

    def options_of(argv: list[str]) -> str:
        argv = [str(tmp_path / a) if a in ("MANIFEST", "OUT", "KEY") else a for a in argv]
        try:
            dicom_sar.options_from_args(parser.parse_args(argv), parser)
        except UsageError as exc:
            return str(exc)
        return ""

    for mode, base in EVERY_MODE.items():
        assert options_of(base) == "", mode
        for action in options:
            if action.dest in EVERY_MODE_TAKES:
                continue
            flag = max(action.option_strings, key=len)
            value = [] if action.nargs == 0 else [
                action.choices[-1] if action.choices else SAMPLE.get(action.dest, "7")]
            said = options_of([*base, flag, *value])
            foreign = mode not in dicom_sar.OPTION_MODES[action.dest]
            assert ("belongs to" in said) == foreign, (mode, flag, said)
            if foreign:
                assert said.startswith(f"{flag} belongs to --") and mode.replace("_", "-") \
                    in said.rsplit("not to ", 1)[1]


def test_sar_refuses_a_tag_that_is_not_a_string_element(tmp_path: Path) -> None:
    """--sar --tag PixelData (OB or OW) said 'unchanged 24'; now it is a usage error."""
    run = run_tool("--sar", "--tag", "PixelData", "--regex_search", "A", "--regex_replace",
                   "B", "--path", tmp_path, cwd=tmp_path)
    assert run.code == 2 and "--tag PixelData: VR OB or OW is not a string VR" in run.err


def test_the_mode_table_is_the_only_list_of_modes() -> None:
    """Parser, completions and dispatch all come from MODES: each mode that runs has its
    driver, and the parser's mode group is the table, in order."""
    parser = dicom_sar.build_parser()
    group = parser._mutually_exclusive_groups[0]._group_actions
    assert [max(a.option_strings, key=len) for a in group] == \
        [m.flag for m in dicom_sar.MODES] == list(dicom_sar.MODE_FLAGS)
    assert set(dicom_sar.RUNNERS) == set(dicom_sar.RUN_MODES)
