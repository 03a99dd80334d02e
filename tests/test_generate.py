"""--generate: valid synthetic studies, exactly-one-fault presets, seeds, the JSON config."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

import dicom_sar
from conftest import dcmdump, instances, need, read, run_into_head, run_tool, tree_digest


def dciodvfy_errors(path: Path, tmp_path: Path) -> list[str]:
    """Error lines of David Clunie's IOD validator (deflated files inflated first)."""
    meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).get("file_meta", {})
    if meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian:
        inflated = tmp_path / "inflated.dcm"  # this dciodvfy build cannot read deflate
        subprocess.run([need("dcmconv"), "+te", path, inflated], check=True)
        path = inflated
    proc = subprocess.run([need("dciodvfy"), path], capture_output=True)
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    return [line for line in text.splitlines() if line.startswith("Error")]


def test_every_scenario_is_listed_and_generated(manifest: dict, tmp_path: Path) -> None:
    listed = run_tool("--list-scenarios", cwd=tmp_path).out.splitlines()
    names = {line.split()[0] for line in listed}
    assert len(names) == len(listed) == len(dicom_sar.scenario_catalogue())
    assert {f"cu_{f}" for f in dicom_sar.FAULTS} <= names
    assert {f"pr_{f}" for f in dicom_sar.FAULTS} <= names
    assert {e["scenario"] for e in manifest["instances"]} == names


def test_valid_files_pass_dcmdump_dciodvfy_and_read_back(generated: Path, manifest: dict,
                                                         tmp_path: Path) -> None:
    # phi_everywhere plants a marker in every attribute of PS3.15's table, enumerated ones
    # (PatientSex) and ones of other IODs included: a test of de-identifiers, not an IOD
    valid = [e for e in instances(manifest, expect="accept") if e["encoding"] != "phi_everywhere"]
    assert len(valid) > 300
    checked_by_validator = set()
    for entry in valid:
        path = generated / entry["path"]
        proc = dcmdump(path)  # not -q, which hides warnings
        assert proc.returncode == 0 and not proc.stderr.strip(), (entry["scenario"], proc.stderr)
        ds = read(path)
        assert ds.SOPInstanceUID == entry["sop_uid"]
        assert ds.StudyInstanceUID == entry["study_uid"]
        assert ds.SeriesInstanceUID == entry["series_uid"]
        assert ds.PatientID.startswith(entry["patient_id"])  # long_values pads it out
        assert dciodvfy_errors(path, tmp_path) == [], entry["scenario"]
        checked_by_validator.add(entry["scenario"])
    assert len(checked_by_validator) >= 15


def test_default_study_is_four_view_mammography(generated: Path, manifest: dict) -> None:
    entries = instances(manifest, scenario="default")
    assert [e["view"] for e in entries] == ["RCC", "LCC", "RMLO", "LMLO"]
    for e in entries:
        ds = read(generated / e["path"])
        assert (ds.Modality, ds.BitsAllocated, ds.PhotometricInterpretation) == (
            "MG", 16, "MONOCHROME2")
        assert ds.ImageLaterality == e["view"][0]
        assert ds.ViewCodeSequence[0].CodeMeaning.startswith(
            "cranio" if e["view"].endswith("CC") else "medio")
        age = int(ds.StudyDate[:4]) - int(ds.PatientBirthDate[:4])
        assert 49 <= age <= 76
        assert Path(e["path"]).parts[0] == ds.PatientID and "." not in Path(e["path"]).name[-4:]


def test_ct_volume_has_realistic_slices(generated: Path, manifest: dict) -> None:
    entries = instances(manifest, scenario="ct")
    assert len(entries) == 16
    ds = read(generated / entries[0]["path"])
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, len(ds.PixelData)) == (512, 512, 16, 524288)
    assert read(generated / instances(manifest, scenario="mr")[0]["path"]).Modality == "MR"


def fault_file(generated: Path, manifest: dict, scenario: str) -> tuple[dict, pydicom.Dataset]:
    (entry,) = [e for e in instances(manifest, scenario=scenario) if e["fault"]]
    return entry, read(generated / entry["path"]) if entry["expect"] != "absent" else None


@pytest.mark.parametrize("prefix", ["cu_", "pr_"])
def test_each_fault_is_exactly_there(prefix: str, generated: Path, manifest: dict) -> None:
    for fault in dicom_sar.FAULTS:
        entry, ds = fault_file(generated, manifest, prefix + fault)
        assert entry["fault"] == fault
        role = "current" if prefix == "cu_" else "internal_prior"
        assert entry["study_role"] == role
        same_study = [e for e in instances(manifest, scenario=prefix + fault)
                      if e["study_role"] == role]
        assert entry is same_study[-1] or fault in ("studyuid_mismatch", "pid_mismatch")
        check_fault(fault, entry, ds, generated, manifest)


