"""--sar: regex search/replace that never writes an invalid value or a broken file."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from conftest import (
    DAMAGE,
    FREE_THREADED_BUILD,
    TOOL,
    damaged,
    dcmdump,
    dicom_files,
    instances,
    need,
    property_settings,
    read,
    run_tool,
    sar_one,
    squeeze,
    tree_digest,
)

GENHOSP = ["--regex_search", "^(.*)$", "--regex_replace", r"GENHOSP\1"]


def pid_counts(tree: Path) -> collections.Counter[str]:
    """The user's check: dcmdump +P PatientID | sort | uniq -c, over a tree."""
    counts: collections.Counter[str] = collections.Counter()
    for path in sorted(p for p in tree.rglob("*") if p.is_file()):
        for line in squeeze(dcmdump("+P", "PatientID", path).stdout.decode("latin-1")):
            counts[line.split(" #")[0]] += 1
    return counts


def test_users_verification_method(readable_pydicom_files: list[Path], tmp_path: Path) -> None:
    tree = tmp_path / "in"
    tree.mkdir()
    for i, src in enumerate(readable_pydicom_files):
        shutil.copy(src, tree / f"{i:03d}")
    before = pid_counts(tree)
    # dcmdump +P counts PatientID at every depth, so the SAR goes --deep too
    run = run_tool("--sar", "--tag", "PatientID", "--deep", *GENHOSP, "-j", "2", "--path", tree,
                   "--output", tmp_path / "out", "--copy-unmodified", cwd=tmp_path)
    assert run.code in (0, 1), run.err
    after = pid_counts(tmp_path / "out")
    rejected = (tmp_path / "errors.log").read_text().count("Rejected")
    expected: collections.Counter[str] = collections.Counter()
    for line, n in before.items():
        value = re.search(r"\[(.*)\]$", line)
        expected[line.replace(f"[{value[1]}]", f"[GENHOSP{value[1]}]") if value else line] += n
    if rejected == 0:
        assert after == expected
    else:  # files whose new value would break a VR limit keep their old value, nothing else
        assert sum(after.values()) == sum(before.values())
    assert sum(1 for k in after if "GENHOSP" in k) >= 20


def test_only_the_changed_element_differs_in_dcmdump(readable_pydicom_files: list[Path],
                                                     tmp_path: Path) -> None:
    tree = tmp_path / "in"
    tree.mkdir()
    for i, src in enumerate(readable_pydicom_files):
        shutil.copy(src, tree / f"{i:03d}")
    run = run_tool("--sar", "--tag", "InstitutionName", "--regex_search", "^(.+)$",
                   "--regex_replace", r"\1 X", "-j", "2", "--path", tree,
                   "--output", tmp_path / "out", cwd=tmp_path)
    assert run.code in (0, 1), run.err
    changed = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(changed) >= 10
    lengths = re.compile(r"#\s*(\d+|u/l),")
    for name in changed:
        before = squeeze(dcmdump(tree / name).stdout.decode("latin-1"))
        after = squeeze(dcmdump(tmp_path / "out" / name).stdout.decode("latin-1"))
        assert len(before) == len(after), name
        for a, b in zip(before, after, strict=True):
            if a == b:
                continue
            # the changed element, or a length that encloses it (group length, SQ, item)
            assert "InstitutionName" in a or lengths.sub("#", a) == lengths.sub("#", b) \
                or a.startswith("(0008,0000)"), (name, a, b)
            if "InstitutionName" in a:
                assert b.split("]")[0] == a.split("]")[0] + " X", (name, a, b)


def make_tree(tmp_path: Path, generated: Path, entries: list[dict]) -> Path:
    tree = tmp_path / "in"
    tree.mkdir(exist_ok=True)
    for i, e in enumerate(entries):
        shutil.copy(generated / e["path"], tree / f"{i:02d}_{e['scenario']}")
    return tree


@pytest.mark.parametrize(("tag", "search", "replace", "rule"), [
    ("AccessionNumber", "^(.*)$", r"\1" + "X" * 17, "16"),          # SH over 16 characters
    ("Modality", "^MG$", "mg", "CS"),                                 # CS in lower case
    ("StudyInstanceUID", "$", "abc", "UI"),                           # UI with letters
    ("PatientName", "^", "山", "character set"),                      # not in ISO_IR 100
])
def test_rejections_leave_the_file_byte_identical(tag: str, search: str, replace: str,
                                                  rule: str, generated: Path, manifest: dict,
                                                  tmp_path: Path) -> None:
    tree = make_tree(tmp_path, generated, instances(manifest, scenario="charset_latin1")[:1])
    digest = tree_digest(tree)
    run = run_tool("--sar", "--inplace", "--tag", tag, "--regex_search", search,
                   "--regex_replace", replace, "--path", tree, cwd=tmp_path)
    assert run.code == 1
    assert tree_digest(tree) == digest
    (line,) = (tmp_path / "errors.log").read_text().splitlines()
    assert "Rejected" in line and tag in line and rule in line
    assert replace not in line  # the value only with --verbose
    assert not (tmp_path / "dicom_sar_backup").exists() or not any(
        p.is_file() for p in (tmp_path / "dicom_sar_backup").rglob("*"))


def test_rejection_names_the_value_with_verbose(generated: Path, manifest: dict,
                                                tmp_path: Path) -> None:
    tree = make_tree(tmp_path, generated, instances(manifest, scenario="default")[:1])
    run = run_tool("--sar", "--verbose", "--tag", "Modality", "--regex_search", "MG",
                   "--regex_replace", "mg", "--path", tree, cwd=tmp_path)
    assert run.code == 1
    assert "'mg'" in (tmp_path / "errors.log").read_text()


def test_all_or_nothing_per_file(generated: Path, manifest: dict, tmp_path: Path) -> None:
    tree = make_tree(tmp_path, generated, instances(manifest, scenario="default")[:1])
    run = run_tool("--sar", "--tag", "PatientID,Modality", "--regex_search", "^(.*)$",
                   "--regex_replace", r"\1x", "--path", tree, cwd=tmp_path)
    assert run.code == 1
    assert not (tmp_path / "dicom_sar_output").exists()


@pytest.mark.parametrize(("scenario", "replacement", "expected"), [
    ("charset_latin1", "Ä", "MÜLLERÄ^JÜRGEN"),
    ("charset_utf8", "Ä", "ØSTERÄ^ZOË=王^小東"),
    ("charset_japanese", "山", "YAMADA山^TAROU=山田^太郎=やまだ^たろう"),
])
def test_character_sets(scenario: str, replacement: str, expected: str, generated: Path,
                        manifest: dict, tmp_path: Path) -> None:
    tree = make_tree(tmp_path, generated, instances(manifest, scenario=scenario)[:1])
    run = run_tool("--sar", "--tag", "PatientName", "--regex_search", r"^(\w+)\^",
                   "--regex_replace", rf"\1{replacement}^", "--path", tree, cwd=tmp_path)
    assert run.code == 0, run.err + (tmp_path / "errors.log").read_text()
    (out,) = (tmp_path / "dicom_sar_output").iterdir()
    ds = read(out)
    assert str(ds.PatientName) == expected
    assert ds.SpecificCharacterSet == read(next(tree.iterdir())).SpecificCharacterSet


def test_pydicom_charset_files(tmp_path: Path) -> None:
    from pydicom.data import get_charset_files
    tree = tmp_path / "in"
    tree.mkdir()
    for name in ("chrGerm.dcm", "chrX1.dcm", "chrH31.dcm", "chrRuss.dcm"):
        shutil.copy(get_charset_files(name)[0], tree / name)
    run = run_tool("--sar", "--tag", "PatientName", "--regex_search", r"^(\w+)",
                   "--regex_replace", r"\1Ä", "--path", tree, cwd=tmp_path)
    assert run.code == 1  # Ä is not in ISO 2022 IR 87's default repertoire nor in ISO_IR 144
    out = tmp_path / "dicom_sar_output"
    assert sorted(p.name for p in out.iterdir()) == ["chrGerm.dcm", "chrX1.dcm"]
    assert str(read(out / "chrGerm.dcm").PatientName) == "ÄneasÄ^Rüdiger"
    old_raw = read(tree / "chrX1.dcm").get_item(0x00100010).value.rstrip(b" ")
    new_raw = read(out / "chrX1.dcm").get_item(0x00100010).value.rstrip(b" ")
    assert new_raw == old_raw.replace(b"Wang", "WangÄ".encode())  # trailing '=' group kept
    errors = (tmp_path / "errors.log").read_text()
    assert "chrH31.dcm" in errors and "chrRuss.dcm" in errors


