"""--deid and --deid-audit: PS3.15 Annex E on the SAR's engine, keyed and stateless."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset

import dicom_sar
from conftest import (
    IN_CI,
    ROOT,
    TOOL,
    dcmdump_reads,
    need,
    read,
    run_tool,
    tree_digest,
)

DEID_SOURCE = ROOT.parent / "shared" / "deid" / "confidentiality_profile_attributes.json"


# ── fixtures ──────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key made by the tool itself."""
    base = tmp_path_factory.mktemp("key")
    run = run_tool("--deid", "--new-key", base / "project.key", cwd=base)
    assert run.code == 0, run.err
    return base / "project.key"


@pytest.fixture(scope="module")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("key2")
    path = base / "other.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


def generate(base: Path, *args: str) -> Path:
    """A small generated tree (flat: its file names are SOP UIDs, nothing else)."""
    tree = base / "tree"
    run = run_tool("--generate", "--output", tree, "--size", "16x16", "--layout", "flat",
                   "--no-progress", "-j", "2", *args, cwd=base)
    assert run.code == 0, run.err
    return tree


@pytest.fixture(scope="module")
def phi_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """phi_everywhere: a marker in every identifying place, listed in the manifest."""
    return generate(tmp_path_factory.mktemp("phi"), "--scenario", "phi_everywhere",
                    "--patients", "2", "--seed", "4")