def check_fault(fault: str, entry: dict, ds: pydicom.Dataset | None, generated: Path,
                manifest: dict) -> None:
    if fault == "missing_dicom":
        assert entry["expect"] == "absent" and not (generated / entry["path"]).exists()
        return
    assert entry["expect"] == "reject"
    assert ds is not None
    if fault == "bits_mismatch":
        assert ds.BitsStored > ds.HighBit + 1 and ds.BitsStored > ds.BitsAllocated
    elif fault == "corrupted_pixel":
        assert len(ds.PixelData) < ds.Rows * ds.Columns * 2
    elif fault == "large_dimensions":
        assert ds.Rows == ds.Columns == 65535
    elif fault == "missing_required_tag":
        assert "Rows" not in ds and "Columns" not in ds and "PixelData" in ds
    elif fault == "no_pixel_data":
        assert "PixelData" not in ds and "Rows" in ds
    elif fault == "null_byte_tag":
        assert b"\x00" in ds.get_item(0x0008103E).value.rstrip(b" \x00")
    elif fault == "overly_large_numeric":
        assert int(ds.get_item(0x00200013).value) > 2**31 - 1
        assert float(ds.get_item(0x00101030).value) == float("inf")
    elif fault == "private_tag":
        assert ds.private_block(0x0009, "DICOM_SAR TEST")[0x01].value == "private value"
    elif fault == "studyuid_mismatch":
        others = {e["study_uid"] for e in instances(manifest, scenario=entry["scenario"])
                  if e is not entry and e["study_role"] == entry["study_role"]}
        assert ds.StudyInstanceUID not in others and len(others) == 1
    elif fault == "pid_mismatch":
        others = {e["patient_id"] for e in instances(manifest, scenario=entry["scenario"])
                  if e is not entry}
        assert ds.PatientID not in others
    elif fault == "unsupported_modality":
        assert ds.Modality == "OT" and ds.SOPClassUID.name.startswith("Digital Mammography")
    elif fault == "unsupported_sop":
        assert ds.SOPClassUID == dicom_sar.sop_class("GrayscaleSoftcopyPresentationStateStorage")
    elif fault == "duplicate_sop":
        before = [e for e in instances(manifest, scenario=entry["scenario"])
                  if e["instance_number"] == entry["instance_number"] - 1
                  and e["study_uid"] == entry["study_uid"]]
        assert ds.SOPInstanceUID == before[0]["sop_uid"]
    elif fault == "invalid_date":
        assert ds.get_item(0x00080020).value == b"20231345"
    elif fault == "raw_not_for_presentation":
        assert ds.PresentationIntentType == "FOR PROCESSING"
    elif fault == "encapsulated_pdf":
        assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
        assert ds.EncapsulatedDocument.startswith(b"%PDF")


def test_broken_presets(generated: Path, manifest: dict, tmp_path: Path) -> None:
    for name in ("truncated", "not_dicom", "zero_byte"):
        (entry,) = [e for e in instances(manifest, scenario=name) if e["fault"]]
        data = (generated / entry["path"]).read_bytes()
        if name == "zero_byte":
            assert data == b""
        elif name == "not_dicom":
            assert b"DICM" not in data and data.isascii()
        else:
            assert data[128:132] == b"DICM" and dcmdump("-q", generated / entry["path"]).returncode


def test_combined_presets(manifest: dict) -> None:
    shallow = instances(manifest, scenario="large_scale_shallow")
    assert {e["fault"] for e in shallow if e["fault"]} == set(dicom_sar.FAULTS)
    assert len({e["study_uid"] for e in shallow if e["fault"] != "studyuid_mismatch"}) == \
        len(dicom_sar.FAULTS) + 1
    external = instances(manifest, scenario="external_prior")
    roles = {e["study_role"]: e for e in external}
    assert roles["external_prior"]["issuer_of_patient_id"] != roles["current"][
        "issuer_of_patient_id"]
    assert roles["external_prior"]["study_date"] < roles["current"]["study_date"]
    assert roles["external_prior"]["accession"] != roles["current"]["accession"]
    multi = instances(manifest, scenario="multi_patient")
    assert len({e["patient_id"] for e in multi}) == 3 and len({e["study_uid"]
                                                              for e in multi}) == 6


def test_manifest_lists_every_file_written(generated: Path, manifest: dict) -> None:
    on_disk = {str(p.relative_to(generated)) for p in generated.rglob("*") if p.is_file()}
    listed = {e["path"] for e in manifest["instances"] if e["expect"] != "absent"}
    assert on_disk == listed | {"manifest.json"}
    assert manifest["patients"] and manifest["seed"] == 11