def test_multi_valued_values_are_matched_one_by_one(generated: Path, manifest: dict,
                                                    tmp_path: Path) -> None:
    tree = make_tree(tmp_path, generated, instances(manifest, scenario="ct")[:1])
    run = run_tool("--sar", "--tag", "ImageType", "--regex_search", "^PRIMARY$",
                   "--regex_replace", "SECONDARY", "--path", tree, cwd=tmp_path)
    assert run.code == 0, run.err
    (out,) = (tmp_path / "dicom_sar_output").iterdir()
    assert list(read(out).ImageType) == ["ORIGINAL", "SECONDARY", "AXIAL"]


def test_deep_and_sequence_paths(generated: Path, manifest: dict, tmp_path: Path) -> None:
    tree = make_tree(tmp_path, generated, instances(manifest, scenario="nested_sequences")[:1])
    name = next(tree.iterdir()).name
    for flag, expect_nested in ((["--tag", "PatientID"], False),
                                (["--tag", "PatientID", "--deep"], True),
                                (["--tag", "OtherPatientIDsSequence[*].PatientID"], True)):
        out = tmp_path / f"out{len(flag)}{expect_nested}"
        run = run_tool("--sar", *flag, "--regex_search", "^", "--regex_replace", "Z",
                       "--path", tree, "--output", out, cwd=tmp_path)
        assert run.code == 0, run.err
        ds = read(out / name)
        nested = ds.OtherPatientIDsSequence[0].PatientID
        assert nested.startswith("Z") is expect_nested
        assert ds.PatientID.startswith("Z") is (flag[1] == "PatientID")


def test_private_tag_by_creator(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file
    tree = tmp_path / "in"
    tree.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tree / "ct")
    run = run_tool("--sar", "--tag", '(0009,"GEMS_IDEN_01",02)', "--regex_search", "CT01",
                   "--regex_replace", "CT02", "--path", tree, cwd=tmp_path)
    assert run.code == 0, run.err
    assert read(tmp_path / "dicom_sar_output" / "ct")[0x00091002].value == "CT02"


def test_sop_instance_uid_updates_the_file_meta(generated: Path, manifest: dict,
                                                tmp_path: Path) -> None:
    tree = make_tree(tmp_path, generated, instances(manifest, scenario="default")[:1])
    # generated UIDs are 64 characters already: a same-length change
    run = run_tool("--sar", "--tag", "SOPInstanceUID", "--regex_search", r"\.8\.498\.",
                   "--regex_replace", ".8.499.", "--path", tree, cwd=tmp_path)
    assert run.code == 0, run.err
    ds = read(next((tmp_path / "dicom_sar_output").iterdir()))
    assert ".8.499." in ds.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    proc = dcmdump("-q", next((tmp_path / "dicom_sar_output").iterdir()))
    assert proc.returncode == 0 and not proc.stderr


@pytest.mark.parametrize("scenario", ["no_preamble", "implicit_vr", "big_endian", "deflated",
                                      "compressed", "long_values"])
def test_encodings_are_kept(scenario: str, generated: Path, manifest: dict,
                            tmp_path: Path) -> None:
    tree = make_tree(tmp_path, generated, instances(manifest, scenario=scenario)[:1])
    src = next(tree.iterdir())
    run = run_tool("--sar", "--tag", "StudyDescription", "--regex_search", "Screening",
                   "--regex_replace", "Scr", "--path", tree, cwd=tmp_path)
    assert run.code == 0, run.err
    out = tmp_path / "dicom_sar_output" / src.name
    before, after = read(src), read(out)
    assert after.StudyDescription == "Scr mammography"
    assert after.original_encoding == before.original_encoding
    assert src.read_bytes()[128:132] == out.read_bytes()[128:132]  # preamble or not
    assert after.PixelData == before.PixelData
    old = squeeze(dcmdump(src).stdout.decode("latin-1"))
    new = squeeze(dcmdump(out).stdout.decode("latin-1"))
    assert [x for x in old if "StudyDescription" not in x] == \
           [x for x in new if "StudyDescription" not in x]


def test_dry_run_writes_nothing_and_previews(generated: Path, manifest: dict,
                                             tmp_path: Path) -> None:
    entries = instances(manifest, scenario="multi_patient")
    tree = make_tree(tmp_path, generated, entries)
    digest = tree_digest(tmp_path)
    run = run_tool("--sar", "--dry-run", "--tag", "PatientID", *GENHOSP, "--path", tree,
                   "--log-dir", tmp_path / "logs", cwd=tmp_path)
    assert run.code == 0, run.err
    assert tree_digest(tmp_path / "in") == {k.split("/", 1)[1]: v for k, v in digest.items()
                                            if k.startswith("in/")}
    assert not (tmp_path / "dicom_sar_output").exists()
    first = entries[0]
    assert f"(0010,0020) PatientID  '{first['patient_id']}' -> 'GENHOSP{first['patient_id']}'" \
        in run.out
    assert f"would modify {len(entries)} files, would reject 0" in run.err


def test_output_tree_mirrors_paths(generated: Path, tmp_path: Path) -> None:
    run = run_tool("--sar", "--tag", "PatientID", *GENHOSP, "--path", generated,
                   "--output", tmp_path / "out", "-j", "2", cwd=tmp_path)
    assert run.code == 1  # the broken presets (truncated, ...) are errors; the rest is written
    written = {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")
               if p.is_file()}
    assert written and all((generated / rel).is_file() for rel in written)
    assert len(written) >= 400


def test_inplace_keeps_a_complete_backup(generated: Path, manifest: dict,
                                         tmp_path: Path) -> None:
    tree = make_tree(tmp_path, generated, instances(manifest, scenario="multi_patient"))
    before = tree_digest(tree)
    inodes = {p.name: p.stat().st_ino for p in tree.iterdir()}
    (tree / "00_multi_patient").chmod(0o640)
    run = run_tool("--sar", "--inplace", "--tag", "PatientID", *GENHOSP, "--path", tree,
                   "--backup-dir", tmp_path / "backup", cwd=tmp_path)
    assert run.code == 0, run.err
    assert tree_digest(tmp_path / "backup") == before
    after = tree_digest(tree)
    assert set(after) == set(before) and all(after[k] != before[k] for k in before)
    assert (tree / "00_multi_patient").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "backup" / "00_multi_patient").stat().st_mode & 0o777 == 0o640
    assert not list(tree.glob(".dicom_sar-tmp-*"))
    # same filesystem: each backup is the original inode itself (a link, no copy), and the
    # replaced file no longer shares it
    for name in before:
        kept = (tmp_path / "backup" / name).stat()
        assert kept.st_ino == inodes[name] and kept.st_nlink == 1


