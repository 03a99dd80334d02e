"""--send against real receivers (DCMTK storescp, Orthanc) and a scriptable faulty one.

Every server runs in a private network namespace that has only a loopback interface, and so
does the sender: no test traffic can leave 127.0.0.1, whatever address a server binds.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pydicom
import pytest

from conftest import (
    FREE_THREADED_BUILD,
    HTTP_PORT,
    PORT,
    TOOL,
    Namespace,
    instances,
    need,
    openssl,
    read,
    run_tool,
    tree_of,
)


@pytest.fixture
def storescp(ns: Namespace, tmp_path: Path):
    """DCMTK storescp (uncompressed syntaxes only, its default) storing into rx/."""
    rx = tmp_path / "rx"
    rx.mkdir()

    def start(*extra: str) -> subprocess.Popen[bytes]:
        proc = ns.start(need("storescp"), "--fork", "-aet", "STORESCP", "-od", rx, *extra,
                        PORT, env={"TCP_NODELAY": "1"}, log=tmp_path / "storescp.log")
        ns.wait_for_port(PORT)
        return proc

    start.rx = rx  # type: ignore[attr-defined]
    return start


def send(ns: Namespace, tree: Path, tmp_path: Path, *extra: str, called: str = "STORESCP",
         port: int = PORT) -> tuple[int, dict, str]:
    run = run_tool("--send", "--path", tree, "-H", "127.0.0.1", "-p", port, "-a", called,
                   "--log-dir", tmp_path / "logs", "--no-progress", *extra, cwd=tmp_path,
                   prefix=ns.prefix, timeout=300)
    summaries = sorted((tmp_path / "logs").glob("dicom_sender_summary_*.json"),
                       key=lambda p: p.stat().st_mtime)
    summary = json.loads(summaries[-1].read_text()) if summaries else {}
    return run.code, summary, run.err


def received(rx: Path) -> dict[str, pydicom.Dataset]:
    """The instances a receiver stored, by SOP Instance UID (a file that a receiver killed
    mid-transfer left behind, cut short before its UID, is not one)."""
    stored = (read(p) for p in rx.iterdir() if p.is_file())
    return {str(ds.SOPInstanceUID): ds for ds in stored if "SOPInstanceUID" in ds}


def test_everything_arrives_intact_at_storescp(ns, storescp, generated: Path, manifest: dict,
                                               tmp_path: Path) -> None:
    storescp()
    tree = tree_of(generated, manifest, tmp_path, "multi_patient", "charset_japanese",
                   "implicit_vr", "big_endian", "deflated", "no_preamble", "ct")
    code, summary, err = send(ns, tree, tmp_path, "-t", "2")
    assert code == 0, err
    files = [p for p in tree.rglob("*") if p.is_file()]
    assert summary["successful_transfers"] == len(files) == summary["total_files"]
    assert summary["failed_transfers"] == 0 and summary["threads_used"] == 2
    assert summary["free_threaded"] is FREE_THREADED_BUILD
    assert f"Found {len(files)} DICOM files, grouped into" in err
    got = received(storescp.rx)
    for path in files:
        sent = read(path)
        arrived = got[str(sent.SOPInstanceUID)]
        for elem in sent:  # the dataset equals; only the file meta is the receiver's own
            if elem.tag != 0x7FE00010:
                assert arrived[elem.tag].value == elem.value, (path.name, elem.tag)
        assert arrived.PixelData == sent.PixelData or sent.file_meta.TransferSyntaxUID == \
            pydicom.uid.ExplicitVRBigEndian  # big endian words arrive byte-swapped, same values
    log = next((tmp_path / "logs").glob("dicom_sender_*.log")).read_text()
    assert log.count("sent: ") == len(files)
    for entry in instances(manifest, scenario="multi_patient"):
        assert entry["patient_name"] not in log  # names of files and tags, no patient values


def test_compressed_files_fail_with_a_reason_the_rest_arrives(ns, storescp, generated: Path,
                                                              manifest: dict,
                                                              tmp_path: Path) -> None:
    storescp()
    tree = tree_of(generated, manifest, tmp_path, "compressed", "default")
    code, summary, _err = send(ns, tree, tmp_path)
    assert code == 1
    assert (summary["successful_transfers"], summary["failed_transfers"]) == (4, 4)
    reasons = {f["reason"] for f in summary["failed_files"]}
    assert reasons == {"the receiver accepted no presentation context for Digital Mammography "
                       "X-Ray Image Storage - For Presentation in RLE Lossless"}
    assert len(received(storescp.rx)) == 4


def test_echo_works_and_fails(ns, storescp, tmp_path: Path) -> None:
    storescp()
    ok = run_tool("--echo", "-H", "127.0.0.1", "-p", PORT, "-a", "STORESCP", cwd=tmp_path,
                  prefix=ns.prefix)
    assert ok.code == 0 and "success" in ok.out and "ms round trip" in ok.out
    bad = run_tool("--echo", "-H", "127.0.0.1", "-p", PORT + 1, "-a", "STORESCP",
                   "--acse-timeout", "2", cwd=tmp_path, prefix=ns.prefix)
    assert bad.code == 1 and "no association" in bad.err


def test_dry_run_plans_without_connecting(generated: Path, manifest: dict,
                                          tmp_path: Path) -> None:
    tree = tree_of(generated, manifest, tmp_path, "multi_patient")
    run = run_tool("--send", "--dry-run", "--path", tree, "-H", "127.0.0.1", "-p", "9",
                   "-a", "NOBODY", cwd=tmp_path)
    assert run.code == 0
    assert run.out.count("association 1: 4 files, 2 presentation contexts") == 6


@pytest.mark.parametrize(("bad", "message"), [
    (["-a", "THIS_TITLE_IS_TOO_LONG"], "an AE title is 1-16 printable characters"),
    (["-a", "BAD\\AE"], "an AE title is 1-16 printable characters"),
    (["-c", ""], "an AE title is 1-16 printable characters"),
    (["-p", "0"], "--port 0: use 1-65535"), (["-p", "70000"], "--port 70000: use 1-65535")])
def test_ae_titles_and_ports_are_usage_errors(bad: list[str], message: str,
                                              tmp_path: Path) -> None:
    args = {"-H": "127.0.0.1", "-p": "104", "-a": "STORESCP"} | dict(zip(bad[::2], bad[1::2],
                                                                         strict=True))
    run = run_tool("--send", "--path", tmp_path, *[x for kv in args.items() for x in kv],
                   cwd=tmp_path)
    assert run.code == 2 and message in run.err, run.err


def test_receiver_stopped_mid_run(ns, storescp, generated: Path, manifest: dict,
                                  tmp_path: Path) -> None:
    proc = storescp()
    tree = tree_of(generated, manifest, tmp_path, "ct", "mr")
    total = sum(1 for p in tree.rglob("*") if p.is_file())
    sender = subprocess.Popen([*ns.prefix, sys.executable, str(Path(__file__).parent.parent /
                                                               "dicom_sar.py"),
                               "--send", "--path", str(tree), "-H", "127.0.0.1", "-p", str(PORT),
                               "-a", "STORESCP", "--retries", "1", "--acse-timeout", "2",
                               "--log-dir", str(tmp_path / "logs"), "--no-progress"],
                              cwd=tmp_path, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(list(storescp.rx.iterdir())) < 5 and time.time() < deadline:
        time.sleep(0.01)
    ns.stop(proc)  # the receiver dies in the middle of the transfer
    sender.wait(timeout=120)
    assert sender.returncode == 1
    first = json.loads(next((tmp_path / "logs").glob("dicom_sender_summary_*")).read_text())
    arrived = len(received(storescp.rx))
    assert first["successful_transfers"] <= arrived < total
    assert first["successful_transfers"] + first["failed_transfers"] == total
    storescp()
    code, second, err = send(ns, tree, tmp_path)
    assert code == 0, err
    assert second["successful_transfers"] == total and second["failed_transfers"] == 0


FAKE_SCP = textwrap.dedent("""
    # A scriptable Storage SCP: fail every Nth store, reject the first K associations as busy,
    # stall (never answer), and record the largest number of simultaneous associations.
    import json, os, sys, threading, time
    from pynetdicom import AE, evt, AllStoragePresentationContexts, _config
    _config.LOG_HANDLER_LEVEL = "none"
    opts = json.loads(sys.argv[1])
    state = {"stores": 0, "active": 0, "max_active": 0, "assocs": 0, "stored": []}
    lock = threading.Lock()

    def dump():  # atomically: the test polls this file
        with open(opts["state"] + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(opts["state"] + ".tmp", opts["state"])

    def on_request(event):
        with lock:
            state["assocs"] += 1
            busy = state["assocs"] <= opts.get("reject_busy", 0)
        if busy:
            event.assoc.acse.send_reject(0x02, 0x03, 0x02)  # transient: local limit exceeded

    def on_open(event):
        with lock:
            state["active"] += 1
            state["max_active"] = max(state["max_active"], state["active"])
            dump()

    def on_close(event):
        with lock:
            state["active"] -= 1
            dump()

    def on_store(event):
        time.sleep(opts.get("delay", 0))
        with lock:
            state.setdefault("tries", []).append(event.request.AffectedSOPInstanceUID)
            dump()
        if opts.get("stall") or event.request.AffectedSOPInstanceUID == opts.get("stall_uid"):
            time.sleep(3600)
        with lock:
            state["stores"] += 1
            n = state["stores"]
            fail = opts.get("fail_every") and n % opts["fail_every"] == 0
            if not fail:
                state["stored"].append(event.request.AffectedSOPInstanceUID)
            dump()
        return 0xA700 if fail else 0x0000

    ae = AE(ae_title="FAKESCP")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.maximum_associations = 20
    handlers = [(evt.EVT_REQUESTED, on_request), (evt.EVT_ESTABLISHED, on_open),
                (evt.EVT_RELEASED, on_close), (evt.EVT_ABORTED, on_close),
                (evt.EVT_C_STORE, on_store)]
    dump()
    ae.start_server(("127.0.0.1", opts["port"]), block=True, evt_handlers=handlers)
""")


@pytest.fixture
def fake_scp(ns: Namespace, tmp_path: Path):
    """Start the scriptable SCP with options; returns a function reading its state."""
    script = tmp_path / "fake_scp.py"
    script.write_text(FAKE_SCP)
    state = tmp_path / "scp_state.json"

    def start(**opts: object):
        ns.start(sys.executable, script, json.dumps({"port": PORT, "state": str(state), **opts}),
                 log=tmp_path / "fake_scp.log")
        ns.wait_for_port(PORT)
        return lambda: json.loads(state.read_text())

    return start


def test_several_associations_run_at_once(ns, fake_scp, generated: Path, manifest: dict,
                                          tmp_path: Path) -> None:
    state = fake_scp(delay=0.05)
    tree = tree_of(generated, manifest, tmp_path, "multi_patient")
    code, summary, err = send(ns, tree, tmp_path, "-t", "3", called="FAKESCP")
    assert code == 0, err
    assert summary["studies_processed"] == 6 and state()["assocs"] == 6
    assert state()["max_active"] >= 2  # the receiver saw simultaneous associations
    assert summary["free_threaded"] is FREE_THREADED_BUILD


def test_failure_statuses_are_reported_and_never_counted_as_sent(ns, fake_scp, generated: Path,
                                                                 manifest: dict,
                                                                 tmp_path: Path) -> None:
    state = fake_scp(fail_every=3)
    tree = tree_of(generated, manifest, tmp_path, "multi_patient")
    code, summary, _ = send(ns, tree, tmp_path, called="FAKESCP")
    assert code == 1
    assert summary["successful_transfers"] == len(state()["stored"]) == 16
    assert summary["failed_transfers"] == 8
    assert all(f["reason"].startswith("0xA700 Refused: Out of Resources")
               for f in summary["failed_files"])


def test_busy_receiver_is_retried(ns, fake_scp, generated: Path, manifest: dict,
                                  tmp_path: Path) -> None:
    state = fake_scp(reject_busy=2)
    tree = tree_of(generated, manifest, tmp_path, "default")
    code, summary, err = send(ns, tree, tmp_path, "--retries", "3", called="FAKESCP")
    assert code == 0, err
    assert summary["successful_transfers"] == 4 and state()["assocs"] == 3


def test_silent_receiver_times_out(ns, fake_scp, generated: Path, manifest: dict,
                                   tmp_path: Path) -> None:
    state = fake_scp(stall=True)
    tree = tree_of(generated, manifest, tmp_path, "default")
    code, summary, _ = send(ns, tree, tmp_path, "--retries", "1", "--dimse-timeout", "1",
                            called="FAKESCP")
    assert code == 1
    assert summary["successful_transfers"] == 0 == len(state()["stored"])
    assert summary["failed_transfers"] == 4
    assert summary["failed_files"][0]["reason"].startswith(
        "no response within --dimse-timeout 1 s while this file was sent; not sent again")
    assert len(state()["tries"]) == 4  # each file once: none is sent first again


def test_a_file_the_receiver_stalls_on_fails_alone(ns, fake_scp, generated: Path,
                                                   manifest: dict, tmp_path: Path) -> None:
    tree = tree_of(generated, manifest, tmp_path, "ct")  # one study of 16 slices
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    victim = str(read(files[3]).SOPInstanceUID)
    state = fake_scp(stall_uid=victim)
    code, summary, _ = send(ns, tree, tmp_path, "--dimse-timeout", "1", called="FAKESCP")
    assert code == 1
    assert (summary["successful_transfers"], summary["failed_transfers"]) == (15, 1)
    assert state()["tries"].count(victim) == 1 and len(state()["stored"]) == 15
    (failed,) = [f for f in summary["files"] if f["outcome"] == "failed"]
    assert failed["sop_instance_uid"] == victim and failed["status"] is None
    assert {f["sop_instance_uid"] for f in summary["files"] if f["outcome"] == "sent"} == \
        set(state()["stored"])


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_send_finishes_the_file_on_the_wire_and_summarises(
        sig: int, code: int, ns, fake_scp, generated: Path, manifest: dict,
        tmp_path: Path) -> None:
    state = fake_scp(delay=0.2)
    tree = tree_of(generated, manifest, tmp_path, "multi_patient")
    proc = subprocess.Popen([*ns.prefix, sys.executable, str(TOOL), "--send", "--path", tree,
                             "-H", "127.0.0.1", "-p", str(PORT), "-a", "FAKESCP", "-t", "1",
                             "--log-dir", tmp_path / "logs", "--no-progress"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while state()["stores"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    (path,) = (tmp_path / "logs").glob("dicom_sender_summary_*.json")
    summary = json.loads(path.read_text())
    stored = len(state()["stored"])
    assert summary["successful_transfers"] == stored and 2 <= stored < 24
    assert summary["failed_transfers"] == 0
    assert summary["not_sent_stopped"] == 24 - stored
    assert b"summary" in err and b"files not sent" in err


def test_orthanc_holds_exactly_what_was_sent(ns, orthanc, generated: Path, manifest: dict,
                                             tmp_path: Path) -> None:
    tree = tree_of(generated, manifest, tmp_path, "multi_patient", "external_prior")
    code, summary, err = send(ns, tree, tmp_path, "-t", "2", "--verify", called="ORTHANC")
    assert code == 0, err
    assert "verify:" not in err
    stats = orthanc("/statistics")
    entries = [e for s in ("multi_patient", "external_prior")
               for e in instances(manifest, scenario=s)]
    assert stats["CountInstances"] == len(entries) == summary["successful_transfers"]
    assert stats["CountStudies"] == len({e["study_uid"] for e in entries})
    assert stats["CountPatients"] == len({e["patient_id"] for e in entries})
    assert len(orthanc("/studies")) == stats["CountStudies"]


def test_verify_is_per_instance(ns, orthanc, generated: Path, manifest: dict,
                                tmp_path: Path) -> None:
    """A study the PACS already held gives no mismatch; an instance it acknowledged and then
    did not keep (deleted by an Orthanc Lua script right after storing it, as a filtering
    PACS does) is named by file."""
    tree = tree_of(generated, manifest, tmp_path, "default")
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    code, _, err = send(ns, tree, tmp_path, "--verify", called="ORTHANC")
    assert code == 0 and "verify:" not in err, err
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(files[0], one / "x")  # its study is complete on the PACS already
    code, _, err = send(ns, one, tmp_path, "--verify", called="ORTHANC")
    assert code == 0 and "verify:" not in err, err
    victim = str(read(files[1]).SOPInstanceUID)
    (tmp_path / "drop.lua").write_text(
        "function OnStoredInstance(instanceId, tags, metadata, origin)\n"
        f"  if tags['SOPInstanceUID'] == '{victim}' then\n"
        "    RestApiDelete('/instances/' .. instanceId)\n  end\nend\n")
    for study in orthanc("/studies"):
        ns.python("import urllib.request; urllib.request.urlopen(urllib.request.Request("
                  f"'http://127.0.0.1:{HTTP_PORT}/studies/{study}', method='DELETE'))")
    orthanc.restart(lua=tmp_path / "drop.lua")
    code, summary, err = send(ns, tree, tmp_path, "--verify", called="ORTHANC")
    assert code == 1 and summary["successful_transfers"] == 4
    (line,) = [x for x in err.splitlines() if x.startswith("verify:")]
    assert line == f"verify: {files[1]}: acknowledged (status 0x0000) but not held by the " \
                   "receiver"


def test_nobody_listening_fails_fast_and_says_so(ns, generated: Path, manifest: dict,
                                                tmp_path: Path) -> None:
    """A wrong port: the reason says there is no connection (pynetdicom calls it an abort),
    and once one study has spent its retries, the others are not tried one by one."""
    tree = tree_of(generated, manifest, tmp_path, "default", "ct", "mr", "multi_patient")
    studies = {str(read(p).StudyInstanceUID) for p in tree.rglob("*") if p.is_file()}
    assert len(studies) >= 6
    code, summary, err = send(ns, tree, tmp_path, "-t", "2", "--retries", "1")  # no storescp
    assert code == 1, err
    reasons = [f["reason"] for f in summary["failed_files"]]
    assert summary["successful_transfers"] == 0 and len(reasons) == summary["total_files"]
    assert all(r.startswith("no connection to 127.0.0.1:11112 (refused or timed out)")
               for r in reasons)
    tried = {f["path"].split("/")[-3] for f, r in zip(summary["failed_files"], reasons,
                                                      strict=True) if "not tried" not in r}
    assert 1 <= len(tried) <= 2  # the two workers' first studies; the rest failed at once


def test_wrong_called_ae_is_a_clear_error(ns, orthanc, generated: Path, manifest: dict,
                                          tmp_path: Path) -> None:
    tree = tree_of(generated, manifest, tmp_path, "default")
    code, summary, _err = send(ns, tree, tmp_path, called="NOT_ORTHANC")
    assert code == 1
    assert summary["successful_transfers"] == 0 and summary["failed_transfers"] == 4
    reason = summary["failed_files"][0]["reason"]
    assert "NOT_ORTHANC@127.0.0.1:11112 (we are AE DICOM_SAR) rejected the association " \
           "(Rejected Permanent)" in reason
    assert "Called AE title not recognised" in reason and "check -a/--ae-title" in reason


def test_files_without_identity_are_errors_for_that_file(generated: Path, manifest: dict,
                                                        tmp_path: Path) -> None:
    tree = tree_of(generated, manifest, tmp_path, "default")
    victim = next(p for p in tree.rglob("*") if p.is_file())
    ds = read(victim)
    del ds.StudyInstanceUID
    ds.save_as(victim)
    run = run_tool("--send", "--dry-run", "--path", tree, "-H", "127.0.0.1", "-p", "9",
                   "-a", "NOBODY", cwd=tmp_path)
    assert run.code == 1
    assert "Found 3 DICOM files, grouped into 1 studies" in run.err
    (line,) = (tmp_path / "errors.log").read_text().splitlines()
    assert "cannot send without StudyInstanceUID" in line and victim.name in line


def test_a_study_needing_more_than_128_contexts_is_split() -> None:
    import dicom_sar
    files = [dicom_sar.Indexed(Path(f"f{i}"), "1.2.3", f"1.2.840.10008.5.1.4.1.1.{i}",
                               f"1.2.3.{i}", pydicom.uid.JPEGBaseline8Bit, 10, True)
             for i in range(100)]
    batches = dicom_sar.association_batches(files)
    assert [len(b) for b, _ in batches] == [42, 42, 16]  # 3 contexts per SOP class
    assert all(len(contexts) <= 128 for _, contexts in batches)
    assert [f for b, _ in batches for f in b] == files  # in order, each file once
    first_contexts = set(batches[0][1])
    assert (files[0].sop_class, pydicom.uid.JPEGBaseline8Bit) in first_contexts
    assert (files[0].sop_class, pydicom.uid.ExplicitVRLittleEndian) in first_contexts


def test_the_association_thread_never_takes_the_response_we_wait_for(ns, storescp) -> None:
    """pynetdicom's association thread polls the DIMSE queue between our calls; when its
    pause handshake lost a race it took the response a C-STORE or C-FIND waited for (CI: a
    stored file 'no response within --dimse-timeout', a held file 'not held'). A response
    left on the queue stays there, however often that thread goes round."""
    storescp()
    out = ns.python(textwrap.dedent(f"""
        import sys, threading
        sys.path.insert(0, {str(TOOL.parent)!r})
        import dicom_sar
        from pynetdicom.dimse_primitives import C_ECHO
        dicom_sar.load_pydicom()
        target = dicom_sar.options_from_args(dicom_sar.build_parser().parse_args(
            ["--send", "--path", "/", "-H", "127.0.0.1", "-p", "{PORT}", "-a", "STORESCP"])).send
        tried = dicom_sar.open_association(target, [("1.2.840.10008.1.1", "1.2.840.10008.1.2")])
        assoc = tried.assoc
        assert assoc is not None, tried.why
        response = C_ECHO()
        response.MessageIDBeingRespondedTo, response.Status = 1, 0x0000
        assoc.dimse.msg_queue.put((1, response))
        rounds, went_round = [], threading.Event()
        asked = assoc.acse.is_release_requested

        def counted():  # the thread asks this once a round, after its poll
            rounds.append(1)
            if len(rounds) >= 20:
                went_round.set()
            return asked()

        assoc.acse.is_release_requested = counted
        print("went round:", went_round.wait(timeout=10))
        left = list(assoc.dimse.msg_queue.queue) == [(1, response)]
        print("left:", left)
        if left:
            assoc.dimse.msg_queue.get()
            print("echo:", assoc.send_c_echo().Status)
            assoc.release()
        else:
            assoc.abort()"""))
    assert out.split("\n")[:3] == ["went round: True", "left: True", "echo: 0"], out


def test_raw_index_agrees_with_pydicom_on_every_file(generated: Path, fuzz_tree: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Indexing reads three UIDs by raw scan; pydicom must see the same for every file."""
    import dicom_sar
    from conftest import pydicom_files
    dicom_sar.load_pydicom()
    opts = dicom_sar.options_from_args(dicom_sar.build_parser().parse_args(
        ["--send", "--path", "/", "-H", "127.0.0.1", "-p", "104", "-a", "ANY"]))
    files = [*pydicom_files(), *(p for p in generated.rglob("*") if p.is_file()),
             *sorted(fuzz_tree.iterdir())]

    def index_all() -> list[tuple]:
        results = [dicom_sar.guarded(lambda c: dicom_sar.index_task(c, opts),
                                     dicom_sar.Candidate(p, p)) for p in files]
        return [(r.status, r.error_type, r.record) for r in results]

    used = 0
    for path in files:
        try:
            dicom_sar.raw_header(path, dicom_sar.INDEX_TAGS)
            used += 1
        except dicom_sar.RAW_FALLBACK:
            pass
    raw = index_all()
    monkeypatch.setattr(dicom_sar, "raw_header", lambda *a: (_ for _ in ()).throw(
        dicom_sar.RawScanError("forced")))
    assert raw == index_all()
    assert used > len(files) // 2  # the raw path really answers for most files


def bad_files(generated: Path, manifest: dict, where: Path) -> dict[str, Path]:
    """One file of each class that stalls a receiver when sent as it is, made with pydicom
    from generated ones: deflated, file meta against the dataset, cut short, a wrong item
    length, no SOPClassUID in the dataset."""
    where.mkdir(parents=True, exist_ok=True)
    plain = [generated / e["path"] for e in instances(manifest, scenario="nested_sequences")]
    made = {"deflated": where / "deflated"}
    shutil.copy(generated / instances(manifest, scenario="deflated")[0]["path"],
                made["deflated"])
    ds = read(plain[0])
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(where / "meta_mismatch")
    made["meta_mismatch"] = where / "meta_mismatch"
    data = plain[1].read_bytes()
    (where / "cut_short").write_bytes(data[:len(data) - 100])
    made["cut_short"] = where / "cut_short"
    at = data.index(b"\xfe\xff\x00\xe0")  # the first item (OtherPatientIDsSequence)
    (where / "item_length").write_bytes(data[:at + 4] + b"\x00\x10\x00\x00" + data[at + 8:])
    made["item_length"] = where / "item_length"
    ds = read(plain[2])
    del ds.SOPClassUID
    ds.save_as(where / "no_sop_class")
    made["no_sop_class"] = where / "no_sop_class"
    return made


@pytest.mark.parametrize("receiver", ["orthanc", "storescp"])
def test_real_archive_bad_files_fail_alone_and_fast(receiver: str, request, ns, generated: Path,
                                                    manifest: dict, tmp_path: Path) -> None:
    """Good files among one of each bad class: every good file is stored, deflate inflated,
    the dataset's own UIDs sent; broken files are refused locally with their reason; no
    DIMSE timeout and no retry is spent on any of them (the log says so)."""
    tree = tree_of(generated, manifest, tmp_path, "default", "multi_patient")
    made = bad_files(generated, manifest, tree / "bad")
    if receiver == "orthanc":
        rest = request.getfixturevalue("orthanc")
        called = "ORTHANC"
    else:
        request.getfixturevalue("storescp")()
        called = "STORESCP"
    code, summary, err = send(ns, tree, tmp_path, "-t", "2", "--dimse-timeout", "20",
                              called=called)
    assert code == 1, err  # the broken files are errors
    errors = (tmp_path / "logs" / "errors.log").read_text()
    for name in ("cut_short", "item_length", "no_sop_class"):
        assert f"bad/{name}:" in errors, name
    assert "cannot send without SOPClassUID in the dataset" in errors
    assert "SendFailed" not in errors  # refused here, never sent
    assert "bad/cut_short: TruncatedFileError: PixelData declares" in errors
    assert "bad/item_length: UnreadableFileError: item length does not add up" in errors
    by_path = {Path(f["path"]).name: f for f in summary["files"]}
    assert by_path["deflated"]["outcome"] == "sent"
    assert by_path["meta_mismatch"]["outcome"] == "sent"
    assert by_path["meta_mismatch"]["sop_instance_uid"] == str(read(made["meta_mismatch"])
                                                               .SOPInstanceUID)
    assert summary["failed_transfers"] == 0 and summary["successful_transfers"] == 28 + 2
    log = next((tmp_path / "logs").glob("dicom_sender_*.log")).read_text()
    assert "no response within" not in log and "association lost" not in log
    assert "file meta disagrees with the dataset" in log and "meta_mismatch" in log
    assert "converted: " in log and "deflated: Deflated Explicit VR Little Endian -> " in log
    if receiver == "orthanc":
        assert rest("/statistics")["CountInstances"] == 30
        for f in summary["files"]:
            found = json.loads(ns.python(
                "import urllib.request, json; print(urllib.request.urlopen("
                f"urllib.request.Request('http://127.0.0.1:{HTTP_PORT}/tools/lookup', "
                f"data=b'{f['sop_instance_uid']}', method='POST')).read().decode())"))
            assert [x["Type"] for x in found] == ["Instance"], f


def test_real_files_all_stored_that_dcmtk_stores(ns, orthanc, real_files: list[Path],
                                                 tmp_path: Path) -> None:
    """pydicom's test files and the corpus (vendors, syntaxes, damage): no file stalls the
    run, Orthanc holds every file the summary says it acknowledged, and --verify (C-FIND)
    agrees, a series UID that is not one included."""
    tree = tmp_path / "real"
    tree.mkdir()
    for i, src in enumerate(real_files):
        shutil.copy(src, tree / f"{i:03d}")
    code, summary, err = send(ns, tree, tmp_path, "-t", "2", "--dimse-timeout", "20",
                              "--verify", called="ORTHANC")
    assert code == 1 and "Traceback" not in err  # the corpus holds broken files on purpose
    assert summary["verify"] == {"made": True, "error": None, "unchecked": 0, "not_held": 0}
    log = next((tmp_path / "logs").glob("dicom_sender_*.log")).read_text()
    assert "no response within" not in log  # nothing was left for the receiver to stall on
    held = {x["MainDicomTags"]["SOPInstanceUID"] for x in orthanc("/instances?expand")}
    acknowledged = {f["sop_instance_uid"] for f in summary["files"] if f["outcome"] == "sent"}
    assert acknowledged <= held and len(held) >= 95


# ── DICOM TLS ────────────────────────────────────────────────────────────────────────────

@pytest.fixture
def tls_storescp(ns: Namespace, tmp_path: Path, certs: Path):
    """DCMTK storescp speaking DICOM TLS on PORT with a certificate of ours."""
    rx = tmp_path / "rx_tls"
    rx.mkdir()

    def start(cert: str = "server", *extra: str) -> None:
        ns.start(need("storescp"), "--fork", "-aet", "STORESCP", "-od", rx, "+tls",
                 certs / f"{cert}.key", certs / f"{cert}.crt", "+cf", certs / "ca.crt",
                 *(extra or ["-vc"]), PORT, log=tmp_path / "storescp.log")
        ns.wait_for_port(PORT)

    start.rx = rx  # type: ignore[attr-defined]
    return start


def test_tls_send_arrives_whole_and_says_encrypted(ns, tls_storescp, certs: Path,
                                                  generated: Path, manifest: dict,
                                                  tmp_path: Path) -> None:
    tls_storescp()
    tree = tree_of(generated, manifest, tmp_path, "default")
    code, summary, err = send(ns, tree, tmp_path, "--tls-ca", certs / "ca.crt")
    assert code == 0, err
    assert summary["successful_transfers"] == 4 == len(received(tls_storescp.rx))
    assert summary["tls"]["encrypted"] is True and summary["tls"]["verified"] is True
    assert summary["tls"]["protocol"] in ("TLSv1.2", "TLSv1.3")
    log = next((tmp_path / "logs").glob("dicom_sender_*.log")).read_text()
    assert f"transport: encrypted, {summary['tls']['protocol']}" in log
    echo = run_tool("--echo", "-H", "127.0.0.1", "-p", PORT, "-a", "STORESCP", "--tls-ca",
                    certs / "ca.crt", cwd=tmp_path, prefix=ns.prefix)
    assert echo.code == 0 and "success" in echo.out and "TLSv1." in echo.out


@pytest.mark.parametrize(("case", "expected"), [
    ("wrong_ca", "the receiver's certificate is not accepted"),
    ("wrong_host", "the receiver's certificate is not accepted: IP address mismatch"),
    ("no_client_cert", "or does it want a client certificate (--tls-cert, --tls-key)?"),
    ("plain_receiver", "does the receiver speak TLS on this port?"),
    ("tls_receiver_plain_sender", "or does it speak TLS only (--tls)?"),
])
def test_tls_failures_are_clear_and_nothing_is_sent(case: str, expected: str, ns,
                                                    tls_storescp, storescp, certs: Path,
                                                    generated: Path, manifest: dict,
                                                    tmp_path: Path) -> None:
    tree = tree_of(generated, manifest, tmp_path, "default")
    args: list[str | Path] = ["--tls-ca", certs / "ca.crt", "--retries", "0"]
    if case == "wrong_ca":
        tls_storescp()
        args[1] = certs / "other_ca.crt"
    elif case == "wrong_host":
        tls_storescp("wronghost")
    elif case == "no_client_cert":
        tls_storescp("server", "-rc")
    elif case == "plain_receiver":
        storescp()
    else:
        tls_storescp()
        args = ["--retries", "0"]
    code, summary, err = send(ns, tree, tmp_path, *args)
    assert code == 1, err
    assert summary["successful_transfers"] == 0 and summary["failed_transfers"] == 4
    assert all(expected in f["reason"] for f in summary["failed_files"]), \
        summary["failed_files"][0]["reason"]


def test_tls_client_certificate_and_missing_key(ns, tls_storescp, certs: Path,
                                               generated: Path, manifest: dict,
                                               tmp_path: Path) -> None:
    tls_storescp("server", "-rc")
    tree = tree_of(generated, manifest, tmp_path, "default")
    code, summary, err = send(ns, tree, tmp_path, "--tls-ca", certs / "ca.crt", "--tls-cert",
                              certs / "client.crt", "--tls-key", certs / "client.key")
    assert code == 0 and summary["successful_transfers"] == 4, err
    missing = run_tool("--send", "--path", tree, "-H", "127.0.0.1", "-p", PORT, "-a",
                       "STORESCP", "--tls-cert", certs / "client.crt", "--tls-key",
                       tmp_path / "nowhere.key", cwd=tmp_path, prefix=ns.prefix)
    assert missing.code == 1 and "cannot set up TLS" in missing.err
    assert "nothing sent" in missing.err and "nowhere.key" in missing.err


RELAY = textwrap.dedent("""
    # A TCP relay that records every byte from the client to the server.
    import socket, sys, threading
    listen, target, record = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    lock = threading.Lock()

    def pump(src, dst, keep):
        while data := src.recv(65536):
            if keep:
                with lock, open(record, "ab") as f:
                    f.write(data)
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)

    server = socket.create_server(("127.0.0.1", listen))
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", target))
        threading.Thread(target=pump, args=(client, upstream, True), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client, False), daemon=True).start()
""")


@pytest.mark.parametrize("tls", [True, False])
def test_tls_bytes_on_the_wire_are_encrypted(tls: bool, ns, tls_storescp, storescp,
                                             certs: Path, generated: Path, manifest: dict,
                                             tmp_path: Path) -> None:
    """A relay records what crosses loopback: the PatientName marker never shows with
    --tls, and does without it."""
    tls_storescp() if tls else storescp()
    script, record = tmp_path / "relay.py", tmp_path / "wire.bin"
    script.write_text(RELAY)
    ns.start(sys.executable, script, PORT + 1, PORT, record)
    ns.wait_for_port(PORT + 1)
    tree = tmp_path / "one"
    tree.mkdir()
    ds = read(generated / instances(manifest, scenario="default")[0]["path"])
    ds.PatientName = "MARKER^UNIQUE7731"
    ds.save_as(tree / "x")
    args = ["--tls-ca", certs / "ca.crt"] if tls else []
    code, summary, err = send(ns, tree, tmp_path, *args, port=PORT + 1)
    assert code == 0 and summary["successful_transfers"] == 1, err
    wire = record.read_bytes()
    assert len(wire) > 1000
    assert (b"MARKER^UNIQUE7731" in wire) is not tls


# ── the ingestion check: generate -> send -> settle -> check against the manifest ─────────

ANSWERS = textwrap.dedent("""
    from pydicom.dataset import Dataset

    def answers(kept, q):  # C-FIND at IMAGE level from {SOP instance: (study, series)}
        for uid, (study, series) in list(kept.items()):
            if study == q.StudyInstanceUID and series == q.get("SeriesInstanceUID", series):
                ident = Dataset()
                ident.QueryRetrieveLevel = "IMAGE"
                ident.StudyInstanceUID, ident.SeriesInstanceUID = study, series
                ident.SOPInstanceUID = uid
                yield 0xFF00, ident
        yield 0x0000, None
""")

STRICT_SCP = ANSWERS + textwrap.dedent("""
    # A strict ingestion system: refuses what the manifest marks reject, keeps the rest (but
    # for keep_uid, kept though it should be refused, and drop_uid, acknowledged and lost),
    # and answers C-FIND (Study Root, IMAGE level) from what it kept.
    import json, sys, threading
    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt, AllStoragePresentationContexts, _config
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
    _config.LOG_HANDLER_LEVEL = "none"
    opts = json.loads(sys.argv[1])
    refuse = {e["sop_uid"] for e in json.load(open(opts["manifest"]))["instances"]
              if e["expect"] == "reject" and e["fault"] != "duplicate_sop"}
    kept, lock = {}, threading.Lock()

    def on_store(event):
        ds = event.dataset
        uid = str(ds.SOPInstanceUID)
        with lock:
            if (uid in refuse or uid in kept) and uid != opts.get("keep_uid"):
                return 0xC000  # a fault, or a second instance with a UID it holds
            if uid != opts.get("drop_uid"):
                kept[uid] = (str(ds.StudyInstanceUID), str(ds.get("SeriesInstanceUID", "")))
        return 0x0000

    def on_find(event):
        yield from answers(kept, event.identifier)

    ae = AE(ae_title="STRICT")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.start_server(("127.0.0.1", opts["port"]), block=True,
                    evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_C_FIND, on_find)])
""")

INGEST_SCENARIOS = ["default", "cu_bits_mismatch", "pr_missing_dicom", "cu_duplicate_sop",
                    "cu_no_pixel_data", "truncated", "not_dicom"]


def ingest_test(ns, tmp_path: Path, called: str, *scenarios: str) -> tuple[int, dict, str]:
    args = [x for s in scenarios for x in ("--scenario", s)]
    run = run_tool("--ingest-test", *args, "--seed", "5", "--output", tmp_path / "gen",
                   "-H", "127.0.0.1", "-p", PORT, "-a", called, "--settle-timeout", "20",
                   "--log-dir", tmp_path / "logs", "--no-progress",
                   "--summary-json", tmp_path / "check.json", cwd=tmp_path, prefix=ns.prefix,
                   timeout=300)
    report = json.loads((tmp_path / "check.json").read_text())
    return run.code, report, run.out


def test_ingest_test_against_a_strict_system(ns, tmp_path: Path) -> None:
    """A receiver that refuses exactly what the manifest marks reject: no mismatch, exit
    0; then one kept that should have been refused and one lost that should have been
    kept: both reported, exit 1."""
    code, report, out = ingest_test_with_strict(ns, tmp_path / "a", {})
    assert code == 0, out
    assert report["mismatches"] == [] and report["unanswered"] == []
    assert "the PACS behaved exactly as the manifest expects" in out
    assert {m["scenario"] for m in report["indistinguishable"]} == {"cu_duplicate_sop"}
    manifest = json.loads((tmp_path / "a" / "gen" / "manifest.json").read_text())
    reject = next(e for e in manifest["instances"] if e["fault"] == "bits_mismatch")
    accept = next(e for e in manifest["instances"] if e["scenario"] == "default")
    code, report, out = ingest_test_with_strict(ns, tmp_path / "b", {
        "keep_uid": reject["sop_uid"], "drop_uid": accept["sop_uid"]})
    assert code == 1
    found = {(m["sop_uid"], m["expect"], m["held"]) for m in report["mismatches"]}
    assert found == {(reject["sop_uid"], "reject", True), (accept["sop_uid"], "accept", False)}
    assert f"mismatch: cu_bits_mismatch (fault bits_mismatch) {reject['path']}: expected " \
           "reject, the PACS holds it" in out
    assert report["scenarios"]["default"]["accept"] == {"expected": 4, "held": 3,
                                                        "mismatches": 1}


def ingest_test_with_strict(ns, tmp_path: Path, faults: dict) -> tuple[int, dict, str]:
    tmp_path.mkdir()
    script = tmp_path / "strict.py"
    script.write_text(STRICT_SCP)
    # the SCP needs the manifest before the send: plan it with a dry run of the same options
    plan = tmp_path / "plan"
    made = run_tool("--generate", *[x for s in INGEST_SCENARIOS for x in ("--scenario", s)],
                    "--seed", "5", "--output", plan, "--no-progress", cwd=tmp_path)
    assert made.code == 0, made.err
    proc = ns.start(sys.executable, script, json.dumps(
        {"port": PORT, "manifest": str(plan / "manifest.json"), **faults}),
        log=tmp_path / "strict.log")
    ns.wait_for_port(PORT)
    try:
        return ingest_test(ns, tmp_path, "STRICT", *INGEST_SCENARIOS)
    finally:
        ns.stop(proc)
        ns.procs.remove(proc)


def test_ingest_test_against_orthanc_reports_what_it_kept(ns, orthanc, tmp_path: Path) -> None:
    """Orthanc is lenient: it keeps most files the manifest marks reject. The report names
    exactly those it holds, checked against its REST API; a normal scenario passes."""
    code, report, out = ingest_test(ns, tmp_path, "ORTHANC", *INGEST_SCENARIOS)
    assert code == 1 and report["unanswered"] == []
    held = {x["MainDicomTags"]["SOPInstanceUID"] for x in orthanc("/instances?expand")}
    manifest = json.loads((tmp_path / "gen" / "manifest.json").read_text())
    accepted = {e["sop_uid"] for e in manifest["instances"] if e["expect"] == "accept"}
    expected = {e["sop_uid"] for e in manifest["instances"]
                if (e["sop_uid"] in held) != (e["expect"] == "accept")
                and not (e["expect"] != "accept" and e["sop_uid"] in accepted)}
    assert {m["sop_uid"] for m in report["mismatches"]} == expected
    assert any(m["fault"] == "bits_mismatch" for m in report["mismatches"])  # Orthanc kept it
    assert report["scenarios"]["default"]["accept"]["mismatches"] == 0
    normal = tmp_path / "normal"
    normal.mkdir()
    code, report, out = ingest_test(ns, normal, "ORTHANC", "multi_patient")
    assert code == 0 and report["mismatches"] == [], out


# ── Peers as users configure them: restrictive, hostile, broken ─────────────────────────

HOSTILE_SCP = ANSWERS + textwrap.dedent("""
    # A Storage and Study Root C-FIND SCP that misbehaves in one way (argv[1]: JSON options):
    # reject (every association, calling AE not recognised), abort_after (A-ABORT after that
    # many stores), refuse_find (C-FIND failure status 0xC000), pending_forever (C-FIND
    # answers Pending and never finishes), drop (closes the socket mid-PDU on the second
    # store and on any C-FIND), silent (accepts TCP connections and says nothing).
    import json, socket, sys, threading, time
    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt, AllStoragePresentationContexts, _config
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification
    _config.LOG_HANDLER_LEVEL = "none"
    opts = json.loads(sys.argv[1])
    how, stores, kept, lock = opts["how"], [0], {}, threading.Lock()
    if how == "silent":
        server = socket.create_server(("127.0.0.1", opts["port"]))
        held = []
        while True:
            held.append(server.accept()[0])

    def drop(event):  # a P-DATA-TF header that promises 1000 bytes, two of them, then close
        sock = event.assoc.dul.socket.socket
        sock.sendall(bytes([4, 0, 0, 0, 3, 232]) + b"\\x00\\x00")
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def on_store(event):
        with lock:
            stores[0] += 1
            n = stores[0]
        if how == "abort_after" and n > opts["n"]:
            event.assoc.abort()
            return 0xA700
        if how == "drop" and n == 2:
            drop(event)
            return 0xA700
        ds = event.dataset
        with lock:
            kept[str(ds.SOPInstanceUID)] = (str(ds.StudyInstanceUID),
                                            str(ds.get("SeriesInstanceUID", "")))
        return 0x0000

    def on_find(event):
        if how == "refuse_find":
            yield 0xC000, None
            return
        if how == "drop":
            drop(event)
            time.sleep(5)
            return
        ident = Dataset()
        ident.QueryRetrieveLevel = "IMAGE"
        ident.SOPInstanceUID = "1.2.3.4"
        while how == "pending_forever":
            yield 0xFF00, ident
            time.sleep(0.05)
        yield from answers(kept, event.identifier)

    ae = AE(ae_title="HOSTILE")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(Verification)
    if how == "reject":  # pynetdicom's own rejection: calling AE title not recognised
        ae.require_calling_aet = ["SOMEONE_ELSE"]
    ae.start_server(("127.0.0.1", opts["port"]), block=True,
                    evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_C_FIND, on_find)])
""")


def network_modes(ns: Namespace, tmp_path: Path, called: str) -> dict[str, tuple[int, str, dict]]:
    """Every network mode against the peer on PORT: (exit status, stderr, its summary)."""
    common = ["-H", "127.0.0.1", "-p", str(PORT), "-a", called, "--retries", "1",
              "--dimse-timeout", "3", "--acse-timeout", "2", "--no-progress",
              "--log-dir", str(tmp_path / "logs")]
    small = ["--scenario", "multi_patient", "--patients", "1", "--studies", "1", "--size",
             "16x16"]
    tree = tmp_path / "tree"
    made = run_tool("--generate", *small, "--output", tree, "--no-progress", cwd=tmp_path)
    assert made.code == 0, made.err
    runs = {"echo": ["--echo"], "send": ["--send", "--path", str(tree)],
            "send --verify": ["--send", "--verify", "--path", str(tree)],
            "check-ingest": ["--check-ingest", str(tree / "manifest.json")],
            "ingest-test": ["--ingest-test", *small, "--output", str(tmp_path / "gen"),
                            "--settle-timeout", "10"]}
    results = {}
    for name, args in runs.items():
        summary = tmp_path / f"{name.replace(' ', '_')}.json"
        kept = ["--summary-json", summary] if name != "echo" else []  # echo has one line
        run = run_tool(*args, *common, *kept, cwd=tmp_path, prefix=ns.prefix, timeout=120)
        results[name] = (run.code, run.err, json.loads(summary.read_text())
                         if summary.exists() else {})
    return results


REFUSED_QUERY = "refused the query"
# per peer: what each mode must say (a phrase of its one line) and exit with; None: exit 0
PEERS = {
    "default_orthanc": ("ORTHANC", {"echo": None, "send": None,
                                    "send --verify": "register AE title DICOM_SAR there",
                                    "check-ingest": "(Orthanc: DicomModalities",
                                    "ingest-test": REFUSED_QUERY}),
    "reject": ("HOSTILE", dict.fromkeys(["echo", "send", "send --verify", "check-ingest",
                                         "ingest-test"], "Calling AE title not recognised")),
    "abort_after": ("HOSTILE", {"echo": None, "send": "aborted the association",
                                "send --verify": "aborted the association",
                                "check-ingest": "mismatches", "ingest-test": "aborted"}),
    "refuse_find": ("HOSTILE", {"echo": None, "send": None,
                                "send --verify": "C-FIND status 0xC000",
                                "check-ingest": "C-FIND status 0xC000",
                                "ingest-test": "C-FIND status 0xC000"}),
    "pending_forever": ("HOSTILE", dict(
        {"echo": None, "send": None}, **dict.fromkeys(
            ["send --verify", "check-ingest", "ingest-test"], "kept answering Pending"))),
    "silent": ("HOSTILE", dict.fromkeys(["echo", "send", "send --verify", "check-ingest",
                                         "ingest-test"], "did not answer the association")),
    "drop": ("HOSTILE", {"echo": None, "send": "not sent again",
                         "send --verify": "dropped the connection during the query",
                         "check-ingest": "dropped the connection during the query",
                         "ingest-test": "dropped the connection during the query"}),
}


@pytest.mark.parametrize("peer", list(PEERS))
def test_every_network_mode_against_restrictive_and_hostile_peers(peer: str, request, ns,
                                                                   tmp_path: Path) -> None:
    """Each network mode against each peer: one clear line naming what went wrong, exit 1,
    a summary that says a check could not be made (never "0 mismatches"), no traceback."""
    called, expected = PEERS[peer]
    if peer == "default_orthanc":
        request.getfixturevalue("default_orthanc")
    else:
        script = tmp_path / "hostile.py"
        script.write_text(HOSTILE_SCP)
        ns.start(sys.executable, script, json.dumps({"port": PORT, "how": peer, "n": 2}),
                 log=tmp_path / "hostile.log")
        ns.wait_for_port(PORT)
    for mode, (code, err, summary) in network_modes(ns, tmp_path, called).items():
        assert "Traceback" not in err, (mode, err)
        phrase = expected[mode]
        if phrase is None:
            assert code == 0, (mode, err)
            continue
        assert code == 1, (mode, err)
        assert phrase in err or phrase in json.dumps(summary), (mode, phrase, err)
        if mode in ("check-ingest", "ingest-test") and peer != "abort_after":  # no C-FIND
            assert summary["checked"] is False and summary["error"], (mode, summary)
            assert "0 mismatches" not in err
        if mode == "send --verify" and summary.get("successful_transfers"):
            assert summary["verify"]["made"] is False, summary


def test_a_ca_made_the_classic_way_is_accepted_as_dcmtk_accepts_it(
        ns, tmp_path: Path, generated: Path, manifest: dict) -> None:
    """A CA from a bare `openssl req -x509` (no keyUsage, as many hospital CAs) and a
    server certificate it signed for localhost: DCMTK's storescu stores to storescp +tls
    with them, and so do we, the chain and the host name verified (Python 3.13's strict
    X.509 flag refused it: 'CA cert does not include key usage extension')."""
    d = tmp_path / "pki"
    d.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=hospital-ca", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout",
            "server.key", "-out", "server.csr", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.pem", cwd=d)
    assert b"Key Usage" not in subprocess.run(
        ["openssl", "x509", "-in", d / "ca.pem", "-noout", "-text"], capture_output=True,
        check=True).stdout
    rx = tmp_path / "rx"
    rx.mkdir()
    ns.start(need("storescp"), "--fork", "-aet", "STORESCP", "-od", rx, "+tls",
             d / "server.key", d / "server.pem", "-ic", PORT, log=tmp_path / "storescp.log")
    ns.wait_for_port(PORT)
    tree = tree_of(generated, manifest, tmp_path, "default")
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    dcmtk = subprocess.run([*ns.prefix, need("storescu"), "+tla", "+cf", d / "ca.pem",
                            "-aec", "STORESCP", "localhost", str(PORT), files[0]],
                           capture_output=True, timeout=60)
    assert dcmtk.returncode == 0, dcmtk.stderr  # the oracle accepts this CA
    run = run_tool("--send", "--path", tree, "-H", "localhost", "-p", PORT, "-a", "STORESCP",
                   "--tls-ca", d / "ca.pem", "--log-dir", tmp_path / "logs", "--no-progress",
                   "--summary-json", tmp_path / "s.json", cwd=tmp_path, prefix=ns.prefix)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert run.code == 0, run.err
    assert summary["successful_transfers"] == len(files) and summary["tls"]["verified"]
    assert len(received(rx)) == len(files)
    other = run_tool("--echo", "-H", "127.0.0.1", "-p", PORT, "-a", "STORESCP", "--tls-ca",
                     d / "ca.pem", cwd=tmp_path, prefix=ns.prefix)
    assert other.code == 1 and "not accepted" in other.err  # the host name is still checked