def test_same_seed_same_bytes_other_seed_other_uids(tmp_path: Path) -> None:
    args = ["--generate", "--scenario", "default", "--scenario", "charset_japanese",
            "--scenario", "cu_private_tag", "--no-progress"]
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert run_tool(*args, "--seed", seed, "--output", tmp_path / name,
                        cwd=tmp_path).code == 0
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    uids = [{e["sop_uid"] for e in json.loads((tmp_path / n / "manifest.json").read_text())[
        "instances"]} for n in "ac"]
    assert not uids[0] & uids[1]


@pytest.mark.parametrize(("modality", "size"), [("CT", "512x512"), ("MR", "37x3"),
                                               ("CT", "1x1")])
def test_series_template_writes_the_same_bytes_as_pydicom(modality: str, size: str) -> None:
    ns = dicom_sar.build_parser().parse_args([
        "--generate", "--scenario", modality.lower(), "--patients", "2", "--instances", "6",
        "--modality", modality, "--size", size, "--seed", "3"])
    plans = dicom_sar.plan_generation(dicom_sar.generate_plan_from_args(ns))
    assert len(plans) == 12 and all(dicom_sar.templated(p) for p in plans)
    assert dicom_sar.series_template(plans[0], 3) is not None  # the fast path is taken
    for plan in plans:
        assert b"".join(dicom_sar.instance_chunks(plan, 3)) == dicom_sar.encode_instance(plan, 3)


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_each_image_from_the_template_is_pydicoms_encoding(modality: str) -> None:
    """The per-image values are encoded without pydicom's writer: every slice of a long
    volume (positions of every rounding) must still be the bytes pydicom writes."""
    ns = dicom_sar.build_parser().parse_args([
        "--generate", "--scenario", modality.lower(), "--patients", "1", "--instances", "400",
        "--modality", modality, "--size", "4x4", "--seed", "5"])
    plans = dicom_sar.plan_generation(dicom_sar.generate_plan_from_args(ns))
    template = dicom_sar.series_template(plans[0], 5)
    assert template is not None and len(plans) == 400
    for plan in plans:
        chunks = dicom_sar.from_template(template, plan, 5)
        assert chunks is not None and b"".join(chunks) == dicom_sar.encode_instance(plan, 5)


def test_flat_layout_and_counts(tmp_path: Path) -> None:
    run = run_tool("--generate", "--scenario", "ct", "--instances", "3", "--size", "32x32",
                   "--layout", "flat", "--output", tmp_path / "o", cwd=tmp_path)
    assert run.code == 0, run.err
    files = [p for p in (tmp_path / "o").iterdir() if p.name != "manifest.json"]
    assert len(files) == 3 and all(read(p).Rows == 32 for p in files)


USER_CONFIG = {
    "outputDir": "cfg_out",
    "current_study": {"cancerous": True, "count": 4, "description": "Screening mammo",
                      "images": [{"tags": {"SeriesDescription": "R CC", "(0008,0080)": "SITE A",
                                           "Rows": 64, "Columns": 64}},
                                 {"tags": {"SeriesDescription": "L CC"}}]},
    "internal_priors": [{"cancerous": False, "count": 2, "images": []}],
    "external_priors": [{"description": "Outside study", "count": 1,
                         "images": [{"tags": {"StudyDate": "20231345"},
                                     "fault": "invalid_date"}]}],
}


def test_config_round_trips(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps(USER_CONFIG))
    run = run_tool("--generate", "--config", tmp_path / "c.json", "--seed", "2", cwd=tmp_path)
    assert run.code == 0, run.err
    m = json.loads((tmp_path / "cfg_out" / "manifest.json").read_text())
    roles = [e["study_role"] for e in m["instances"]]
    assert roles == ["current"] * 4 + ["internal_prior"] * 2 + ["external_prior"]
    first = read(tmp_path / "cfg_out" / m["instances"][0]["path"])
    assert (first.SeriesDescription, first.InstitutionName, first.Rows) == ("R CC", "SITE A", 64)
    assert "cancerous" in first.StudyDescription
    assert read(tmp_path / "cfg_out" / m["instances"][1]["path"]).SeriesDescription == "L CC"
    ext = m["instances"][-1]
    assert ext["fault"] == "invalid_date" and ext["expect"] == "reject"
    assert read(tmp_path / "cfg_out" / ext["path"]).get_item(0x00080020).value == b"20231345"


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda c: c["current_study"]["images"][1]["tags"].update(Rowz=5),
     "current_study.images[1].tags.Rowz"),
    (lambda c: c["current_study"]["images"][0]["tags"].update(StudyDate="2023-01-01"),
     "current_study.images[0].tags.StudyDate: invalid for VR DA"),
    (lambda c: c.update(current_stud={}), "current_stud: unknown key"),
    (lambda c: c["internal_priors"].append({"count": -1}), "internal_priors[1].count"),
    (lambda c: c.update(patient={"PatientBirthDate": "1990-02-30"}),
     "patient.PatientBirthDate: invalid for VR DA"),
    (lambda c: c.update(patient={"PatientID": "X" * 65}), "patient.PatientID: invalid for VR LO"),
    (lambda c: c.update(patient={"PatientAge": "040Y"}), "patient.PatientAge: unknown key"),
    (lambda c: c["current_study"].update(date="yesterday"),
     "current_study.date: invalid for VR DA"),
])
def test_bad_configs_write_nothing(mutate, message: str, tmp_path: Path) -> None:
    config = json.loads(json.dumps(USER_CONFIG))
    mutate(config)
    (tmp_path / "c.json").write_text(json.dumps(config))
    run = run_tool("--generate", "--config", tmp_path / "c.json", cwd=tmp_path)
    assert run.code == 2
    assert message in run.err
    assert not (tmp_path / "cfg_out").exists()