def test_backup_inside_the_tree_is_refused(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for dry in ([], ["--dry-run"]):  # the preview fails as the real run would
        run = run_tool("--sar", "--inplace", "--tag", "PatientID", *GENHOSP, "--path", "in",
                       "--backup-dir", "in/backup", *dry, cwd=tmp_path)
        assert run.code == 2 and "backups outside" in run.err


@pytest.mark.parametrize(("path", "output"), [
    ("in", "in"),  # written files would be the originals
    ("in", "link-to-in"),  # the same, under another name
    ("in/DICOM", "in"),  # in/DICOM/DICOM/x would be written over in/DICOM/x
    ("in/DICOM/x", "in/DICOM"),  # a file named alone, into its own directory
])
def test_an_output_tree_that_holds_the_input_is_refused(path: str, output: str, generated: Path,
                                                        manifest: dict, tmp_path: Path) -> None:
    nested = tmp_path / "in" / "DICOM" / "DICOM"
    nested.mkdir(parents=True)
    source = generated / instances(manifest, scenario="default")[0]["path"]
    shutil.copy(source, nested.parent / "x")
    shutil.copy(source, nested / "x")
    (tmp_path / "link-to-in").symlink_to(tmp_path / "in")
    before = tree_digest(tmp_path / "in")
    for dry in ([], ["--dry-run"]):  # the preview fails as the real run would
        run = run_tool("--sar", "--tag", "PatientID", *GENHOSP, "--path", path, "--output",
                       output, *dry, cwd=tmp_path)
        assert run.code == 2 and "choose an output directory outside it" in run.err
    assert tree_digest(tmp_path / "in") == before
    ok = run_tool("--sar", "--tag", "PatientID", *GENHOSP, "--path", path, "--output",
                  tmp_path / "elsewhere", cwd=tmp_path)
    assert ok.code == 0, ok.err


def test_a_failed_write_is_an_error_for_that_file_only(generated: Path, manifest: dict,
                                                       tmp_path: Path) -> None:
    tree = make_tree(tmp_path, generated, instances(manifest, scenario="ct")[:3])
    before = tree_digest(tree)
    # RLIMIT_FSIZE: writing more than 100 kB fails (EFBIG), even for root
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); "
            f"sys.argv = ['dicom_sar.py'] + sys.argv[1:]; "
            f"sys.path.insert(0, {str(TOOL.parent)!r}); "
            "import dicom_sar; sys.exit(dicom_sar.main())")
    proc = subprocess.run([sys.executable, "-c", code, "--sar", "--inplace", "--no-backup",
                           "--tag", "PatientID", *GENHOSP, "--path", str(tree)],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert tree_digest(tree) == before  # every original intact
    assert len((tmp_path / "errors.log").read_text().splitlines()) == 3
    assert not list(tree.glob(".dicom_sar-tmp-*"))


def test_short_writes_are_written_out_in_full(generated: Path, tmp_path: Path) -> None:
    """A raw write may take fewer bytes than it is given: with writev cut to 1,000 bytes a
    call, the spliced path, the full-rewrite fallback (deflate) and --generate still write
    exactly the bytes of a normal run."""
    code = ("import os, sys; real = os.writev; "
            "os.writev = lambda fd, bufs: real(fd, [bytes(memoryview(b''.join(bufs))[:1000])]); "
            "sys.argv = ['dicom_sar.py'] + sys.argv[1:]; "
            f"sys.path.insert(0, {str(TOOL.parent)!r}); "
            "import dicom_sar; sys.exit(dicom_sar.main())")
    sar = ["--sar", "--tag", "PatientID", *GENHOSP, "--path", str(generated)]
    gen = ["--generate", "--scenario", "ct", "--patients", "1", "--instances", "3",
           "--seed", "7"]
    for name, args in (("sar", sar), ("gen", gen)):
        normal = run_tool(*args, "--output", tmp_path / f"{name}-normal", cwd=tmp_path)
        cut = subprocess.run([sys.executable, "-c", code, *args, "--output",
                              str(tmp_path / f"{name}-cut")], cwd=tmp_path,
                             capture_output=True, text=True)
        assert cut.returncode == normal.code, cut.stderr
        assert "modified" in normal.err or "files written" in normal.err
        digest = tree_digest(tmp_path / f"{name}-normal")
        assert len(digest) > 3 and tree_digest(tmp_path / f"{name}-cut") == digest


def test_output_path_blocked_is_an_error_for_that_file(generated: Path, manifest: dict,
                                                      tmp_path: Path) -> None:
    tree = make_tree(tmp_path, generated, instances(manifest, scenario="default")[:2])
    tree_sub = tree / "sub"
    tree_sub.mkdir()
    shutil.move(tree / "01_default", tree_sub / "x")
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_text("a file where a directory must go")
    run = run_tool("--sar", "--tag", "PatientID", *GENHOSP, "--path", tree, "--output", out,
                   "--summary-json", tmp_path / "s.json", cwd=tmp_path)
    assert run.code == 1
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["modified"], s["errors"]) == (1, 1)
    assert (out / "00_default").is_file()


@pytest.mark.parametrize("bad", [
    ["--tag", "PatientID", "--regex_search", "(", "--regex_replace", "x"],
    ["--tag", "PatientID", "--regex_search", "a", "--regex_replace", r"\2"],
    ["--tag", "Rows", "--regex_search", "a", "--regex_replace", "b"],
    ["--regex_search", "a", "--regex_replace", "b"],
])
def test_sar_usage_errors(bad: list[str], tmp_path: Path) -> None:
    run = run_tool("--sar", *bad, "--path", tmp_path, cwd=tmp_path)
    assert run.code == 2
    assert len(run.err.strip().splitlines()) == 1


def test_force_targets_every_string_element(generated: Path, manifest: dict,
                                            tmp_path: Path) -> None:
    tree = make_tree(tmp_path, generated, instances(manifest, scenario="nested_sequences")[:1])
    run = run_tool("--sar", "--force", "--regex_search", "OTHERHOSP", "--regex_replace",
                   "ELSEWHERE", "--path", tree, cwd=tmp_path)
    assert run.code == 0, run.err
    ds = read(next((tmp_path / "dicom_sar_output").iterdir()))
    assert ds.OtherPatientIDsSequence[0].IssuerOfPatientID == "ELSEWHERE"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


# ── reliability: hostile input, crashes, resume, signals ──────────────────────────────────


@pytest.mark.parametrize("mode", [["--dry-run"], ["--output", "out"]])
def test_hostile_files_never_crash_or_hang_a_sar(mode: list[str], fuzz_tree: Path,
                                                 tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(TOOL), "--sar", "--tag", "PatientID", *GENHOSP,
                           "-j", "2", "--time-limit", "60", "--path", str(fuzz_tree), *mode,
                           "--summary-json", str(tmp_path / "s.json"), "--no-progress"],
                          cwd=tmp_path,
                          capture_output=True, timeout=600)
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["files_seen"] == 1002 and s["errors"] >= 100
    lines = (tmp_path / "errors.log").read_text().splitlines()
    assert len(lines) == s["errors"] + (s.get("rejected") or s.get("would_reject") or 0)
    if mode[0] == "--output":  # what was written reads again; broken inputs stay as broken
        written = list((tmp_path / "out").rglob("*"))
        assert len(written) >= 300
        for path in written:
            assert str(read(path).get("PatientID", "GENHOSP")).startswith("GENHOSP")


@pytest.fixture
def five_hundred(tmp_path: Path) -> tuple[Path, Path]:
    """500 small MG files, and the exact bytes the SAR makes of each."""
    run = run_tool("--generate", "--scenario", "multi_patient", "--patients", "125",
                   "--studies", "1", "--size", "16x16", "--layout", "flat", "--seed", "3",
                   "-j", "2", "--output", tmp_path / "orig", cwd=tmp_path)
    assert run.code == 0, run.err
    (tmp_path / "orig" / "manifest.json").unlink()
    ref = run_tool("--sar", "--tag", "PatientID", *GENHOSP, "--path", tmp_path / "orig",
                   "--output", tmp_path / "ref", "--log-dir", tmp_path / "reflogs", cwd=tmp_path)
    assert ref.code == 0, ref.err
    return tmp_path / "orig", tmp_path / "ref"


