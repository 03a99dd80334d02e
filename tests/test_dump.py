"""--dump: dcmdump-compatible lines (checked against DCMTK), JSON, --count."""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import (
    DAMAGE,
    PROPERTY_TAGS,
    ROOT,
    as_part10,
    damaged,
    dcmdump,
    dicom_files,
    instances,
    property_settings,
    run_into_head,
    run_tool,
    squeeze,
)

# text VRs, PN with several groups, numbers, dates and times, UIDs, multi-valued CS, sequences
ORACLE_TAGS = ["PatientID", "PatientName", "InstitutionName", "StudyDescription",
               "SeriesDescription", "ReferringPhysicianName", "StationName", "AccessionNumber",
               "Rows", "BitsAllocated", "PixelSpacing", "WindowCenter", "InstanceNumber",
               "SliceThickness", "ImagePositionPatient", "StudyDate", "StudyTime",
               "AcquisitionDateTime", "StudyInstanceUID", "SOPClassUID", "Modality",
               "ImageType", "OtherPatientIDsSequence", "ReferencedImageSequence"]


def by_file(lines: list[str], prefix_sep: str = ": ") -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = collections.defaultdict(list)
    for line in lines:
        path, _, rest = line.partition(prefix_sep)
        grouped[path].append(rest)
    return grouped


# The differences from dcmdump +U8 we keep, each on purpose (README, Decisions):
UID_NAME = re.compile(r"^(\S+ UI )=\S+")  # DCMTK's own UID names; ours are pydicom's keywords
KEPT = {
    "UID names": lambda line: UID_NAME.sub(r"\1=<uid>", line),
    "transfer syntax names": lambda line: "# Used TransferSyntax: <ts>"
    if line.startswith("# Used TransferSyntax") else line,
    "the character set line +U8 rewrites": lambda line: "" if line.startswith("(0008,0005)")
    else line,
    # FL/FD: DCMTK's own float formatter prints other last digits than a correct rounding
    "last digits of FL and FD values": lambda line: re.sub(
        r"^(\s*\S+ (?:FL|FD|OF|OD) )\S+", r"\1<float>", line),
    # DCMTK's private dictionary names differ from pydicom's (both from GDCM's, renamed),
    # and pydicom's knows VRs of implicit VR private elements where DCMTK's has none
    "private tag names and VRs": lambda line: re.sub(
        r"^(\s*\S+) \S\S (.*#\s*(?:u/l|\d+),)\s*\d+ [^#]*$", r"\1 <vr> \2 <vm> <name>", line)
    if PRIVATE_ELEMENT.match(line) else line,
    # pydicom's dictionary is a newer edition: it has retired tags DCMTK 3.6.7's has not
    "RETIRED_ after a newer edition": lambda line: re.sub(r"(#\s*(?:u/l|\d+),\s*\d+) RETIRED_",
                                                        r"\1 ", line),
    # DCMTK shows US-or-SS as xs where the dataset does not say which; pydicom reads US
    "xs for US or SS": lambda line: re.sub(r"^(\s*\S+) xs ", r"\1 US ", line),
}
PRIVATE_ELEMENT = re.compile(r"\s*\([0-9a-f]{3}[13579bdf],(?!00)[0-9a-f]{4}\)")


def kept_differences(lines: list[str]) -> list[str]:
    for rule in KEPT.values():
        lines = [rule(line) for line in lines]
    return [line for line in lines if line]


def dumps_of(files: list[Path], tmp_path: Path, tags: list[str]) -> tuple[dict, dict]:
    """(our lines by file name, the tree) for a tree holding copies of files."""
    tree = tmp_path / "files"
    tree.mkdir()
    names = {}
    for i, src in enumerate(files):
        names[f"{i:03d}_{src.name}"] = src
        shutil.copy(src, tree / f"{i:03d}_{src.name}")  # no extensions, like the user's files
    args = [x for t in tags for x in ("--tag", t)]
    run = run_tool("-q", "--dump", "--with-filename", "-j", "2", "--path", tree, *args,
                   cwd=tmp_path)
    assert run.code == 0, run.err
    ours: dict[str, list[str]] = collections.defaultdict(list)
    last = ""
    for line in run.out.splitlines():
        if line.startswith(f"{tree}/"):
            last, _, rest = line.partition(": ")
            ours[last].append(rest)
        else:  # a value with a newline in it goes on, as in dcmdump, on a line of its own
            ours[last].append(line)
    return {name: ours.get(str(tree / name), []) for name in names}, tree