@pytest.fixture(scope="module")
def patients_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 patients x 2 studies of 4 MG images, and a CT volume."""
    tree = generate(tmp_path_factory.mktemp("patients"), "--scenario", "multi_patient",
                    "--scenario", "ct", "--instances", "4", "--seed", "9")
    (tree / "manifest.json").unlink()
    return tree


def deid(tree: Path, out: Path, key: Path, *args: str | Path, cwd: Path | None = None):
    work = cwd or out.parent
    work.mkdir(parents=True, exist_ok=True)
    return run_tool("--deid", "--key", key, "--path", tree, "--output", out, "-j", "2",
                    "--no-progress", *args, cwd=work)


def all_elements(ds: Dataset):
    """(dataset, element) at every depth, the file meta included."""
    stack = [ds, *([ds.file_meta] if getattr(ds, "file_meta", None) else [])]
    while stack:
        current = stack.pop()
        for elem in current:
            yield current, elem
            if elem.VR == "SQ":
                stack.extend(elem.value)


def uid_values(ds: Dataset) -> set[str]:
    return {str(v) for _, e in all_elements(ds) if e.VR == "UI"
            for v in (e.value if isinstance(e.value, list | pydicom.multival.MultiValue)
                      else [e.value]) if v}


def outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file())


# ── the table ─────────────────────────────────────────────────────────────────────────────


def test_the_table_is_the_standards_regenerated_from_its_source() -> None:
    if not DEID_SOURCE.is_file():
        if IN_CI:
            pytest.fail(f"the PS3.15 table is missing: {DEID_SOURCE}")
        pytest.skip(f"no {DEID_SOURCE}")
    sys.path.insert(0, str(ROOT / "tools"))
    import deid_table
    block = deid_table.generated_block(DEID_SOURCE)
    text = TOOL.read_text(encoding="utf-8")
    start, end = text.index(deid_table.BEGIN), text.index(deid_table.END)
    assert text[start:end + len(deid_table.END) + 1] == block
    rows = json.loads(DEID_SOURCE.read_text())
    cells = dicom_sar.DEID_TABLE.split()
    assert len(cells) == 3 * len(rows) == 3 * 621
    assert dicom_sar.DEID_EDITION == "2024b"
    assert set(cells[1::3]) == {"D", "Z", "X", "U", "X/Z", "X/D", "X/Z/D", "Z/D", "X/Z/U*"}


def test_the_options_override_the_basic_column_as_the_standard_says() -> None:
    basic = dicom_sar.deid_profile(())
    kw = dicom_sar.tag_for_keyword
    assert basic.action(kw("PatientName")) == "Z"
    assert basic.action(kw("SOPInstanceUID")) == "U"
    assert basic.action(kw("ContentDate")) == "D"  # Z/D -> D: valid whatever the type
    assert basic.action(kw("AcquisitionDate")) == "Z"  # X/Z -> Z
    assert basic.action(kw("ReferencedImageSequence")) == "U"  # X/Z/U*: its UIDs replaced
    assert basic.action(kw("Manufacturer")) == "K"  # not in the table
    assert basic.action(0x60024000) == "X" and basic.action(0x50100000) == "X"  # 60xx, 50xx
    assert basic.action(0x60023000) == "X" and basic.action(0x60020010) == "K"
    assert basic.private == "X"
    dates = dicom_sar.deid_profile(("retain-long-modified-dates",))
    assert dates.action(kw("StudyDate")) == "C" and dates.action(kw("PatientName")) == "Z"
    uids = dicom_sar.deid_profile(("retain-uids",))
    assert uids.action(kw("SOPInstanceUID")) == "K"
    graphics = dicom_sar.deid_profile(("clean-graphics",))
    assert graphics.action(0x60004000) == "C"
    # both a retain (K) and a clean (C) apply to some rows: retaining wins
    both = dicom_sar.deid_profile(("retain-device-identity", "clean-descriptors"))
    assert both.action(kw("StationName")) == "K"


def test_every_code_of_cid_7050_comes_from_pydicom() -> None:
    from pydicom.sr.codedict import codes
    for name in ("basic", *dicom_sar.DEID_OPTIONS):
        code = getattr(codes.DCM, dicom_sar.DEID_CODES[name])
        assert code.scheme_designator == "DCM" and code.value.startswith("1131")


# ── what each file gets ───────────────────────────────────────────────────────────────────


def test_no_planted_marker_survives_anywhere(phi_tree: Path, key: Path, tmp_path: Path) -> None:
    manifest = json.loads((phi_tree / "manifest.json").read_text())
    markers = {m for entry in manifest["instances"] for m in entry["markers"]}
    assert len(markers) > 500
    # the markers really are in the input, at every depth and in the odd places
    data = b"".join(p.read_bytes() for p in phi_tree.iterdir() if p.name != "manifest.json")
    assert all(m.encode() in data for m in markers)
    run = deid(phi_tree, tmp_path / "out", key, "--summary-json", tmp_path / "summary.json")
    assert run.code == 0, run.err
    written = outputs(tmp_path / "out")
    assert len(written) == len(manifest["instances"])
    texts = [run.out, run.err, run.log(), run.log("errors.log"),
             (tmp_path / "summary.json").read_text()]
    for path in written:
        data = path.read_bytes()
        assert not [m for m in markers if m.encode() in data], path
        assert dcmdump_reads(path)
        ds = read(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethod[0].startswith("dicom_sar ")
        assert [i.CodeValue for i in ds.DeidentificationMethodCodeSequence] == ["113100"]
        assert not [e for _, e in all_elements(ds) if e.tag.is_private]
        assert 0x0018FFF0 not in ds and 0x60004000 not in ds
        # items at depth 1 to 3 are kept, de-identified, their references remapped
        depth1 = ds.AnatomicRegionSequence[0]
        depth3 = depth1.ReferencedImageSequence[0].SourceImageSequence[0]
        assert depth3.ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert depth3.PatientName == ds.PatientName == ds.PatientID  # the pseudonym
    assert not [m for m in markers for text in texts if m in text]
    preview = run_tool("--deid", "--key", key, "--path", phi_tree, "--dry-run", "--no-progress",
                       cwd=tmp_path)
    assert preview.code == 0 and "PatientName  replaced" in preview.out
    assert not [m for m in markers if m in preview.out + preview.err]
    assert not (tmp_path / "dicom_sar_deid").exists()


def test_keep_private_keeps_that_creator_only(phi_tree: Path, key: Path, tmp_path: Path) -> None:
    run = deid(phi_tree, tmp_path / "out", key, "--keep-private", "SIEMENS CSA HEADER")
    assert run.code == 0, run.err
    for path in outputs(tmp_path / "out"):
        ds = read(path)
        block = ds.private_block(0x0029, "SIEMENS CSA HEADER")
        assert block[0x10].value == b"SV10\x04\x03\x02\x01"
        with pytest.raises(KeyError):
            ds.private_block(0x0029, "PHI TEST")
    audit = run_tool("--deid-audit", "--path", tmp_path / "out", "--no-progress", cwd=tmp_path)
    assert audit.code == 1 and "(0029,0011) PrivateCreator: private element" in audit.out
    kept = run_tool("--deid-audit", "--path", tmp_path / "out", "--no-progress",
                    "--keep-private", "SIEMENS CSA HEADER", cwd=tmp_path)
    assert kept.code == 0, kept.out


def test_uids_are_keyed_consistent_and_references_resolve(patients_tree: Path, key: Path,
                                                          other_key: Path,
                                                          tmp_path: Path) -> None:
    run = deid(patients_tree, tmp_path / "out", key, "--mapping", tmp_path / "map.tsv")
    assert run.code == 0, run.err
    keyed = dicom_sar.Keyed(key.read_bytes())
    by_name = {p.name: p for p in outputs(tmp_path / "out")}
    studies: dict[str, set[str]] = collections.defaultdict(set)
    for path in sorted(patients_tree.iterdir()):
        before = read(path)
        after = read(by_name[keyed.uid(before.SOPInstanceUID)])
        # the output is named by its new UIDs: nothing of the input's names
        assert by_name[after.SOPInstanceUID].parent.name == after.SeriesInstanceUID
        assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            if keyword in before:
                assert after[keyword].value == keyed.uid(before[keyword].value)
        assert after.SOPClassUID == before.SOPClassUID
        assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
        assert after.PatientID == after.PatientName == keyed.patient(
            before.IssuerOfPatientID, before.PatientID)
        studies[after.StudyInstanceUID].add(after.AccessionNumber)
        assert not uid_values(before) - {before.SOPClassUID, before.file_meta.TransferSyntaxUID,
                                         before.file_meta.MediaStorageSOPClassUID,
                                         before.file_meta.ImplementationClassUID} & \
            uid_values(after)
    assert all(len(accessions) == 1 for accessions in studies.values())  # keyed dummies
    rows = [line.split("\t") for line in (tmp_path / "map.tsv").read_text().splitlines()]
    assert stat.S_IMODE((tmp_path / "map.tsv").stat().st_mode) == 0o600
    assert {r[0] for r in rows} == {"PatientID", "AccessionNumber", "StudyInstanceUID"}
    assert all(keyed.uid(old) == new for kind, old, new in rows if kind == "StudyInstanceUID")
    assert len(rows) == len({tuple(r) for r in rows})
    # another key shares no UID, no pseudonym
    run2 = deid(patients_tree, tmp_path / "out2", other_key)
    assert run2.code == 0, run2.err
    first = {u for p in by_name.values() for u in uid_values(read(p)) if u.startswith("2.25.")}
    second = {u for p in outputs(tmp_path / "out2") for u in uid_values(read(p))
              if u.startswith("2.25.")}
    assert first and second and not first & second


def test_same_key_same_bytes_in_every_run_and_every_shard(patients_tree: Path, key: Path,
                                                          tmp_path: Path) -> None:
    one = deid(patients_tree, tmp_path / "one", key, "--mapping", tmp_path / "one.tsv")
    again = deid(patients_tree, tmp_path / "again", key, cwd=tmp_path / "w2")
    assert one.code == again.code == 0
    reference = tree_digest(tmp_path / "one")
    assert len(reference) == len(list(patients_tree.iterdir()))
    assert tree_digest(tmp_path / "again") == reference
    shards = tmp_path / "shards"
    for i in (1, 2, 3):  # three hosts that share nothing but the key file
        run = deid(patients_tree, shards, key, "--shard", f"{i}/3", "--mapping",
                   tmp_path / "map.tsv", cwd=tmp_path / f"host{i}")
        assert run.code == 0, run.err
    assert tree_digest(shards) == reference
    merged = set()
    for i in (1, 2, 3):
        part = tmp_path / f"map.shard-{i}-of-3.tsv"
        assert stat.S_IMODE(part.stat().st_mode) == 0o600
        merged |= set(part.read_text().splitlines())
    assert merged == set((tmp_path / "one.tsv").read_text().splitlines())


def test_modified_dates_keep_intervals_within_a_patient_only(patients_tree: Path, key: Path,
                                                             tmp_path: Path) -> None:
    run = deid(patients_tree, tmp_path / "out", key, "--deid-option",
               "retain-long-modified-dates")
    assert run.code == 0, run.err
    keyed = dicom_sar.Keyed(key.read_bytes())
    by_name = {p.name: p for p in outputs(tmp_path / "out")}
    offsets: dict[str, set[int]] = collections.defaultdict(set)
    day = lambda text: datetime.strptime(text, "%Y%m%d")  # noqa: E731
    for path in patients_tree.iterdir():
        before = read(path)
        after = read(by_name[keyed.uid(before.SOPInstanceUID)])
        assert after.LongitudinalTemporalInformationModified == "MODIFIED"
        assert "retain-long-modified-dates" in after.DeidentificationMethod
        assert [i.CodeValue for i in after.DeidentificationMethodCodeSequence] == \
            ["113100", "113107"]
        assert after.PatientBirthDate == ""  # Z in every column of the table
        for keyword in ("StudyDate", "SeriesDate", "ContentDate"):
            offsets[before.PatientID].add((day(before[keyword].value)
                                           - day(after[keyword].value)).days)
        assert after.StudyTime == before.StudyTime  # the time of day is kept
    assert all(len(days) == 1 for days in offsets.values())  # intervals kept
    shifts = [next(iter(days)) for days in offsets.values()]
    assert len(shifts) == 4 and len(set(shifts)) == 4  # differ between patients
    assert all(365 <= s <= 3650 for s in shifts)


def test_the_burned_in_gate(tmp_path: Path, key: Path) -> None:
    tree = tmp_path / "in"
    tree.mkdir()
    for name, keyword, annotation in (("us", "UltrasoundImageStorage", None),
                                      ("sc_no", "SecondaryCaptureImageStorage", "NO"),
                                      ("ct_yes", "CTImageStorage", "YES"),
                                      ("ct", "CTImageStorage", None)):
        ds = small_image(keyword)
        if annotation:
            ds.BurnedInAnnotation = annotation
        ds.save_as(tree / name, enforce_file_format=True)
    run = deid(tree, tmp_path / "out", key)
    assert run.code == 1
    errors = run.log("errors.log")
    assert "in/us: Rejected: no BurnedInAnnotation in a Ultrasound Image Storage" in errors
    assert "in/ct_yes: Rejected: BurnedInAnnotation is YES" in errors
    assert len(outputs(tmp_path / "out")) == 2  # sc_no and ct
    allowed = deid(tree, tmp_path / "out2", key, "--allow-burned-in", cwd=tmp_path / "w2")
    assert allowed.code == 0 and len(outputs(tmp_path / "out2")) == 4


def small_image(sop_keyword: str, **values: str) -> Dataset:
    """A tiny valid-enough image of a SOP class, with values."""
    uid = dicom_sar.UID_BY_KEYWORD[sop_keyword]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = uid, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.PatientName, ds.PatientID = "DOE^JANE", "ID-4711"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = b"\x00\x01\x02\x03"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_a_value_the_profile_removes_but_a_kept_element_repeats_refuses_the_file(
        tmp_path: Path, key: Path) -> None:
    tree = tmp_path / "in"
    tree.mkdir()
    small_image("CTImageStorage", InstitutionName="RIVERSIDE",
                Manufacturer="RIVERSIDE SCANNERS").save_as(tree / "leaky")
    small_image("CTImageStorage", InstitutionName="RIVERSIDE",
                Manufacturer="ACME").save_as(tree / "fine")
    run = deid(tree, tmp_path / "out", key)
    assert run.code == 1
    assert ("in/leaky: Rejected: the original value of (0008,0080) InstitutionName is still "
            "in the output") in run.log("errors.log")
    assert "RIVERSIDE" not in run.log("errors.log") + run.log() + run.err
    assert len(outputs(tmp_path / "out")) == 1


def test_once_only_and_in_place_with_a_backup(patients_tree: Path, key: Path,
                                              tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(patients_tree, tree)
    originals = tree_digest(tree)
    run = run_tool("--deid", "--key", key, "--inplace", "--backup-dir", tmp_path / "backup",
                   "--path", tree, "--no-progress", cwd=tmp_path)
    assert run.code == 0, run.err
    assert tree_digest(tmp_path / "backup") == originals
    replaced = tree_digest(tree)
    assert replaced.keys() == originals.keys() and not set(replaced.values()) & \
        set(originals.values())
    again = run_tool("--deid", "--key", key, "--inplace", "--no-backup", "--path", tree,
                     "--no-progress", cwd=tmp_path)
    assert again.code == 0, again.err
    assert tree_digest(tree) == replaced  # dates are never shifted twice
    assert "already de-identified by dicom_sar: left as it is" in again.log()


def test_the_audit_names_tags_never_values(phi_tree: Path, key: Path, tmp_path: Path) -> None:
    manifest = json.loads((phi_tree / "manifest.json").read_text())
    markers = {m for entry in manifest["instances"] for m in entry["markers"]}
    audit = run_tool("--deid-audit", "--path", phi_tree, "--no-progress", "--summary-json",
                     tmp_path / "s.json", cwd=tmp_path)
    assert audit.code == 1
    assert "(0010,0010) PatientName: the profile would replace or empty it" in audit.out
    assert "(0008,1030) StudyDescription: the profile removes it" in audit.out
    assert "(0018,fff0) Unknown Tag & Data: unknown or UN element" in audit.out
    assert not [m for m in markers if m in audit.out + audit.err + audit.log()]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["with_identifying_data"] == len(manifest["instances"])
    out = tmp_path / "out"
    assert deid(phi_tree, out, key).code == 0
    clean = run_tool("--deid-audit", "--path", out, "--no-progress", cwd=tmp_path)
    assert clean.code == 0 and not clean.out


def test_key_care(tmp_path: Path, key: Path, patients_tree: Path) -> None:
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    again = run_tool("--deid", "--new-key", key, cwd=tmp_path)
    assert again.code == 2 and "never overwritten" in again.err
    missing = run_tool("--deid", "--path", patients_tree, cwd=tmp_path)
    assert missing.code == 2 and "--new-key" in missing.err
    short = tmp_path / "short.key"
    short.write_bytes(b"0123456789")
    assert run_tool("--deid", "--key", short, "--path", patients_tree,
                    cwd=tmp_path).code == 2
    exposed = tmp_path / "exposed.key"
    exposed.write_bytes(key.read_bytes())
    exposed.chmod(0o644)
    run = run_tool("--deid", "--key", exposed, "--path", patients_tree, "--output",
                   tmp_path / "out", "--no-progress", "-v", cwd=tmp_path)
    assert run.code == 0, run.err
    assert "readable by others" in run.err
    secret = key.read_bytes()
    logs = (run.log() + run.log("errors.log") + run.err + run.out).encode("utf-8", "replace")
    assert secret not in logs and secret.hex().encode() not in logs
    for args, phrase in ((["--deid-option", "retain-safe-private"], "not supported"),
                         (["--deid-option", "retain-long-full-dates", "--deid-option",
                           "retain-long-modified-dates"], "exclude each other"),
                         (["--deid-option", "keep-everything"], "unknown")):
        bad = run_tool("--deid", "--key", key, "--path", patients_tree, *args, cwd=tmp_path)
        assert bad.code == 2 and phrase in bad.err, bad.err
    foreign = run_tool("--deid-audit", "--key", key, "--path", patients_tree, cwd=tmp_path)
    assert foreign.code == 2 and "--key belongs to --deid" in foreign.err


def test_partly_honoured_options_say_so_at_the_start(patients_tree: Path, key: Path,
                                                     tmp_path: Path) -> None:
    run = deid(patients_tree, tmp_path / "out", key, "--deid-option", "clean-descriptors",
               "--deid-option", "clean-graphics")
    assert run.code == 0, run.err
    assert "--deid-option clean-descriptors: descriptions are kept" in run.err
    assert "--deid-option clean-graphics: overlays and curves are kept as they are" in run.err
    ds = read(outputs(tmp_path / "out")[0])
    assert "StudyDescription" in ds  # cleaned, not removed


# ── real files, real validators, kills ───────────────────────────────────────────────────


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory, key: Path):
    """Every real file (pydicom's and the corpus) through --deid --allow-burned-in."""
    from conftest import corpus_files, pydicom_files
    base = tmp_path_factory.mktemp("corpus")
    files = pydicom_files() + corpus_files()
    listing = base / "list"
    listing.write_bytes(b"\0".join(os.fsencode(p) for p in files) + b"\0")
    run = run_tool("--deid", "--key", key, "--files-from", listing, "-0", "--output",
                   base / "out", "--allow-burned-in", "-j", "2", "--no-progress",
                   "--summary-json", base / "summary.json", cwd=base)
    assert run.code == 1, run.err  # damaged files and duplicates are among them
    return files, base / "out", run, json.loads((base / "summary.json").read_text())


def test_real_files_read_cleanly_after_as_before(corpus_run, key: Path) -> None:
    """Every output whose input dcmdump read cleanly reads cleanly too."""
    need("dcmdump")
    files, out, run, summary = corpus_run
    assert summary["modified"] > 100 and "Traceback" not in run.err
    keyed = dicom_sar.Keyed(key.read_bytes())
    # named by their new SOP Instance UID; files without any UID go to unnamed/
    written = {p.name: p for p in outputs(out) if p.parent.name != "unnamed"}
    source: dict[str, Path] = {}
    for path in files:  # the first file of an instance took its name (later: Duplicate)
        uid = instance_uid(path)
        if uid and keyed.uid(uid) in written:
            source.setdefault(keyed.uid(uid), path)
    assert len(source) == len(written) > 100
    compared = 0
    for name, path in source.items():
        if dcmdump_reads(path, "+U8"):
            assert dcmdump_reads(written[name], "+U8"), path
            compared += 1
    assert compared > 80


def instance_uid(path: Path) -> str:
    """A file's SOP Instance UID (a DICOMDIR's: its file meta's), '' if it has none."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        uid = ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID")
    except Exception:  # damaged inputs are expected here
        return ""
    return str(uid or "").strip("\0 ")


def test_references_between_real_files_resolve(corpus_run, key: Path) -> None:
    files, out, _, _ = corpus_run
    keyed = dicom_sar.Keyed(key.read_bytes())
    written = {p.name: p for p in outputs(out)}
    defined: dict[str, Path] = {}
    readable = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, force=True)
            ds.SOPInstanceUID  # noqa: B018
        except Exception:  # damaged inputs are expected here
            continue
        readable.append((path, ds))
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
                        "FrameOfReferenceUID"):
            if ds.get(keyword):
                defined.setdefault(str(ds[keyword].value), path)
    checked = 0
    for path, ds in readable:
        target = written.get(keyed.uid(str(ds.SOPInstanceUID)))
        if target is None:  # refused, a duplicate, or not writable: nothing to compare
            continue
        after = uid_values(read(target))
        data = target.read_bytes()
        for uid in uid_values(ds) & defined.keys():
            assert keyed.uid(uid) in after, (path, uid)
            assert uid.encode() not in data, (path, uid)
            checked += 1
    assert checked > 200


def test_dciodvfy_finds_no_new_error(tmp_path: Path, key: Path) -> None:
    need("dciodvfy")
    tree = generate(tmp_path, "--scenario", "default", "--scenario", "ct", "--scenario", "mr",
                    "--scenario", "nested_sequences", "--instances", "2")
    (tree / "manifest.json").unlink()
    assert deid(tree, tmp_path / "out", key).code == 0
    keyed = dicom_sar.Keyed(key.read_bytes())
    by_name = {p.name: p for p in outputs(tmp_path / "out")}

    def errors(path: Path) -> set[str]:
        proc = subprocess.run([need("dciodvfy"), str(path)], capture_output=True, text=True)
        return {line for line in (proc.stdout + proc.stderr).splitlines()
                if line.startswith("Error")}

    compared = 0
    for path in sorted(tree.iterdir()):
        after = by_name[keyed.uid(read(path).SOPInstanceUID)]
        assert errors(after) <= errors(path), path
        compared += 1
    assert compared == len(by_name) >= 8


def test_a_kill_then_resume_gives_the_uninterrupted_tree(patients_tree: Path, key: Path,
                                                         tmp_path: Path) -> None:
    need("strace")
    reference = deid(patients_tree, tmp_path / "ref", key)
    assert reference.code == 0
    expected = tree_digest(tmp_path / "ref")
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    killed = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=rename,renameat,renameat2",
         "-e", "inject=rename,renameat,renameat2:signal=SIGKILL:when=10",
         sys.executable, str(TOOL), "--deid", "--key", str(key), "--path", str(patients_tree),
         "--output", str(out), "-j", "2", "--no-progress"],
        cwd=work, capture_output=True, timeout=300)
    assert killed.returncode != 0
    done = {k: v for k, v in tree_digest(out).items()
            if not Path(k).name.startswith(dicom_sar.TEMP_PREFIX)}
    assert len(done) == 9 and all(expected[k] == v for k, v in done.items())
    resumed = run_tool("--deid", "--key", key, "--path", patients_tree, "--output", out,
                       "--resume", "--no-progress", cwd=work)
    assert resumed.code == 0, resumed.err
    assert tree_digest(out) == expected  # whole, no litter, nothing done twice
    assert re.search(r"skipped other\s+9", resumed.err)


def test_a_shifted_date_its_vr_refuses_is_emptied_and_never_quoted(tmp_path: Path,
                                                                   key: Path) -> None:
    """A DT whose tail is not a time (read leniently, as scanners write them) would carry its
    tail into the shifted value, which the leak search cannot see (only whole values are
    searched): it is emptied, and nothing quotes it."""
    tree = tmp_path / "in"
    tree.mkdir()
    ds = small_image("CTImageStorage", StudyDate="20230105")
    tag = dicom_sar.tag_for_keyword("AcquisitionDateTime")
    ds[tag] = dicom_sar.raw_element(tag, "DT", b"20230101XJOHNSMITH")
    ds.save_as(tree / "odd", enforce_file_format=True)
    run = deid(tree, tmp_path / "out", key, "--deid-option", "retain-long-modified-dates", "-v")
    assert run.code == 0, run.err
    assert "JOHNSMITH" not in run.log("errors.log") + run.err
    (written,) = outputs(tmp_path / "out")
    after = read(written)
    assert after.AcquisitionDateTime == "" and after.StudyDate != "20230105"
    assert b"JOHNSMITH" not in written.read_bytes()