def sar_inplace(tree: Path, cwd: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(TOOL), "--sar", "--inplace", "--tag",
                             "PatientID", *GENHOSP, "-j", "2", "--no-progress", "--path",
                             str(tree), *extra], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def test_sigkill_at_ten_random_moments(five_hundred: tuple[Path, Path], tmp_path: Path) -> None:
    import random
    orig, ref = five_hundred
    originals = {p.name: p.read_bytes() for p in orig.iterdir()}
    modified = {p.name: p.read_bytes() for p in ref.iterdir()}
    assert len(originals) == 500 and all(originals[k] != modified[k] for k in originals)
    t0 = time.perf_counter()
    shutil.copytree(orig, tmp_path / "timing")
    sar_inplace(tmp_path / "timing", tmp_path, "--no-backup", "--restart").communicate()
    duration = time.perf_counter() - t0
    rng = random.Random(5)
    replaced_total = 0
    for i in range(10):
        tree, work = tmp_path / f"t{i}", tmp_path / f"w{i}"
        work.mkdir()
        shutil.copytree(orig, tree)
        proc = sar_inplace(tree, work, "--backup-dir", str(work / "backup"))
        time.sleep(rng.uniform(0.1, duration))
        proc.kill()
        proc.communicate()
        replaced = 0
        for path in tree.iterdir():
            if path.name.startswith(dicom_sar_temp_prefix()):
                continue  # a temporary file cut short: recognisable, never input
            data = path.read_bytes()
            assert data in (originals[path.name], modified[path.name]), (i, path.name)
            read(path)  # parses
            if data == modified[path.name]:
                replaced += 1
                assert (work / "backup" / path.name).read_bytes() == originals[path.name]
        replaced_total += replaced
        resumed = run_tool("--sar", "--inplace", "--tag", "PatientID", *GENHOSP, "--resume",
                           "--backup-dir", work / "backup", "--path", tree, cwd=work)
        if proc.returncode == 0:  # the run had finished before the kill: nothing to resume
            assert resumed.code == 2 and "nothing to resume" in resumed.err
            continue
        assert resumed.code == 0, resumed.err
        assert sorted(p.name for p in tree.iterdir()) == sorted(modified)  # no litter
        assert all((tree / name).read_bytes() == data for name, data in modified.items())
    assert 0 < replaced_total < 5000  # the kills really landed in the middle of runs


def dicom_sar_temp_prefix() -> str:
    import dicom_sar
    return dicom_sar.TEMP_PREFIX


def test_resume_never_applies_a_change_twice(five_hundred: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    orig, ref = five_hundred
    tree = tmp_path / "tree"
    shutil.copytree(orig, tree)
    proc = sar_inplace(tree, tmp_path, "--no-backup")
    deadline = time.monotonic() + 120
    while len((tmp_path / "dicom_sar.log").read_text().split("modified: ")) < 60 \
            if (tmp_path / "dicom_sar.log").exists() else True:
        assert proc.poll() is None and time.monotonic() < deadline, "60 files never committed"
        time.sleep(0.01)
    proc.kill()
    proc.communicate()
    again = run_tool("--sar", "--inplace", "--no-backup", "--tag", "PatientID", *GENHOSP,
                     "--path", tree, cwd=tmp_path)
    assert again.code == 2 and "--resume" in again.err  # refuses to double-apply silently
    journal = next(tmp_path.glob("dicom_sar-*.journal"))
    key = journal.stem.removeprefix("dicom_sar-")
    ours = f"{dicom_sar_temp_prefix()}{key}-"
    # what a kill inside a write leaves (made certain here), and another run's leftover
    (tree / f"{ours}0123456789abcdef").write_bytes(b"cut short")
    (tree / f"{dicom_sar_temp_prefix()}0000000000000000-0123456789abcdef").write_bytes(b"x")
    leftovers = len(list(tree.glob(ours + "*")))
    resumed = run_tool("--sar", "--inplace", "--no-backup", "--resume", "--tag", "PatientID",
                       *GENHOSP, "--path", tree, "--summary-json", tmp_path / "s.json",
                       cwd=tmp_path)
    assert resumed.code == 0, resumed.err
    s = json.loads((tmp_path / "s.json").read_text())
    # the interrupted run's temporary files are removed, and said so; another's stays
    assert s["temporary_files_removed"] == leftovers >= 1
    assert f"removed {leftovers} temporary files" in resumed.err
    assert [p.name for p in tree.glob(dicom_sar_temp_prefix() + "*")] == \
        [f"{dicom_sar_temp_prefix()}0000000000000000-0123456789abcdef"]
    assert s["skipped_other"] >= 60 and s["modified"] + s["skipped_other"] == 501
    for path in tree.iterdir():
        if not path.name.startswith(dicom_sar_temp_prefix()):
            assert path.read_bytes() == (ref / path.name).read_bytes(), path.name
    assert oct(journal.stat().st_mode & 0o777) == "0o600"


def test_resume_knows_every_file_name_it_journaled(generated: Path, manifest: dict,
                                                   tmp_path: Path) -> None:
    """Bytes that are not UTF-8 (a Latin-1 name from an old share), a newline, U+2028 (a
    line break to str.splitlines): a run stopped just before its journal's last line is
    resumed with every file skipped, never changed a second time."""
    tree = tmp_path / "tree"
    tree.mkdir()
    names = [os.fsdecode(b"M\xdcLLER^HANS"), "new\nline", "a\u2028b", "plain"]
    source = generated / instances(manifest, scenario="default")[0]["path"]
    for name in names:
        shutil.copy(source, tree / name)
    first = run_tool("--sar", "--inplace", "--no-backup", "--tag", "PatientID", *GENHOSP,
                     "--path", tree, cwd=tmp_path)
    assert first.code == 0, first.err
    journal = next(tmp_path.glob("dicom_sar-*.journal"))
    lines = journal.read_bytes().splitlines(keepends=True)
    assert lines[-1] == b"# complete\n"
    journal.write_bytes(b"".join(lines[:-1]))  # as if killed after the last rename
    resumed = run_tool("--sar", "--inplace", "--no-backup", "--resume", "--tag", "PatientID",
                       *GENHOSP, "--path", tree, "--summary-json", tmp_path / "s.json",
                       cwd=tmp_path)
    assert resumed.code == 0, resumed.err
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["modified"], s["skipped_other"]) == (0, len(names))
    for name in names:
        assert read(tree / name).PatientID == "GENHOSP" + read(source).PatientID


def test_a_reader_of_a_replaced_file_keeps_its_bytes(
        five_hundred: tuple[Path, Path], tmp_path: Path) -> None:
    """Every temporary file is new: a reader that had the original open reads it whole,
    and no inode that held an original is ever written to."""
    orig, ref = five_hundred
    tree = tmp_path / "tree"
    shutil.copytree(orig, tree)
    names = sorted(p.name for p in tree.iterdir())
    before = {n: (tree / n).stat().st_ino for n in names}
    held = {n: os.open(tree / n, os.O_RDONLY) for n in names[::3]}  # readers mid-way
    try:
        run = run_tool("--sar", "--inplace", "--no-backup", "--tag", "PatientID", *GENHOSP,
                       "--path", tree, "-j", "2", cwd=tmp_path)
        assert run.code == 0, run.err
        for name, fd in held.items():  # the old file, whole, as before the rename
            assert os.pread(fd, 1 << 20, 0) == (orig / name).read_bytes(), name
    finally:
        for fd in held.values():
            os.close(fd)
    assert tree_digest(tree) == tree_digest(ref)
    assert not list(tree.glob(dicom_sar_temp_prefix() + "*"))
    after = {n: (tree / n).stat().st_ino for n in names}
    assert not set(after.values()) & {before[n] for n in held}  # never written to