def test_malformed_json_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text('{"current_study": {')
    run = run_tool("--generate", "--config", tmp_path / "c.json", cwd=tmp_path)
    assert run.code == 2 and "malformed JSON at line 1" in run.err


def test_config_dry_run_prints_the_plan(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps(USER_CONFIG))
    run = run_tool("--generate", "--config", tmp_path / "c.json", "--dry-run", cwd=tmp_path)
    assert run.code == 0
    assert len(run.out.splitlines()) == 7 and "invalid_date" in run.out
    assert not (tmp_path / "cfg_out").exists()


def test_a_dry_run_piped_to_head_stops_with_141(tmp_path: Path) -> None:
    """A plan far longer than a pipe holds, read one line of: 141, no traceback, nothing
    written."""
    first, run = run_into_head("--generate", "--dry-run", "--scenario", "ct", "--patients",
                               "50", "--instances", "100", cwd=tmp_path)
    assert run.code == 141, run.err
    assert first.startswith(b"ct  PAT000000001  ")
    assert "Traceback" not in run.err and not (tmp_path / "dicom_sar_generated").exists()


def test_an_output_that_holds_other_files_is_refused(generated: Path, tmp_path: Path) -> None:
    """Synthetic patients never land among real data, and a manifest.json that is not ours
    is never replaced; an earlier --generate's tree (or an empty directory) is written
    again."""
    real = tmp_path / "archive"
    real.mkdir()
    (real / "manifest.json").write_text('{"mine": true}\n')
    shutil.copy(next(p for p in generated.rglob("*") if p.is_file() and p.suffix != ".json"),
                real / "1.2.3")
    before = tree_digest(real)
    for dry in ([], ["--dry-run"]):
        run = run_tool("--generate", "--output", real, *dry, cwd=tmp_path)
        assert run.code == 2 and "choose a new or empty directory" in run.err
    assert tree_digest(real) == before
    (tmp_path / "empty").mkdir()
    digests = []
    for _ in range(2):  # into an empty directory, then over that earlier output
        run = run_tool("--generate", "--output", tmp_path / "empty", "--seed", "4", cwd=tmp_path)
        assert run.code == 0, run.err
        digests.append(tree_digest(tmp_path / "empty"))
    assert len(digests[0]) > 1 and digests[0] == digests[1]  # same seed, same bytes


@pytest.mark.parametrize("patient_id", ["../../escaped_pid", "/tmp/absolute_pid", "..", "a/b"])
def test_no_config_value_becomes_a_path_outside_the_output(patient_id: str,
                                                          tmp_path: Path) -> None:
    work = tmp_path / "deep" / "er"
    work.mkdir(parents=True)
    config = {"patient": {"PatientID": patient_id}, "current_study": {"count": 2}}
    (work / "c.json").write_text(json.dumps(config))
    before = {p for p in tmp_path.rglob("*")} | set(Path("/tmp").glob("absolute_pid*"))
    run = run_tool("--generate", "--config", work / "c.json", "--output", work / "out",
                   cwd=work)
    assert run.code == 0, run.err
    written = {p for p in tmp_path.rglob("*")} | set(Path("/tmp").glob("absolute_pid*"))
    outside = [p for p in written - before if not p.is_relative_to(work)]
    assert outside == []
    m = json.loads((work / "out" / "manifest.json").read_text())
    for e in m["instances"]:
        assert (work / "out" / e["path"]).resolve().is_relative_to((work / "out").resolve())
        assert read(work / "out" / e["path"]).PatientID == patient_id  # the value is kept