def test_tag_lines_equal_dcmdump_for_every_readable_real_file(
        readable_real_files: list[Path], tmp_path: Path) -> None:
    """Every real file dcmdump reads cleanly (pydicom's and the corpus), line for line."""
    ours, tree = dumps_of(readable_real_files, tmp_path, ORACLE_TAGS)
    compared = 0
    for name, lines in ours.items():
        oracle = dcmdump("+U8", *[x for t in ORACLE_TAGS for x in ("+P", t)], tree / name)
        expected = squeeze(oracle.stdout.decode("utf-8", "surrogateescape"))
        assert kept_differences(squeeze("\n".join(lines))) == kept_differences(expected), name
        compared += len(expected)
    assert len(ours) >= 250 and compared >= 2500  # the comparison really covered the files


# full dumps: what DCMTK shows that no dictionary of pydicom's holds (DICOMDIR records)
DICOMDIR_ONLY = re.compile(r"^(# offset=|\(fffe,e000\) na \"Directory Record\")|^\(0004,1[24]\d0\)")


def test_full_header_dump_equals_dcmdump_for_every_readable_real_file(
        readable_real_files: list[Path], tmp_path: Path) -> None:
    ours, tree = dumps_of(readable_real_files, tmp_path, [])
    equal = 0
    for name, lines in ours.items():
        oracle = dcmdump("+U8", tree / name).stdout.decode("utf-8", "surrogateescape")
        mine, theirs = kept_differences(squeeze("\n".join(lines))), \
            kept_differences(squeeze(oracle))
        if any(DICOMDIR_ONLY.match(x) for x in theirs):
            continue  # DCMTK dumps a DICOMDIR's records its own way (listed in Decisions)
        assert mine == theirs, name
        equal += 1
    assert equal >= 250


def test_multi_valued_and_nested_instances_print_like_dcmdump(generated: Path,
                                                              manifest: dict) -> None:
    path = generated / instances(manifest, scenario="nested_sequences")[0]["path"]
    run = run_tool("--dump", "--tag", "PatientID", "--tag", "ImageType", "--path", path,
                   cwd=generated.parent)
    lines = squeeze(run.out)
    assert len([x for x in lines if "PatientID" in x]) == 2  # top level and inside the item
    assert lines == squeeze(dcmdump("+U8", "+P", "PatientID", "+P", "ImageType",
                                    path).stdout.decode())


def test_full_header_dump_matches_dcmdump(generated: Path, manifest: dict) -> None:
    for scenario in ("default", "nested_sequences", "compressed"):
        path = generated / instances(manifest, scenario=scenario)[0]["path"]
        ours = squeeze(run_tool("--dump", "--path", path, cwd=generated.parent).out)
        theirs = squeeze(dcmdump("+U8", path).stdout.decode())
        # DCMTK's own UID names, and the character set that +U8 rewrites
        skip = ("# Used TransferSyntax", "(0002,0010)", "(0002,0012)", "(0008,0005)")
        assert [x for x in ours if not x.startswith(skip)] == \
               [x for x in theirs if not x.startswith(skip)], scenario
        assert not any(len(x) > 200 for x in ours)  # pixel data summarised, not printed


def test_with_filename_prefixes_every_line(generated: Path, manifest: dict) -> None:
    path = generated / instances(manifest, scenario="default")[0]["path"]
    out = run_tool("--dump", "--with-filename", "--path", path, cwd=generated.parent).out
    assert out.strip() and all(line.startswith(f"{path}: ") for line in out.splitlines())