def test_a_replace_in_place_carries_no_owner_or_attribute_to_another_file(
        five_hundred: tuple[Path, Path], tmp_path: Path) -> None:
    orig, _ = five_hundred
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in sorted(p.name for p in orig.iterdir())[:6]:
        shutil.copy(orig / name, tree / name)
    files = sorted(tree.iterdir())
    os.setxattr(files[0], "user.note", b"belongs to this file only")  # ours, with an xattr
    foreign = os.geteuid() == 0
    if foreign:
        os.chown(files[2], 4321, 4321)  # someone else's, no xattr
    os.link(files[4], tmp_path / "archived")  # a second name, outside the tree
    archived = files[4].read_bytes()
    run = run_tool("--sar", "--inplace", "--no-backup", "--tag", "PatientID", *GENHOSP,
                   "--path", tree, "-j", "1", cwd=tmp_path)
    assert run.code == 0, run.err
    assert os.getxattr(files[0], "user.note") == b"belongs to this file only"
    for path in files[1:]:
        assert "user.note" not in os.listxattr(path), path.name
    for path in [files[1], *files[3:]]:
        assert (path.stat().st_uid, path.stat().st_gid) == (os.geteuid(), os.getegid())
    if foreign:
        assert (files[2].stat().st_uid, files[2].stat().st_gid) == (4321, 4321)
    assert (tmp_path / "archived").read_bytes() == archived  # that inode is never reused


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_stop_cleanly_with_a_summary(sig: int, code: int,
                                             five_hundred: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    orig, ref = five_hundred
    tree = tmp_path / "tree"
    shutil.copytree(orig, tree)
    proc = sar_inplace(tree, tmp_path, "--no-backup")
    # the signal comes once the first file is staged: a batch is then in flight, and the
    # tree cannot be finished before the signal lands (a batch commits up to 256 files)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(dicom_sar_temp_prefix()) for p in os.scandir(tree)):
        assert proc.poll() is None, "the run ended before a file was staged"
        assert time.monotonic() < deadline, "no file was staged"
        time.sleep(0.002)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert b"summary" in err and b"--resume" in err
    done = sum(p.read_bytes() == (ref / p.name).read_bytes() for p in tree.iterdir())
    assert 0 < done < 500
    assert not list(tree.glob(dicom_sar_temp_prefix() + "*"))  # in-flight files finished


@contextlib.contextmanager
def read_only(path: Path):
    """Make path read-only even for root (immutable attribute), or by mode bits otherwise."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(mode & 0o555)
        try:
            yield
        finally:
            path.chmod(mode)


def test_read_only_file_and_directory_are_errors_for_that_file(
        generated: Path, manifest: dict, tmp_path: Path) -> None:
    entries = instances(manifest, scenario="multi_patient")[:3]
    tree = tmp_path / "in"
    for sub, e in zip(("ok", "rodir", "rofile"), entries, strict=True):
        (tree / sub).mkdir(parents=True)
        shutil.copy(generated / e["path"], tree / sub / "f")
    before = tree_digest(tree)
    with read_only(tree / "rodir"), read_only(tree / "rofile" / "f"):
        run = run_tool("--sar", "--inplace", "--tag", "PatientID", *GENHOSP, "--path", tree,
                       "--backup-dir", tmp_path / "backup", cwd=tmp_path)
    assert run.code == 1
    after = tree_digest(tree)
    assert after["rodir/f"] == before["rodir/f"] and after["rofile/f"] == before["rofile/f"]
    assert after["ok/f"] != before["ok/f"]
    errors = (tmp_path / "errors.log").read_text().splitlines()
    assert len(errors) == 2 and {"rodir" in e for e in errors} == {True, False}


def test_a_file_replaced_during_processing_is_left_alone(generated: Path, manifest: dict,
                                                         tmp_path: Path, monkeypatch) -> None:
    import dicom_sar
    tree = make_tree(tmp_path, generated, instances(manifest, scenario="default")[:2])
    victim, other = sorted(tree.iterdir())
    newcomer = other.read_bytes()
    real = dicom_sar.splice_patches

    def replace_then_plan(path, ds, planned):  # someone swaps the file in mid-flight
        patches = real(path, ds, planned)
        if path == victim:
            (tmp_path / "swap").write_bytes(newcomer)
            os.replace(tmp_path / "swap", victim)
        return patches

    monkeypatch.setattr(dicom_sar, "splice_patches", replace_then_plan)
    opts = dicom_sar.options_from_args(dicom_sar.build_parser().parse_args(
        ["--sar", "--inplace", "--no-backup", "--tag", "PatientID", *GENHOSP, "--path",
         str(tree)]))
    result = sar_one(opts, dicom_sar.Candidate(victim, tree))
    assert result.status == "error" and "changed while it was being processed" in result.message
    assert victim.read_bytes() == newcomer  # the newcomer is left exactly as it arrived


def test_a_file_deleted_after_discovery_is_one_error(generated: Path, manifest: dict,
                                                     tmp_path: Path) -> None:
    import dicom_sar
    tree = make_tree(tmp_path, generated, instances(manifest, scenario="default")[:3])
    opts = dicom_sar.options_from_args(dicom_sar.build_parser().parse_args(
        ["--sar", "--inplace", "--no-backup", "--tag", "PatientID", *GENHOSP, "--path",
         str(tree)]))
    found = list(dicom_sar.discover(opts, []))
    found[1].path.unlink()  # gone between the walk and its turn on the pool
    results = list(dicom_sar.committed(dicom_sar.run_ordered(
        iter(found), lambda c: dicom_sar.sar_task(c, opts), 2, dicom_sar.threading.Event()),
        dicom_sar.Committer(opts.fsync)))
    assert [r.status for r in results] == ["modified", "error", "modified"]
    assert results[1].error_type == "FileNotFoundError"
    assert not list(tree.glob(dicom_sar_temp_prefix() + "*"))


def test_writes_never_follow_a_symlink_out_of_the_tree(generated: Path, manifest: dict,
                                                       tmp_path: Path) -> None:
    entries = instances(manifest, scenario="default")[:2]
    tree = make_tree(tmp_path, generated, entries[:1])
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(generated / entries[1]["path"], outside / "target")
    (tree / "link").symlink_to(outside / "target")
    (tree / "dirlink").symlink_to(outside, target_is_directory=True)
    before = (outside / "target").read_bytes()
    run = run_tool("--sar", "--inplace", "--tag", "PatientID", *GENHOSP, "--path", tree,
                   "--backup-dir", tmp_path / "backup", cwd=tmp_path)
    assert run.code == 0, run.err  # the link is reported as skipped, not followed
    assert "symlink" in run.log() and (outside / "target").read_bytes() == before
    run = run_tool("--sar", "--inplace", "--follow-symlinks", "--tag", "PatientID", *GENHOSP,
                   "--path", tree, "--backup-dir", tmp_path / "backup2", "--log-dir",
                   tmp_path / "l2", cwd=tmp_path)
    assert run.code == 1  # even when followed, nothing outside the tree is replaced in place
    errors = (tmp_path / "l2" / "errors.log").read_text().splitlines()
    assert len(errors) == 2
    assert "refusing to replace a symlink" in "".join(e for e in errors if "/link:" in e)
    assert "outside the tree" in "".join(e for e in errors if "dirlink/target" in e)
    assert (outside / "target").read_bytes() == before and (tree / "link").is_symlink()
    run = run_tool("--sar", "--follow-symlinks", "--tag", "PatientID", *GENHOSP, "--path",
                   tree, "--output", tmp_path / "out", "--log-dir", tmp_path / "l3",
                   cwd=tmp_path)
    assert run.code == 0, run.err  # to an output tree, linked content lands inside it
    written = {p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*")
               if p.is_file()}
    assert {Path("link"), Path("dirlink/target")} <= written
    assert not any(p.is_symlink() for p in (tmp_path / "out").rglob("*"))
    assert (outside / "target").read_bytes() == before
    assert sorted(p.name for p in outside.iterdir()) == ["target"]


def test_an_output_tree_whose_directory_links_elsewhere_gets_nothing_through_it(
        generated: Path, manifest: dict, tmp_path: Path) -> None:
    """A directory of the output tree that is a symlink out of it: every file bound for it
    is refused (the thread remembers only directories found inside), the others written."""
    entries = instances(manifest, scenario="default")[:3]
    tree = tmp_path / "in"
    for name, entry in zip(["a/one", "a/two", "b/three"], entries, strict=True):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(generated / entry["path"], tree / name)
    outside, out = tmp_path / "outside", tmp_path / "out"
    outside.mkdir()
    out.mkdir()
    (out / "a").symlink_to(outside, target_is_directory=True)
    run = run_tool("--sar", "--tag", "PatientID", *GENHOSP, "--path", tree, "--output", out,
                   "-j", "1", cwd=tmp_path)
    assert run.code == 1, run.err
    errors = (tmp_path / "errors.log").read_text().splitlines()
    assert len(errors) == 2 and all("refusing to write outside" in e for e in errors)
    assert not list(outside.iterdir())
    assert pydicom.dcmread(out / "b" / "three").PatientID.startswith("GENHOSP")


def test_values_appear_in_logs_only_with_verbose(generated: Path, manifest: dict,
                                                 tmp_path: Path) -> None:
    entry = instances(manifest, scenario="default")[0]
    tree = tmp_path / "in"
    tree.mkdir()
    shutil.copy(generated / entry["path"], tree / "x")
    for flag, visible in (([], False), (["--verbose"], True)):
        logs = tmp_path / ("v" if visible else "q")
        run = run_tool("--sar", *flag, "--tag", "PatientID", *GENHOSP, "--path", tree,
                       "--output", tmp_path / f"out{visible}", "--log-dir", logs, cwd=tmp_path)
        assert run.code == 0, run.err
        assert (entry["patient_id"] in (logs / "dicom_sar.log").read_text()) is visible


@pytest.mark.skipif(not FREE_THREADED_BUILD,
                    reason="with the GIL, a regex stuck in C holds the interpreter; "
                           "the time limit needs python3.13t")
def test_a_catastrophic_regex_is_cut_off_by_the_time_limit(tmp_path: Path) -> None:
    run = run_tool("--generate", "--scenario", "multi_patient", "--patients", "10",
                   "--studies", "1", "--size", "8x8", "--layout", "flat", "--seed", "4",
                   "--output", tmp_path / "in", cwd=tmp_path)
    assert run.code == 0, run.err
    (tmp_path / "in" / "manifest.json").unlink()
    victim = sorted((tmp_path / "in").iterdir())[7]
    ds = read(victim)
    ds.PatientID = "a" * 40 + "!"  # (a+)+$ backtracks 2**40 times on this
    ds.save_as(victim)
    before = victim.read_bytes()
    t0 = time.monotonic()
    run = run_tool("--sar", "--tag", "PatientID", "--regex_search", r"^(?:(a+)+$|PAT(.*))$",
                   "--regex_replace", r"GENHOSP\2", "--inplace", "--path", tmp_path / "in",
                   "-j", "2", "--time-limit", "2", "--summary-json", tmp_path / "s.json",
                   cwd=tmp_path, timeout=120)
    assert time.monotonic() - t0 < 60
    assert run.code == 1, run.err
    (line,) = (tmp_path / "errors.log").read_text().splitlines()
    assert victim.name in line and "TimeLimit" in line
    assert victim.read_bytes() == before
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["modified"] == 39 and s["errors"] == 1
    assert all(str(read(p).PatientID).startswith("GENHOSP")
               for p in (tmp_path / "in").iterdir() if p != victim)


@pytest.mark.parametrize("tags", ["PatientID", "PatientName,StudyDescription",
                                  "SOPInstanceUID", "AccessionNumber,InstitutionName"])
def test_raw_header_path_writes_exactly_what_the_pydicom_path_writes(
        tags: str, generated: Path, fuzz_tree: Path, tmp_path: Path) -> None:
    """Plain top-level tags are planned from a raw scan; every outcome must be the same."""
    import dataclasses

    import dicom_sar
    from conftest import pydicom_files
    dicom_sar.load_pydicom()
    files = [*pydicom_files(), *(p for p in generated.rglob("*") if p.is_file()),
             *sorted(fuzz_tree.iterdir())]
    fast = dicom_sar.options_from_args(dicom_sar.build_parser().parse_args(
        ["--sar", "--tag", tags, "--regex_search", r"^(.*?)(\s*)$", "--regex_replace",
         r"X\1", "--no-fsync", "--output", str(tmp_path / "fast"), "--path", "/"]))
    assert fast.fast
    slow = dataclasses.replace(fast, fast=False, output=tmp_path / "slow")
    used = 0
    for path in files:
        cand = dicom_sar.Candidate(path, path)
        a = sar_one(fast, cand)
        b = sar_one(slow, cand)
        assert (a.status, a.message, a.changes, a.rejections) == \
               (b.status, b.message, b.changes, b.rejections), path
        if a.status == "modified":
            written = (tmp_path / "fast" / path.name).read_bytes()
            assert written == (tmp_path / "slow" / path.name).read_bytes(), path
        try:
            dicom_sar.raw_header(path, [s.leaf.tag for s in fast.specs])
            used += 1
        except dicom_sar.RAW_FALLBACK:
            pass
    assert used > len(files) // 2  # the raw path really answers for most files


# search/replace rules: longer, shorter, emptied, doubled (often too long), non-ASCII
# (outside the default repertoire), far too long for any VR here
PROPERTY_RULES = [(r"^(.*)$", r"GENHOSP\1"), (r"[aeiouAEIOU]", ""), (r"^.*$", ""),
                  (r"(.)", r"\1\1"), (r"A", "Ä"), (r"[0-9]", "X" * 70)]


def spliced_expectation(original: bytes, encoded: dict[int, bytes]) -> bytes:
    """original with only the length field and value of each changed top-level element
    replaced by its new encoding (offsets, lengths and VRs from pydicom's own reader)."""
    old = pydicom.dcmread(io.BytesIO(original), force=True)
    implicit, little = old.original_encoding
    expected = bytearray(original)
    for tag in sorted(encoded, key=lambda t: -old.get_item(t).value_tell):
        raw = old.get_item(tag)
        size = 4 if implicit or raw.VR in ("UC", "UT", "UR") else 2
        field = struct.pack(("<" if little else ">") + ("I" if size == 4 else "H"),
                            len(encoded[tag]))
        expected[raw.value_tell - size:raw.value_tell + raw.length] = field + encoded[tag]
    return bytes(expected)


@property_settings(200)
@given(dicom_files(), st.data(), st.sampled_from(PROPERTY_RULES))
def test_property_the_splice_writes_what_a_full_rewrite_writes(
        file: tuple[bytes, list[str]], draw: st.DataObject, rule: tuple[str, str]) -> None:
    """On any well-formed file, the fast path (raw header scan, patched head, kernel copy of
    the rest) decides as pydicom's full read does, writes the same dataset as pydicom's full
    rewrite, and leaves every byte outside the changed elements as it was."""
    import dicom_sar
    dicom_sar.load_pydicom()
    data, present = file
    tags = draw.draw(st.lists(st.sampled_from([*present, "StudyID"]), min_size=1, max_size=2,
                              unique=True))  # mostly elements the file has
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in" / "f"
        source.parent.mkdir()
        source.write_bytes(data)
        opts = dicom_sar.options_from_args(dicom_sar.build_parser().parse_args(
            ["--sar", "--tag", ",".join(tags), "--regex_search", rule[0], "--regex_replace",
             rule[1], "--no-fsync", "--output", str(Path(tmp) / "out"), "--path",
             str(source.parent)]))
        assert opts.fast
        result = sar_one(opts, dicom_sar.Candidate(source, source.parent))
        full, _, _ = dicom_sar.read_dataset(source, header_only=False)
        planned, rejections = dicom_sar.plan_changes(full, opts)
        event(result.status)
        assert result.status == ("rejected" if rejections else
                                 "modified" if planned else "unchanged"), result.message
        assert [c.label for c in result.changes] == [p.change.label for p in planned]
        if result.status != "modified":
            assert not (Path(tmp) / "out").exists()
            return
        written = (Path(tmp) / "out" / "f").read_bytes()
        dicom_sar.apply_changes(full, planned)
        with open(Path(tmp) / "rewrite", "wb", buffering=0) as out:
            dicom_sar.write_dataset(full, out)
        theirs = pydicom.dcmread(Path(tmp) / "rewrite")
    ours = pydicom.dcmread(io.BytesIO(written))
    assert ours == theirs and ours.file_meta == theirs.file_meta
    assert written == spliced_expectation(data, {p.tag: p.encoded for p in planned})


def test_an_element_already_decoded_is_never_patched_at_a_guessed_offset(
        generated: Path, manifest: dict, tmp_path: Path) -> None:
    """An element pydicom has converted is planned where it lies in the file, or as not
    known (then the file is rewritten whole), never at the dataset's start."""
    import dicom_sar
    source = generated / instances(manifest, scenario="default")[0]["path"]
    opts = dicom_sar.options_from_args(dicom_sar.build_parser().parse_args(
        ["--sar", "--tag", "PatientID", *GENHOSP, "--output", str(tmp_path / "out"),
         "--path", str(source.parent)]))
    dicom_sar.load_pydicom()
    ds, _, _, _ = dicom_sar.header_with(source, [0x00100020])
    offset = ds.get_item(0x00100020).value_tell
    raw = dicom_sar.plan_changes(ds, opts)[0][0]
    assert raw.value_offset == offset > 0
    assert ds.PatientID  # pydicom decodes it in place
    decoded = dicom_sar.plan_changes(ds, opts)[0][0]
    assert decoded.encoded == raw.encoded and decoded.value_offset in (None, offset)
    if decoded.value_offset is None:
        assert dicom_sar.splice_patches(source, ds, [decoded]) is None


def test_a_decoded_element_in_an_item_keeps_its_file_offset(tmp_path: Path) -> None:
    """Layout.value_offset answers the same before and after pydicom decodes an element of a
    sequence item (pydicom keeps the offset relative to the sequence's value, as raw)."""
    from pydicom.dataset import Dataset, FileMetaDataset

    import dicom_sar
    dicom_sar.load_pydicom()
    ds = Dataset()
    ds.PatientID = "TOP"
    other = Dataset()
    other.PatientID = "INSIDE"
    ds.OtherPatientIDsSequence = [other]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(tmp_path / "f", enforce_file_format=False)
    data = (tmp_path / "f").read_bytes()
    read, _, _ = dicom_sar.read_dataset(tmp_path / "f", header_only=True)
    layout = dicom_sar.Layout()
    item = layout.sequence(read, 0x00101002).value[0]
    raw = layout.value_offset(item, 0x00100020)
    assert data[raw:raw + 6] == b"INSIDE"
    assert item.PatientID == "INSIDE"  # pydicom decodes it in place
    assert layout.value_offset(item, 0x00100020) == raw


@property_settings(300)
@given(dicom_files(), st.sampled_from(DAMAGE), st.data(),
       st.sampled_from(["PatientID", "PatientName,StudyID", "Modality"]),
       st.sampled_from(PROPERTY_RULES[:4]))
def test_property_on_damaged_files_raw_planning_decides_as_pydicom_planning(
        file: tuple[bytes, list[str]], damage: str, draw: st.DataObject, tags: str,
        rule: tuple[str, str]) -> None:
    """A damaged file (see conftest.damaged): planning from the raw header scan and from
    pydicom's header give the same outcome, message and changes, and the same bytes."""
    import dataclasses

    import dicom_sar
    dicom_sar.load_pydicom()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in" / "f"
        source.parent.mkdir()
        source.write_bytes(damaged(file[0], damage, draw))
        fast = dicom_sar.options_from_args(dicom_sar.build_parser().parse_args(
            ["--sar", "--tag", tags, "--regex_search", rule[0], "--regex_replace", rule[1],
             "--no-fsync", "--output", str(Path(tmp) / "fast"), "--path", str(source.parent)]))
        slow = dataclasses.replace(fast, fast=False, output=Path(tmp) / "slow")
        cand = dicom_sar.Candidate(source, source.parent)
        a = sar_one(fast, cand)
        b = sar_one(slow, cand)
        event(f"{damage}: {a.status}")
        assert (a.status, a.message, a.changes, a.rejections) == \
               (b.status, b.message, b.changes, b.rejections)
        if a.status == "modified":
            assert (Path(tmp) / "fast" / "f").read_bytes() == \
                   (Path(tmp) / "slow" / "f").read_bytes()


def damaged_real_copies(real_files: list[Path], where: Path) -> dict[str, str]:
    """Damaged copies of real files, by name: cut short, a length made huge, a sequence
    delimiter removed; each with a string element for --force to change."""
    import dicom_sar
    where.mkdir()
    made: dict[str, str] = {}
    sources = [p for p in real_files if p.stat().st_size < 4_000_000
               and dicom_sar.unreadable(p) is None and b"\xfe\xff\xdd\xe0" in p.read_bytes()
               and p.read_bytes()[128:132] == b"DICM"][:6]
    assert len(sources) >= 4
    for i, src in enumerate(sources):
        data = src.read_bytes()
        (where / f"cut{i}").write_bytes(data[:len(data) * 2 // 3])
        made[f"cut{i}"] = "cut short"
        at = data.index(b"\xfe\xff\xdd\xe0")
        (where / f"nodelim{i}").write_bytes(data[:at] + data[at + 8:])
        made[f"nodelim{i}"] = "delimiter removed"
        huge = bytearray(data)
        item = data.index(b"\xfe\xff\x00\xe0")
        huge[item + 4:item + 8] = struct.pack("<I", 1735296451)
        (where / f"huge{i}").write_bytes(bytes(huge))
        made[f"huge{i}"] = "length made huge"
    return made


def test_a_sar_never_modifies_a_file_it_cannot_read_to_its_end(real_files: list[Path],
                                                               tmp_path: Path) -> None:
    """--force reads every string element: damaged copies of real files are refused,
    untouched, with the reason, and --dump reports the same files unreadable."""
    tree = tmp_path / "in"
    made = damaged_real_copies(real_files, tree)
    before = tree_digest(tree)
    run = run_tool("--sar", "--force", "--inplace", "--no-backup", "--regex_search", "A",
                   "--regex_replace", "B", "--path", tree, "--summary-json",
                   tmp_path / "s.json", cwd=tmp_path)
    assert run.code == 1, run.err
    assert tree_digest(tree) == before  # not one byte changed
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["modified"] == 0 and s["errors"] == len(made)
    refused = {line.split(": ")[0].rsplit("/", 1)[-1] for line in
               (tmp_path / "errors.log").read_text().splitlines()}
    assert refused == set(made)
    dump = run_tool("--dump", "--path", tree, "--summary-json", tmp_path / "d.json",
                    cwd=tmp_path)
    assert dump.code == 1
    assert json.loads((tmp_path / "d.json").read_text())["errors"] == len(made)


def test_an_output_tree_from_read_only_sources_is_writable(generated: Path, manifest: dict,
                                                          tmp_path: Path) -> None:
    tree = tmp_path / "ro"
    for i, e in enumerate(instances(manifest, scenario="multi_patient")[:6]):
        (tree / f"d{i}").mkdir(parents=True)
        shutil.copy(generated / e["path"], tree / f"d{i}" / f"f{i}")
    odd = tree / "d0" / "f0"
    ds = read(odd)
    ds.PatientID = "NOMATCH"  # unmodified: copied by --copy-unmodified
    ds.save_as(odd)
    for path in tree.rglob("*"):
        path.chmod(0o555 if path.is_dir() else 0o444)
    (tree / "d1" / "f1").chmod(0o440)
    run = run_tool("--sar", "--tag", "PatientID", "--regex_search", "^PAT", "--regex_replace",
                   "GEN", "--copy-unmodified", "--path", tree, "--output", tmp_path / "out",
                   cwd=tmp_path)
    assert run.code == 0, run.err
    out = tmp_path / "out"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == 6
    for path in files:
        mode = path.stat().st_mode & 0o777
        source = (tree / path.relative_to(out)).stat().st_mode & 0o777
        assert mode == source | 0o200, path
    assert all(p.stat().st_mode & 0o300 == 0o300 for p in out.rglob("*") if p.is_dir())
    inplace = tmp_path / "inplace"
    shutil.copytree(tree, inplace)
    (inplace / "d2" / "f2").chmod(0o444)
    run = run_tool("--sar", "--inplace", "--no-backup", "--tag", "PatientID",
                   "--regex_search", "^PAT", "--regex_replace", "GEN", "--path", inplace,
                   cwd=tmp_path)
    assert run.code == 0, run.err
    assert (inplace / "d2" / "f2").stat().st_mode & 0o777 == 0o444  # kept exactly
    assert read(inplace / "d2" / "f2").PatientID.startswith("GEN")


def test_without_linux_only_calls_the_output_is_the_same(generated: Path, manifest: dict,
                                                         tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No copy_file_range or listxattr (macOS): slower, the same bytes."""
    import dicom_sar
    dicom_sar.load_pydicom()
    sources = [generated / e["path"] for e in instances(manifest, scenario="multi_patient")[:4]]

    def sar(tree: Path, *extra: str) -> dict[str, str]:
        tree.mkdir()
        for i, src in enumerate(sources):
            shutil.copy(src, tree / f"f{i}")
        args = ["--sar", "--tag", "PatientID", *GENHOSP, "--path", str(tree), "-j", "1",
                "--log-dir", str(tree.parent / (tree.name + "_logs")), "--no-progress", *extra]
        assert dicom_sar.main(args) == 0
        return tree_digest(tree if "--inplace" in extra else tree.parent / (tree.name + "_o"))

    normal_tree = sar(tmp_path / "a", "--output", str(tmp_path / "a_o"))
    normal_inplace = sar(tmp_path / "b", "--inplace", "--no-backup")
    for name in ("copy_file_range", "listxattr"):
        monkeypatch.delattr(os, name, raising=False)
    monkeypatch.setattr(shutil, "_copyxattr", lambda *a, **k: None)  # shutil's, without them
    assert sar(tmp_path / "c", "--output", str(tmp_path / "c_o")) == normal_tree
    assert sar(tmp_path / "d", "--inplace", "--no-backup") == normal_inplace


# ── group commit: durable before the rename, journalled in between, killable anywhere ─────

def sar_traced(tree: Path, work: Path, *strace: str) -> subprocess.CompletedProcess[bytes]:
    """An in-place SAR (with backups, journalled) run under strace with these options."""
    need("strace")
    return subprocess.run(
        ["strace", "-f", "-qq", *strace, sys.executable, str(TOOL), "--sar", "--inplace",
         "--tag", "PatientID", *GENHOSP, "-j", "2", "--no-progress", "--path", str(tree),
         "--backup-dir", str(work / "backup")],
        cwd=work, capture_output=True, timeout=300)


SYSCALL = re.compile(r"^(?P<pid>\d+) +(?:<\.\.\. (?P<resumed>\w+) resumed>|(?P<name>\w+)\()"
                     r"(?P<rest>.*)$")


def test_every_rename_follows_the_flush_of_its_file_and_of_its_journal_line(
        five_hundred: tuple[Path, Path], tmp_path: Path) -> None:
    """The order of the system calls, as strace sees them: each temporary file is created,
    then flushed by a syncfs that began after it was written, then its journal line is
    flushed, then it is renamed over the original; its directory is flushed after."""
    orig, ref = five_hundred
    tree, work = tmp_path / "tree", tmp_path / "work"
    shutil.copytree(orig, tree)
    work.mkdir()
    trace = work / "trace"
    run = sar_traced(tree, work, "-o", str(trace), "-e",
                     "trace=openat,syncfs,fdatasync,fsync,rename,renameat,renameat2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert all((tree / p.name).read_bytes() == p.read_bytes() for p in ref.iterdir())
    calls = unfinished = 0
    journal_fds: set[str] = set()
    directory_fds: set[str] = set()
    pending: dict[str, str] = {}  # pid -> syscall begun, not yet returned
    written: set[str] = set()  # temporary files created, not yet flushed
    flushing: set[str] = set()  # those a syncfs in progress covers
    flushed: set[str] = set()  # on disk, waiting for their journal line's flush
    journalled: set[str] = set()  # ready to be renamed
    renamed = 0
    last_directory_flush = last_rename = -1
    for n, line in enumerate(trace.read_text().splitlines()):
        m = SYSCALL.match(line)
        if not m:
            continue
        calls += 1
        name, rest = m["name"] or m["resumed"], m["rest"]
        if m["name"] and rest.endswith("<unfinished ...>"):
            pending[m["pid"]] = line
            unfinished += 1
            if name == "syncfs":
                flushing = set(written)  # what was written before the flush began
            continue
        if m["resumed"]:
            begun = pending.pop(m["pid"])
            rest = SYSCALL.match(begun)["rest"].removesuffix("<unfinished ...>").rstrip() + rest
        result = rest.rsplit("= ", 1)[-1].split()[0]
        if name == "openat" and result.isdigit():
            path = rest.split('"')[1]
            if "O_CREAT" in rest and Path(path).name.startswith(dicom_sar_temp_prefix()):
                written.add(path)
            elif path.endswith(".journal"):
                journal_fds.add(result)
            elif "O_DIRECTORY" in rest:
                directory_fds.add(result)
        elif name == "syncfs" and result == "0":
            if not m["resumed"]:
                flushing = set(written)
            flushed |= flushing
            written -= flushing
            flushing = set()
        elif name == "fdatasync" and rest.split(")")[0] in journal_fds and result == "0":
            journalled |= flushed
            flushed = set()
        elif name == "fsync" and rest.split(")")[0] in directory_fds:
            last_directory_flush = n
        elif name.startswith("rename"):
            source = rest.split('"')[1]
            if Path(source).name.startswith(dicom_sar_temp_prefix()):
                assert source in journalled, line  # flushed, journalled, only then renamed
                journalled.discard(source)
                renamed += 1
                last_rename = n
    assert renamed == 500 and not journalled and not flushed
    assert last_directory_flush > last_rename  # the renames themselves made durable
    assert calls > 1000 and unfinished > 0  # the trace really held the threads' calls


@pytest.mark.parametrize("kill", ["syncfs:when=1", "syncfs:when=2",
                                  "rename,renameat,renameat2:when=1",
                                  "rename,renameat,renameat2:when=200",
                                  "rename,renameat,renameat2:when=420",
                                  "fdatasync:when=1"])
def test_a_kill_during_a_batch_leaves_every_file_whole_and_resume_finishes_once(
        kill: str, five_hundred: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGKILL exactly at a batch's flush, its journal's flush, or inside its renames: each
    file is its original or its modified version, the backups hold the originals, and
    --resume finishes the run exactly once with no litter."""
    orig, ref = five_hundred
    tree, work = tmp_path / "tree", tmp_path / "work"
    shutil.copytree(orig, tree)
    work.mkdir()
    calls, when = kill.split(":")
    run = sar_traced(tree, work, "-o", "/dev/null", "-e", f"trace={calls}", "-e",
                     f"inject={calls}:signal=SIGKILL:{when}")
    assert run.returncode != 0  # killed
    modified = 0
    for path in tree.iterdir():
        if path.name.startswith(dicom_sar_temp_prefix()):
            continue
        data = path.read_bytes()
        assert data in ((orig / path.name).read_bytes(), (ref / path.name).read_bytes())
        if data == (ref / path.name).read_bytes():
            modified += 1
            assert (work / "backup" / path.name).read_bytes() == \
                (orig / path.name).read_bytes()
    if calls.startswith("rename"):
        assert modified == int(when.removeprefix("when=")) - 1  # the renames before the kill
    else:
        assert modified < 500
    resumed = run_tool("--sar", "--inplace", "--tag", "PatientID", *GENHOSP, "--resume",
                       "--backup-dir", work / "backup", "--path", tree, cwd=work)
    assert resumed.code == 0, resumed.err
    assert sorted(p.name for p in tree.iterdir()) == sorted(p.name for p in ref.iterdir())
    for path in ref.iterdir():
        assert (tree / path.name).read_bytes() == path.read_bytes(), path.name
        assert (work / "backup" / path.name).read_bytes() == (orig / path.name).read_bytes()