def test_json_round_trips_through_pydicom(generated: Path, manifest: dict) -> None:
    entry = instances(manifest, scenario="charset_utf8")[0]
    path = generated / entry["path"]
    run = run_tool("--dump", "--format", "json", "--tag", "PatientName,PatientID,ImageType",
                   "--tag", "Rows", "--path", path, cwd=generated.parent)
    (line,) = run.out.splitlines()
    obj = json.loads(line)
    assert obj["path"] == str(path)
    back = pydicom.Dataset.from_json(obj["dataset"])
    original = pydicom.dcmread(path)
    assert set(obj["dataset"]) == {"00100010", "00100020", "00080008", "00280010"}
    for keyword in ("PatientName", "PatientID", "ImageType", "Rows"):
        assert back[keyword].value == original[keyword].value


def test_json_leaves_bulk_data_to_pydicom(generated: Path, manifest: dict) -> None:
    """pydicom decides what is bulk data: the pixel data is a URI naming file and tag."""
    path = generated / instances(manifest, scenario="default")[0]["path"]
    obj = json.loads(run_tool("--dump", "--format", "json", "--path", path,
                              cwd=generated.parent).out)
    assert obj["dataset"]["7FE00010"] == {"vr": "OW", "BulkDataURI": path.resolve().as_uri()
                                          + "#7FE00010"}
    assert "00100020" in obj["dataset"]
    assert obj["dataset"]["00020010"]["Value"] == [pydicom.dcmread(path).file_meta
                                                   .TransferSyntaxUID]  # the file meta too


def test_json_of_a_sequence_path_holds_the_items_it_goes_through(generated: Path,
                                                                 manifest: dict) -> None:
    path = generated / instances(manifest, scenario="nested_sequences")[0]["path"]
    run = run_tool("--dump", "--format", "json", "--tag",
                   "OtherPatientIDsSequence[*].PatientID", "--tag", "TransferSyntaxUID",
                   "--tag", "OtherPatientIDsSequence[0].TypeOfPatientID", "--path", path,
                   cwd=generated.parent)
    dataset = json.loads(run.out)["dataset"]
    original = pydicom.dcmread(path)
    (item,) = dataset["00101002"]["Value"]
    assert set(item) == {"00100020", "00100022"}
    assert item["00100020"]["Value"] == [original.OtherPatientIDsSequence[0].PatientID]
    assert dataset["00020010"]["Value"] == [original.file_meta.TransferSyntaxUID]
    assert set(dataset) == {"00101002", "00020010"}


def test_count_is_a_histogram_with_absent_files(generated: Path, manifest: dict,
                                                tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    mg = instances(manifest, scenario="multi_patient")
    for i, e in enumerate(mg[:8]):
        shutil.copy(generated / e["path"], tree / f"f{i}")
    shutil.copy(generated / instances(manifest, scenario="cu_no_pixel_data")[0]["path"],
                tree / "other")
    ds = pydicom.dcmread(tree / "f0")
    del ds.AccessionNumber
    ds.save_as(tree / "f0")
    run = run_tool("--dump", "--count", "--tag", "AccessionNumber", "--path", tree, cwd=tmp_path)
    assert run.code == 0, run.err
    rows = [line.split(None, 1) for line in run.out.splitlines()]
    counts = {rest: int(n) for n, rest in rows}
    assert counts["(0008,0050) AccessionNumber (absent)"] == 1
    assert sum(counts.values()) == 9
    assert [int(n) for n, _ in rows] == sorted((int(n) for n, _ in rows), reverse=True)


@pytest.mark.parametrize("stderr_too", [False, True], ids=["stdout", "stdout-and-stderr"])
def test_a_reader_that_goes_away_stops_the_dump_like_sigpipe(generated: Path, tmp_path: Path,
                                                             stderr_too: bool) -> None:
    """`--dump ... | head -2` (and fish's `&| head -2`): the first lines arrive whole, then
    the run stops quietly (no traceback, no further files taken) with 141, as a shell
    reports dcmdump's SIGPIPE."""
    total = sum(1 for p in generated.rglob("*") if p.is_file())
    first, run = run_into_head("--dump", "-j", "2", "--no-progress", "--path", generated,
                               "--summary-json", "s.json", cwd=tmp_path, lines=3,
                               stderr_too=stderr_too)
    assert run.code == 141, run.err
    # dcmdump's blank line and heading (after the GIL build's warning, when stderr is there)
    assert b"\n# Dicom-File-Format\n" in first
    assert "Traceback" not in run.err and "Error" not in run.err
    assert "stopped by a closed output pipe" in run.log()
    # the full dump of the tree is far more than a pipe holds: it stopped early
    assert json.loads((tmp_path / "s.json").read_text())["files_seen"] < total


@pytest.mark.parametrize("bad", [["--count"], ["--count", "--tag", "PatientID", "--format",
                                               "json"]])
def test_dump_usage_errors(bad: list[str], tmp_path: Path) -> None:
    assert run_tool("--dump", *bad, "--path", tmp_path, cwd=tmp_path).code == 2


def run_with_peak_rss(args: list[str], cwd: Path, timeout: float = 600) -> tuple[int, str, int]:
    """Exit code, stderr, and the peak RSS (MiB) of any child so far (an upper bound)."""
    import resource
    import subprocess
    import sys

    from conftest import TOOL
    proc = subprocess.run([sys.executable, str(TOOL), *args], cwd=cwd, capture_output=True,
                          timeout=timeout)  # a hang fails the test here
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    return proc.returncode, proc.stderr.decode("utf-8", "replace"), peak


def test_hostile_files_never_crash_or_hang_a_dump(fuzz_tree: Path, tmp_path: Path) -> None:
    code, err, rss = run_with_peak_rss(["--dump", "-j", "2", "--time-limit", "60", "--path",
                                        str(fuzz_tree), "--summary-json",
                                        str(tmp_path / "s.json")], tmp_path)
    assert code == 1 and "Traceback" not in err
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["files_seen"] == 1002 and s["errors"] >= 100
    errors = (tmp_path / "errors.log").read_text().splitlines()
    assert len(errors) == s["errors"]  # one line per bad file
    assert any("deflate bomb" in line for line in errors if "/bomb" in line)
    assert rss < 1500  # a length that claims gigabytes allocates nothing of the sort


def test_raw_scanner_agrees_with_pydicom(readable_pydicom_files: list[Path], generated: Path,
                                         fuzz_tree: Path) -> None:
    """The fast path of a tag dump answers exactly as the pydicom path, or defers to it."""
    import dicom_sar
    dicom_sar.load_pydicom()
    specs = tuple(s for t in [*ORACLE_TAGS[:6], "InstitutionName", "Rows", "TransferSyntaxUID"]
                  for s in dicom_sar.parse_tag_specs(t))
    assert dicom_sar.fast_specs_ok(specs)
    files = [*readable_pydicom_files, *(p for p in generated.rglob("*") if p.is_file()),
             *sorted(fuzz_tree.iterdir())]
    answered, diverged = 0, []
    for path in files:
        try:
            fast, _ = dicom_sar.fast_tagged_lines(path, specs)
        except dicom_sar.RawScanError:  # nothing else: any other exception is a bug
            continue  # deferred to pydicom
        try:
            ds, _, _ = dicom_sar.read_dataset(path, header_only=True)
        except Exception:
            diverged.append(path)
            continue
        slow = dicom_sar.tagged_lines(ds, specs) if ds is not None else None
        if path.parent != fuzz_tree:  # on well-formed files the two paths agree exactly
            assert fast == slow, path
        answered += 1
    assert answered > 500
    # never answers where the file is broken: where pydicom's reader reports it broken (it
    # trips over fuzzed file meta), DCMTK, the oracle, reads it to its end
    assert [p for p in diverged if dcmdump(p).returncode != 0] == []


def test_the_raw_scanner_walks_every_sequence(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sequence is walked, whether or not it holds a wanted tag: nested instances are
    found (as dcmdump +P finds them), and a broken sequence is noticed wherever it is."""
    from pydicom.dataset import Dataset

    import dicom_sar

    def code(value: str) -> Dataset:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", "x"
        return item

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.AnatomicRegionSequence = [code("76752008"), code("80248007")]
    ds.PatientID = "OUTER"
    other = Dataset()
    other.PatientID = "INNER"
    ds.OtherPatientIDsSequence = [other]
    path = tmp_path / "nested"
    path.write_bytes(as_part10(ds))
    walked = []
    sequence = dicom_sar.RawScan.sequence

    def spy(self: dicom_sar.RawScan, pos: int, *args: object) -> int:
        walked.append(pos)
        return sequence(self, pos, *args)

    monkeypatch.setattr(dicom_sar.RawScan, "sequence", spy)
    specs = tuple(dicom_sar.parse_tag_specs("PatientID"))
    lines, _ = dicom_sar.fast_tagged_lines(path, specs)
    assert [line.split()[2] for line in lines] == ["[OUTER]", "[INNER]"]
    assert len(walked) == 2  # AnatomicRegionSequence too
    assert lines == dicom_sar.tagged_lines(pydicom.dcmread(path), specs)
    data = path.read_bytes()
    at = data.index(b"76752008")  # inside the first item of AnatomicRegionSequence
    path.write_bytes(data[:at - 2] + b"\xff\x7f" + data[at:])  # its length now claims 32 KB
    with pytest.raises(dicom_sar.RawScanError):
        dicom_sar.fast_tagged_lines(path, specs)
    assert dicom_sar.unreadable(path)


@property_settings(300)
@given(dicom_files(), st.lists(st.sampled_from(sorted(PROPERTY_TAGS)), min_size=1, max_size=3,
                               unique=True))
def test_property_raw_tag_lines_equal_the_pydicom_path(file: tuple[bytes, list[str]],
                                                        tags: list[str]) -> None:
    """On any well-formed file (three transfer syntaxes, three character sets, sequences of
    either length form, nested instances), the raw scanner answers, and exactly as pydicom."""
    import dicom_sar
    dicom_sar.load_pydicom()
    data, _ = file
    specs = tuple(s for tag in tags for s in dicom_sar.parse_tag_specs(tag))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f"
        path.write_bytes(data)
        fast, size = dicom_sar.fast_tagged_lines(path, specs)
        ds, _, _ = dicom_sar.read_dataset(path, header_only=True)
    assert size == len(data)
    assert fast == dicom_sar.tagged_lines(ds, specs)


def nested_patient_ids(undefined_sequence: bool) -> bytes:
    """Explicit VR little endian: a PatientID, an empty one in a defined-length item of
    OtherPatientIDsSequence, then PatientComments."""
    from pydicom.dataset import Dataset
    ds, item = Dataset(), Dataset()
    ds.PatientID, item.PatientID = "OUTER", ""
    ds.OtherPatientIDsSequence = [item]
    ds.PatientComments = "AFTER"  # something follows the sequence
    ds.OtherPatientIDsSequence[0].is_undefined_length_sequence_item = False
    ds["OtherPatientIDsSequence"].is_undefined_length = undefined_sequence
    return as_part10(ds)


@pytest.mark.parametrize("damage", ["an element runs past its item",
                                    "a delimiter ends a defined-length sequence"])
def test_the_raw_scanner_defers_when_lengths_do_not_add_up(damage: str, tmp_path: Path) -> None:
    """Found by the damaged-file property: both read as if whole to a scanner that trusts
    the first length it meets, where pydicom reported the file broken."""
    import dicom_sar
    if damage.startswith("an element"):
        data = nested_patient_ids(undefined_sequence=False)
        data = data.replace(b"\x10\x00\x20\x00LO\x00\x00", b"\x10\x00\x20\x00LO\x01\x00")
    else:
        data = nested_patient_ids(undefined_sequence=True)
        data = data.replace(b"SQ\x00\x00\xff\xff\xff\xff", b"SQ\x00\x00\x00\xff\xff\xff")
    path = tmp_path / "f"
    path.write_bytes(data)
    with pytest.raises(dicom_sar.RAW_FALLBACK):  # pydicom decides
        dicom_sar.fast_tagged_lines(path, tuple(dicom_sar.parse_tag_specs("PatientID")))


@property_settings(300)
@given(dicom_files(), st.sampled_from(DAMAGE), st.data())
def test_property_on_damaged_files_the_raw_scanner_defers_or_agrees(
        file: tuple[bytes, list[str]], damage: str, draw: st.DataObject) -> None:
    """A file with a byte changed, inserted or deleted, or cut short: the raw scanner hands
    it to pydicom, or answers exactly as pydicom does; never where pydicom reports it broken."""
    import dicom_sar
    dicom_sar.load_pydicom()
    data = damaged(file[0], damage, draw)
    specs = tuple(s for tag in ("PatientID", "PatientName", "StudyID")
                  for s in dicom_sar.parse_tag_specs(tag))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f"
        path.write_bytes(data)
        try:
            fast, _ = dicom_sar.fast_tagged_lines(path, specs)
        except dicom_sar.RAW_FALLBACK:
            return  # deferred to pydicom, which decides
        ds, _, _ = dicom_sar.read_dataset(path, header_only=True)  # must not raise
    assert fast == (dicom_sar.tagged_lines(ds, specs) if ds is not None else None)


# ── shapes: a file laid out like one scanned before is not scanned again ─────────────────

SHAPE_REQUESTS = [  # what a tag dump asks, and what the SAR's raw header asks
    ({0x00100020: None, 0x00100010: None}, None),
    ({}, {0x00100020: None, 0x00100000: None, 0x00080005: None})]


def scan_outcome(path: Path, request: tuple) -> object:
    """raw_scan's findings, or the error it raised, as a comparable value."""
    import dicom_sar
    try:
        return dicom_sar.raw_scan(path, *request)
    except dicom_sar.RawScanError as exc:
        return repr(exc)


def fresh_outcome(path: Path, request: tuple) -> object:
    """The outcome of a thread that has seen no file before."""
    import dicom_sar
    dicom_sar._worker_shapes.by_request = {}
    return scan_outcome(path, request)


def learnt_then(path: Path, learnt_from: bytes, data: bytes, request: tuple) -> object:
    """The outcome for data after a thread has learnt the shape of learnt_from."""
    import dicom_sar
    dicom_sar._worker_shapes.by_request = {}
    path.write_bytes(learnt_from)
    for _ in range(2):  # seen once, then recorded
        scan_outcome(path, request)
    path.write_bytes(data)
    return scan_outcome(path, request)


def test_files_of_one_shape_are_scanned_once_and_read_each_its_own_values(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A series whose headers lie alike: after the second file, the scanner no longer runs,
    and each file's values are its own; a file of the same size laid out otherwise (a
    longer PatientID, a shorter PatientName) is scanned, and read right."""
    from pydicom.dataset import Dataset

    import dicom_sar

    def instance(patient_id: str, name: str) -> bytes:
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPInstanceUID = "1.2.3.4"
        ds.PatientName, ds.PatientID = name, patient_id
        return as_part10(ds)

    runs = []
    run = dicom_sar.RawScan.run
    monkeypatch.setattr(dicom_sar.RawScan, "run", lambda self, kind: (runs.append(1),
                                                                       run(self, kind)))
    dicom_sar._worker_shapes.by_request = {}
    specs = tuple(dicom_sar.parse_tag_specs("PatientID"))
    path = tmp_path / "f"
    seen = []
    for patient_id, name in [("A1", "DOE^JO"), ("B2", "ROE^AL"), ("C3", "POE^ED"),
                             ("D4AB", "POE^"), ("E5", "DOE^JO")]:
        path.write_bytes(instance(patient_id, name))
        lines, _ = dicom_sar.fast_tagged_lines(path, specs)
        seen.append((lines[0].split()[2], len(runs)))
        assert lines == dicom_sar.tagged_lines(pydicom.dcmread(path), specs)
    assert len({len(instance(*pair)) for pair in [("A1", "DOE^JO"), ("D4AB", "POE^")]}) == 1
    assert seen == [("[A1]", 1), ("[B2]", 2), ("[C3]", 2), ("[D4AB]", 3), ("[E5]", 4)]


@pytest.mark.parametrize("change", [(b"ISO_IR 100", b"ISO_IR 101"),  # Latin-1 to Latin-2
                                    (b"1.2.840.10008.1.2.1\0", b"1.2.840.10008.1.2.2\0"),
                                    (b"ISO_IR 100", b"ISO_IR 1x0")])
@pytest.mark.parametrize("request_", SHAPE_REQUESTS)
def test_a_file_of_the_same_size_and_headers_with_another_encoding_is_scanned_anew(
        change: tuple[bytes, bytes], request_: tuple, tmp_path: Path) -> None:
    """The character set and the transfer syntax are the two values the scan's decisions
    read: changed (same length), the learnt shape does not fit."""
    from pydicom.dataset import Dataset
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID = "D\xf6E^J\xfc", "P\xe9"
    data = as_part10(ds)
    other = data.replace(*change)
    assert other != data and len(other) == len(data)
    path = tmp_path / "f"
    before = fresh_outcome(path, request_) if path.write_bytes(data) else None
    after = learnt_then(path, data, other, request_)
    assert after == fresh_outcome(path, request_) != before


@property_settings(300)
@given(dicom_files(), st.sampled_from(SHAPE_REQUESTS), st.data())
def test_property_a_learnt_shape_answers_as_a_fresh_scan(
        file: tuple[bytes, list[str]], request: tuple, draw: st.DataObject) -> None:
    """A file of the size of one whose shape the thread has learnt, with a byte changed
    anywhere (in a header, a length, a character set, the transfer syntax, a value): the
    same findings, or the same error, as a thread that has seen nothing."""
    data = damaged(file[0], "flip", draw) if draw.draw(st.booleans()) else file[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f"
        after_learning = learnt_then(path, file[0], data, request)
        assert after_learning == fresh_outcome(path, request)


# ── the raw tag dump without pydicom: start-up, and pydicom's tables ─────────────────────

WITHOUT_PYDICOM = """\
import sys
import dicom_sar
if sys.argv[1] == "preloaded":
    dicom_sar.load_pydicom()
    import pydicom.datadict
    assert pydicom.datadict.DicomDictionary is dicom_sar.DICOM_DICTIONARY  # loaded once
code = dicom_sar.main(sys.argv[2:])
sys.stdout.flush()
print("MODULES", *sorted(m for m in sys.modules if m.startswith("pydicom")), file=sys.stderr)
sys.exit(code)
"""


def dump_as(how: str, script: Path, logs: Path, *args: str | Path
            ) -> tuple[int, str, list[str], list[str]]:
    """A dump run by script, pydicom "preloaded" or left to the tool ("raw"): (exit status,
    stdout, errors.log without its times, the pydicom modules imported by the end)."""
    proc = subprocess.run([sys.executable, str(script), how, "--log-dir", str(logs),
                           *map(str, args)], capture_output=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    err = proc.stderr.decode("utf-8", "replace")
    assert "MODULES" in err, err[-2000:]
    errors = (logs / "errors.log").read_text() if (logs / "errors.log").exists() else ""
    return (proc.returncode, proc.stdout.decode("utf-8", "surrogateescape"),
            [line.split(" ", 1)[1] for line in errors.splitlines()],
            err.split("MODULES", 1)[1].split())


def test_a_tag_dump_runs_without_importing_pydicom_and_prints_the_same(
        real_files: list[Path], tmp_path: Path) -> None:
    """The raw tag dump imports only pydicom's dictionaries, and prints and reports what it
    does with the whole of pydicom loaded: over every charset, syntax, vendor and damage of
    the real files (a file it leaves to pydicom imports pydicom then, in a worker)."""
    import dicom_sar
    tree = tmp_path / "real"
    tree.mkdir()
    for i, path in enumerate(real_files):
        (tree / f"{i:03d}").write_bytes(path.read_bytes())
    script = tmp_path / "dump.py"
    script.write_text(WITHOUT_PYDICOM)
    tags = [x for t in ORACLE_TAGS if not t.endswith("Sequence") for x in ("--tag", t)]
    common = ["-q", "--no-progress", "--dump", "--with-filename", *tags]
    raw = dump_as("raw", script, tmp_path / "raw", *common, "--path", tree)
    preloaded = dump_as("preloaded", script, tmp_path / "preloaded", *common, "--path", tree)
    assert raw[:3] == preloaded[:3]
    assert raw[0] == 1 and raw[1].count("\n") > 2000 and len(raw[2]) >= 5  # damaged files
    # the files the raw scan leaves to pydicom, alone: the first of them imports it
    specs = tuple(s for t in ORACLE_TAGS if not t.endswith("Sequence")
                  for s in dicom_sar.parse_tag_specs(t))
    deferred = tmp_path / "deferred"
    deferred.mkdir()
    for path in sorted(tree.iterdir()):
        try:
            dicom_sar.fast_tagged_lines(path, specs)
        except dicom_sar.RAW_FALLBACK:
            (deferred / path.name).write_bytes(path.read_bytes())
    assert len(list(deferred.iterdir())) >= 5
    raw = dump_as("raw", script, tmp_path / "raw-deferred", *common, "--path", deferred)
    assert raw[:3] == dump_as("preloaded", script, tmp_path / "preloaded-deferred", *common,
                              "--path", deferred)[:3]
    assert not [line for line in raw[2] if "NameError" in line]
    plain = tmp_path / "plain"  # as tests/bench.py's tag dump: ordinary files, no pydicom
    assert run_tool("-q", "--generate", "--output", plain, "--scenario", "multi_patient",
                    "--patients", "4", "--size", "16x16", cwd=tmp_path).code == 0
    code, lines, errors, modules = dump_as("raw", script, tmp_path / "plain-logs", *common,
                                           "--path", plain)
    assert (code, errors) == (0, []) and lines.count("\n") > 100
    assert modules == ["pydicom._dicom_dict", "pydicom._uid_dict"]


def test_the_retyped_tables_equal_pydicoms() -> None:
    import pydicom.charset
    import pydicom.datadict
    import pydicom.valuerep

    import dicom_sar
    assert set(dicom_sar.VALID_VRS) == set(pydicom.valuerep.STANDARD_VR)
    assert set(dicom_sar.STRING_VRS) == set(pydicom.valuerep.STR_VR)
    assert set(dicom_sar.TEXT_VRS) == set(pydicom.valuerep.CUSTOMIZABLE_CHARSET_VR)
    assert set(dicom_sar.BULK_VRS) == set(pydicom.valuerep.BYTES_VR)
    assert set(dicom_sar.LONG_LENGTH_VRS) == set(pydicom.valuerep.EXPLICIT_VR_LENGTH_32)
    for term, encoding in dicom_sar.COMMON_CHARSETS.items():
        assert pydicom.charset.python_encoding[term] == encoding
    assert pydicom.charset.default_encoding == dicom_sar.DEFAULT_ENCODING
    for terms in ([""], ["ISO_IR 6"], ["ISO_IR 100"], ["ISO_IR 192"], ["ISO 2022 IR 6"],
                  ["", "ISO 2022 IR 87"], ["ISO_IR 144"], ["GB18030"], ["ISO_IR 100", "x"]):
        assert dicom_sar.python_encodings(list(terms)) == \
            pydicom.charset.convert_encodings(list(terms)), terms
    # ASCII (but ESC) reads as ASCII in every character set pydicom knows
    ascii_bytes = bytes(b for b in range(0x80) if b != 0x1B)
    for encoding in set(pydicom.charset.python_encoding.values()):
        assert pydicom.charset.decode_bytes(ascii_bytes, [encoding], {0x5C}) == \
            ascii_bytes.decode("ascii"), encoding


def test_dictionary_lookups_equal_pydicoms() -> None:
    import pydicom.datadict
    import pydicom.uid

    import dicom_sar
    assert dicom_sar.keyword_tags() == pydicom.datadict.keyword_dict
    assert dicom_sar.DICOM_DICTIONARY is pydicom.datadict.DicomDictionary  # one copy
    repeated = [int("".join(digits), 16) for mask in pydicom.datadict.RepeatersDictionary
                for digits in itertools.product(*("02468ACE" if c == "x" and i == 3 else
                                                  "0123456789ABCDEF" if c == "x" else c
                                                  for i, c in enumerate(mask)))]
    assert len(repeated) > 20000
    tags = [*pydicom.datadict.DicomDictionary, *repeated,
            *range(0x60000000, 0x60FF4000, 0x3FF7), 0x00080000, 0x00091010, 0x7FE00010,
            0x50003000, 0x60023000, 0x60013000, 0x00281201, 0x0028120F]
    for tag in tags:
        try:
            expected = pydicom.datadict.get_entry(tag)
        except KeyError:
            expected = None
        assert dicom_sar.dictionary_entry(tag) == expected, hex(tag)
    for uid, info in pydicom.uid.UID_dictionary.items():
        if info[4]:
            assert dicom_sar.UID_BY_KEYWORD[info[4]] == uid == getattr(pydicom.uid, info[4],
                                                                         uid)
