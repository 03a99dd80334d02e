"""--send, --echo, --verify, --check-ingest and --ingest-test over DICOMweb (--url): STOW-RS
and QIDO-RS against Orthanc with Debian's DICOMweb plugin and HTTP authentication on, and
against a scriptable front (bearer tokens, 503 with Retry-After, HTTPS, per-instance
failures) that passes requests on to that Orthanc.

Every server runs in the test's own network namespace, with the tool.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

import dicom_sar
from conftest import (
    HTTP_PORT,
    PASSWORD,
    USER,
    Namespace,
    held,
    instances,
    read,
    run_tool,
    tree_of,
)

FRONT_PORT = 18443
WITH_PASSWORD = {dicom_sar.PASSWORD_VARIABLE: PASSWORD}
ROOT = f"http://127.0.0.1:{HTTP_PORT}/dicom-web"
INGEST_SCENARIOS = ("default", "cu_bits_mismatch", "pr_missing_dicom", "cu_duplicate_sop",
                    "cu_no_pixel_data", "truncated", "not_dicom")


FRONT = textwrap.dedent("""
    # An HTTP(S) front for the web Orthanc (argv[1]: JSON options): token (the bearer token
    # it accepts; rotate: after each accepted request it writes a new one into token_file and
    # accepts only that), unavailable (answer that many POSTs 503 with Retry-After), status
    # (answer every POST with it), fail_sop / warn_sop (answer a POST itself: every part
    # stored but that one, failed 0xA700 / stored with warning 0xB007), cert and key (HTTPS;
    # client_ca: a client certificate signed by it required).
    # Every request is recorded in the state file.
    import base64, email.parser, email.policy, http.client, http.server, io, json, os, ssl
    import sys, threading, time, uuid
    import pydicom

    opts = json.loads(sys.argv[1])
    lock = threading.Lock()
    state = {"requests": [], "unavailable": opts.get("unavailable", 0)}
    token = {"now": opts.get("token")}
    upstream = "Basic " + base64.b64encode(opts["upstream_auth"].encode()).decode()

    def save():
        with open(opts["state"] + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(opts["state"] + ".tmp", opts["state"])

    def item(ds, reason=None):
        out = {"00081150": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
               "00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]}}
        if reason:
            out[reason[0]] = {"vr": "US", "Value": [reason[1]]}
        return out

    def answer_itself(content_type, body):
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\\r\\n\\r\\n" + body)
        stored, failed = [], []
        for part in msg.iter_parts():
            ds = pydicom.dcmread(io.BytesIO(part.get_payload(decode=True)))
            sop = str(ds.SOPInstanceUID)
            if sop == opts.get("fail_sop"):
                failed.append(item(ds, ("00081197", 0xA700)))
            else:
                stored.append(item(ds, ("00081196", 0xB007) if sop == opts.get("warn_sop")
                                   else None))
        return 202 if failed else 200, json.dumps({"00081199": {"vr": "SQ", "Value": stored},
                                                  "00081198": {"vr": "SQ", "Value": failed}})

    class Front(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, code, body=b"", headers=()):
            self.send_response(code)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_request(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            auth = self.headers.get("Authorization", "")
            with lock:
                state["requests"].append({"method": self.command, "path": self.path,
                                          "time": time.monotonic(), "auth": auth,
                                          "bytes": len(body)})
                save()
                if token["now"] and auth != "Bearer " + token["now"]:
                    return self.reply(401, b'{"Message": "token refused"}')
                if self.command == "POST" and state["unavailable"] > 0:
                    state["unavailable"] -= 1
                    save()
                    return self.reply(503, b"busy", [("Retry-After",
                                                      str(opts.get("retry_after", 1)))])
                if opts.get("rotate"):
                    token["now"] = uuid.uuid4().hex
                    with open(opts["token_file"] + ".tmp", "w") as f:
                        f.write(token["now"] + "\\n")
                    os.replace(opts["token_file"] + ".tmp", opts["token_file"])
            if self.command == "POST" and opts.get("status"):
                return self.reply(opts["status"], b'{"Message": "not today"}')
            if self.command == "POST" and (opts.get("fail_sop") or opts.get("warn_sop")):
                code, text = answer_itself(self.headers["Content-Type"], body)
                return self.reply(code, text.encode(), [("Content-Type",
                                                         "application/dicom+json")])
            conn = http.client.HTTPConnection("127.0.0.1", opts["upstream"], timeout=60)
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() in ("content-type", "accept")}
            conn.request(self.command, self.path, body, {**headers, "Authorization": upstream})
            got = conn.getresponse()
            data = got.read()
            self.reply(got.status, data, [("Content-Type", got.headers.get("Content-Type")
                                           or "application/octet-stream")])

        do_GET = do_POST = do_request

    server = http.server.ThreadingHTTPServer(("127.0.0.1", opts["port"]), Front)
    if opts.get("cert"):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(opts["cert"], opts["key"])
        if opts.get("client_ca"):
            context.load_verify_locations(opts["client_ca"])
            context.verify_mode = ssl.CERT_REQUIRED
        server.socket = context.wrap_socket(server.socket, server_side=True)
    save()
    server.serve_forever()
""")


@pytest.fixture
def front(ns: Namespace, tmp_path: Path, web_orthanc):
    """Start the front before the web Orthanc with options; returns a function reading its
    state."""
    script = tmp_path / "front.py"
    script.write_text(FRONT)
    state = tmp_path / "front_state.json"

    def start(**opts: object):
        ns.start(sys.executable, script, json.dumps({
            "port": FRONT_PORT, "upstream": HTTP_PORT, "state": str(state),
            "upstream_auth": f"{USER}:{PASSWORD}", **opts}), log=tmp_path / "front.log")
        ns.wait_for_port(FRONT_PORT)
        return lambda: json.loads(state.read_text())

    return start


def web(ns: Namespace, tmp_path: Path, *args: str | Path, url: str = ROOT,
        env: dict[str, str] | None = None, mode: str = "--send") -> tuple[int, dict, str]:
    """Run a mode against url; (exit status, the send's JSON summary if any, stdout+stderr)."""
    logs = tmp_path / "logs"
    run = run_tool(mode, *args, "--url", url, "--log-dir", logs, "--no-progress",
                   cwd=tmp_path, prefix=ns.prefix, timeout=300, env=env)
    summaries = sorted(logs.glob("dicom_sender_summary_*.json"), key=lambda p: p.stat().st_mtime)
    summary = json.loads(summaries[-1].read_text()) if summaries else {}
    return run.code, summary, run.out + run.err


def test_stow_stores_what_the_summary_claims_and_verify_agrees(
        ns, web_orthanc, generated: Path, manifest: dict, tmp_path: Path) -> None:
    """STOW-RS with HTTP Basic, two workers, --verify by QIDO-RS: Orthanc holds exactly the
    instances the summary says were stored; the summary has C-STORE's schema."""
    tree = tree_of(generated, manifest, tmp_path, "multi_patient", "external_prior")
    code, summary, out = web(ns, tmp_path, "--path", tree, "-j", "2", "--user", USER,
                             "--verify", env=WITH_PASSWORD)
    assert code == 0, out
    assert "verify:" not in out and summary["verify"] == {"made": True, "error": None,
                                                          "unchecked": 0, "not_held": 0}
    entries = [e for s in ("multi_patient", "external_prior")
               for e in instances(manifest, scenario=s, expect="accept")]
    stored = {f["sop_instance_uid"] for f in summary["files"] if f["outcome"] == "sent"}
    assert stored == held(web_orthanc) == {e["sop_uid"] for e in entries}
    assert summary["successful_transfers"] == len(entries)
    assert {f["status"] for f in summary["files"]} == {0}
    assert summary["transport"] == "DICOMweb STOW-RS" and summary["destination"] == ROOT
    assert summary["tls"]["encrypted"] is False  # plain http, on loopback
    assert summary["studies_processed"] == len({e["study_uid"] for e in entries})


def test_credentials_right_wrong_and_missing_and_never_written(
        ns, web_orthanc, generated: Path, manifest: dict, tmp_path: Path) -> None:
    tree = tree_of(generated, manifest, tmp_path, "default")
    code, summary, out = web(ns, tmp_path, "--path", tree, "--user", USER,
                             env={dicom_sar.PASSWORD_VARIABLE: "Tr0ub4dor&3"})
    assert code == 1 and summary["successful_transfers"] == 0 and held(web_orthanc) == set()
    assert all(f["reason"] == "HTTP 401 Unauthorized: the credentials were refused (check "
               "--token-file, or --user and DICOMWEB_PASSWORD)" for f in summary["failed_files"])
    code, summary, out = web(ns, tmp_path, "--path", tree)
    assert code == 1 and "the server wants credentials" in summary["failed_files"][0]["reason"]
    code, _, out = web(ns, tmp_path, "--user", USER, env=WITH_PASSWORD, mode="--echo")
    assert code == 0 and "HTTP 200 OK" in out and "not encrypted" in out, out
    code, summary, out = web(ns, tmp_path, "--path", tree, "--user", USER, env=WITH_PASSWORD)
    assert code == 0 and summary["successful_transfers"] == 4, out
    written = out + "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
    assert PASSWORD not in written and "Tr0ub4dor" not in written


def test_a_token_refreshed_on_disk_is_picked_up(ns, front, generated: Path, manifest: dict,
                                                tmp_path: Path) -> None:
    """The front accepts each bearer token once and writes the next into the token file:
    every request must read it anew."""
    token = tmp_path / "pacs.token"
    token.write_text("first-token\n")
    state = front(token="first-token", rotate=True, token_file=str(token))
    tree = tree_of(generated, manifest, tmp_path, "multi_patient")
    code, summary, out = web(ns, tmp_path, "--path", tree, "-j", "1", "--token-file", token,
                             "--verify", url=f"http://127.0.0.1:{FRONT_PORT}/dicom-web")
    assert code == 0 and summary["successful_transfers"] == 24, out
    tokens = [r["auth"] for r in state()["requests"]]
    assert len(set(tokens)) == len(tokens) >= 7  # 6 studies, then the queries
    written = out + "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
    assert not any(t.removeprefix("Bearer ") in written for t in tokens)


def test_503_with_retry_after_is_waited_for_then_stored(ns, front, generated: Path,
                                                        manifest: dict, tmp_path: Path,
                                                        web_orthanc) -> None:
    state = front(unavailable=2, retry_after=1)
    tree = tree_of(generated, manifest, tmp_path, "default")
    code, summary, out = web(ns, tmp_path, "--path", tree, "--user", USER, env=WITH_PASSWORD,
                             url=f"http://127.0.0.1:{FRONT_PORT}/dicom-web")
    assert code == 0 and summary["successful_transfers"] == 4 == len(held(web_orthanc)), out
    posts = [r["time"] for r in state()["requests"] if r["method"] == "POST"]
    assert len(posts) == 3 and all(b - a >= 0.95 for a, b in itertools.pairwise(posts))


@pytest.mark.parametrize("status", [400, 415])
def test_other_client_errors_are_not_retried(status: int, ns, front, generated: Path,
                                             manifest: dict, tmp_path: Path) -> None:
    state = front(status=status)
    tree = tree_of(generated, manifest, tmp_path, "default")
    code, summary, _ = web(ns, tmp_path, "--path", tree, "--retries", "3",
                           url=f"http://127.0.0.1:{FRONT_PORT}/dicom-web")
    assert code == 1 and summary["failed_transfers"] == 4
    assert len([r for r in state()["requests"] if r["method"] == "POST"]) == 1
    assert summary["failed_files"][0]["reason"].startswith(f"HTTP {status} ")
    assert "(not today)" in summary["failed_files"][0]["reason"]


def test_each_instance_takes_its_outcome_from_the_response(ns, front, generated: Path,
                                                           manifest: dict,
                                                           tmp_path: Path) -> None:
    """A FailedSOPSequence item fails that file alone, with its FailureReason; a
    WarningReason makes a warning, counted as stored. The front parses each request with
    the standard library's MIME parser and pydicom: the body is well-formed."""
    tree = tree_of(generated, manifest, tmp_path, "default")
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    fail, warn = (str(read(p).SOPInstanceUID) for p in files[:2])
    front(fail_sop=fail, warn_sop=warn)
    code, summary, _ = web(ns, tmp_path, "--path", tree,
                           url=f"http://127.0.0.1:{FRONT_PORT}/dicom-web")
    assert code == 1
    outcome = {f["sop_instance_uid"]: f for f in summary["files"]}
    assert outcome[fail]["outcome"] == "failed" and outcome[fail]["status"] == 0xA700
    assert outcome[fail]["reason"] == "0xA700 Refused: Out of Resources (HTTP 202 Accepted)"
    assert outcome[warn]["outcome"] == "warning" and outcome[warn]["status"] == 0xB007
    assert summary["successful_transfers"] == 3 and summary["warnings"] == 1


def test_https_with_a_test_ca(ns, front, certs: Path, generated: Path, manifest: dict,
                              tmp_path: Path, web_orthanc) -> None:
    front(cert=str(certs / "server.crt"), key=str(certs / "server.key"))
    tree = tree_of(generated, manifest, tmp_path, "default")
    url = f"https://127.0.0.1:{FRONT_PORT}/dicom-web"
    code, summary, out = web(ns, tmp_path, "--path", tree, "--retries", "0", url=url)
    assert code == 1 and summary["successful_transfers"] == 0 and not held(web_orthanc)
    assert "TLS: the server's certificate is not accepted: unable to get local issuer " \
           "certificate" in summary["failed_files"][0]["reason"], out
    code, summary, out = web(ns, tmp_path, "--path", tree, "--tls-ca", certs / "ca.crt",
                             "--verify", url=url)
    assert code == 0 and summary["successful_transfers"] == 4 == len(held(web_orthanc)), out
    assert summary["tls"]["encrypted"] is True and summary["tls"]["verified"] is True
    assert summary["tls"]["protocol"] in ("TLSv1.2", "TLSv1.3")
    code, _, out = web(ns, tmp_path, "--tls-ca", certs / "ca.crt", url=url, mode="--echo")
    assert code == 0 and "HTTP 200 OK" in out and ", TLSv1." in out, out


def test_a_file_orthanc_filters_out_is_named_by_verify(ns, web_orthanc, generated: Path,
                                                       manifest: dict, tmp_path: Path) -> None:
    """Orthanc acknowledges an instance its ReceivedInstanceFilter refuses (STOW-RS lists
    it as stored): --verify asks QIDO-RS and names the file."""
    tree = tree_of(generated, manifest, tmp_path, "default")
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    victim = str(read(files[1]).SOPInstanceUID)
    (tmp_path / "filter.lua").write_text(
        "function ReceivedInstanceFilter(dicom, origin, info)\n"
        f"  return dicom.SOPInstanceUID ~= '{victim}'\nend\n")
    web_orthanc.restart(lua=tmp_path / "filter.lua")
    code, summary, out = web(ns, tmp_path, "--path", tree, "--user", USER, "--verify",
                             env=WITH_PASSWORD)
    assert code == 1 and summary["verify"]["not_held"] == 1
    assert f"verify: {files[1]}: acknowledged (status 0x0000) but not held by the receiver" \
        in out
    assert victim not in held(web_orthanc) and len(held(web_orthanc)) == 3


def test_real_files_orthanc_holds_what_the_summary_claims(ns, web_orthanc,
                                                          real_files: list[Path],
                                                          tmp_path: Path) -> None:
    """pydicom's test files and the corpus, by STOW-RS: no file stalls the run, a broken
    file is never sent, what Orthanc holds is what the summary says it stored, and --verify
    agrees."""
    tree = tmp_path / "real"
    tree.mkdir()
    for i, src in enumerate(real_files):
        shutil.copy(src, tree / f"{i:03d}")
    code, summary, out = web(ns, tmp_path, "--path", tree, "-j", "2", "--user", USER,
                             "--verify", env=WITH_PASSWORD)
    assert code == 1 and "Traceback" not in out  # the corpus holds broken files on purpose
    stored = {f["sop_instance_uid"] for f in summary["files"] if f["outcome"] != "failed"}
    assert stored == held(web_orthanc) and len(stored) >= 95
    # a series UID that is not one ('REM SAMPLES 1') is kept by Orthanc without its blanks:
    # --verify must not call its file "not held"
    assert summary["verify"] == {"made": True, "error": None, "unchecked": 0, "not_held": 0}


def test_ingest_test_and_check_ingest_over_qido_agree_with_orthanc(ns, web_orthanc,
                                                                    tmp_path: Path) -> None:
    """generate -> STOW-RS -> settle -> QIDO-RS: the mismatches are exactly the instances
    whose presence in Orthanc (its REST API) differs from the manifest's expectation;
    --check-ingest alone gives the same report."""
    args = [x for s in INGEST_SCENARIOS for x in ("--scenario", s)]
    report_path = tmp_path / "check.json"
    code, _, out = web(ns, tmp_path, *args, "--seed", "5", "--output", tmp_path / "gen",
                       "--settle-timeout", "20", "--user", USER, "--summary-json",
                       report_path, env=WITH_PASSWORD, mode="--ingest-test")
    report = json.loads(report_path.read_text())
    assert code == 1 and report["unanswered"] == [] and report["checked"], out
    kept = held(web_orthanc)
    entries = json.loads((tmp_path / "gen" / "manifest.json").read_text())["instances"]
    accepted = {e["sop_uid"] for e in entries if e["expect"] == "accept"}
    expected = {e["sop_uid"] for e in entries if (e["sop_uid"] in kept) != (
        e["expect"] == "accept") and not (e["expect"] != "accept" and e["sop_uid"] in accepted)}
    assert {m["sop_uid"] for m in report["mismatches"]} == expected
    assert report["scenarios"]["default"]["accept"]["mismatches"] == 0
    again = tmp_path / "again.json"
    code, _, out = web(ns, tmp_path, tmp_path / "gen" / "manifest.json", "--user", USER,
                       "--summary-json", again, env=WITH_PASSWORD, mode="--check-ingest")
    assert json.loads(again.read_text())["mismatches"] == report["mismatches"], out
    code, _, out = web(ns, tmp_path, tmp_path / "gen" / "manifest.json", "--user", USER,
                       env=WITH_PASSWORD, mode="--check-ingest",
                       url=f"http://127.0.0.1:{HTTP_PORT}/not-dicom-web")
    assert code == 1 and "the check could not be made" in out
    assert "is --url the service root" in out


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--url", ROOT, "-H", "127.0.0.1"], {}, "DICOMweb destination and --host a DIMSE one"),
    (["--url", "http://alice:pw@127.0.0.1/dicom-web"], {}, "must not carry credentials"),
    (["--url", "http://10.1.2.3/dicom-web"], {}, "use https://, or --allow-plain-http"),
    (["--url", ROOT, "--tls-ca", "ca.pem"], {}, "go with an https:// --url"),
    (["--url", ROOT, "--user", "alice"], {}, "set the password in the environment variable"),
    (["--url", ROOT, "--user", "a", "--token-file", "t"], WITH_PASSWORD, "give one"),
    (["-H", "127.0.0.1", "-p", "104", "--token-file", "t"], {}, "go with a DICOMweb"),
    (["--url", "ftp://127.0.0.1/x"], {}, "use the service root"),
    (["--url", "https://pacs.hôpital.example/dicom-web"], {}, "in its xn-- form"),
])
def test_destination_usage_errors(args: list[str], env: dict, message: str,
                                  tmp_path: Path) -> None:
    run = run_tool("--echo", *args, cwd=tmp_path, env={dicom_sar.PASSWORD_VARIABLE: "",
                                                       **env})
    assert run.code == 2 and message in run.err, run.err
    assert "pw" not in run.err.replace("--allow-plain-http", "")


def test_plain_http_elsewhere_is_allowed_when_asked_and_dry_run_lists_requests(
        generated: Path, manifest: dict, tmp_path: Path) -> None:
    tree = tree_of(generated, manifest, tmp_path, "default")
    run = run_tool("--send", "--dry-run", "--path", tree, "--url", "http://10.1.2.3/dicom-web/",
                   "--allow-plain-http", "--no-progress", cwd=tmp_path)
    assert run.code == 0, run.err
    (line,) = run.out.splitlines()
    study = str(read(next(p for p in tree.rglob("*") if p.is_file())).StudyInstanceUID)
    assert line.startswith(f"POST http://10.1.2.3/dicom-web/studies  study {study}  request "
                           "1: 4 files, ")


def test_a_large_study_is_split_into_bounded_requests() -> None:
    size = dicom_sar.STOW_REQUEST_BYTES // 3
    files = [dicom_sar.Indexed(Path(f"f{i}"), "s", "c", f"i{i}", "ts", size, True)
             for i in range(7)]
    files.append(dataclasses.replace(files[0], size=dicom_sar.STOW_REQUEST_BYTES * 2))
    assert [len(b) for b in dicom_sar.stow_batches(files)] == [3, 3, 1, 1]


def test_qido_pages_until_a_page_brings_nothing_new(ns, web_orthanc, generated: Path,
                                                    manifest: dict, tmp_path: Path) -> None:
    """With pages of 3, a series of 4 is found whole (pages of 3 and 1, then an empty one):
    the paging a server with a result limit needs."""
    tree = tree_of(generated, manifest, tmp_path, "default")
    code, _, out = web(ns, tmp_path, "--path", tree, "--user", USER, env=WITH_PASSWORD)
    assert code == 0, out
    (key,) = {(e["study_uid"], e["series_uid"]) for e in instances(manifest, scenario="default")}
    found = ns.python(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(dicom_sar.__file__.rsplit("/", 1)[0])!r})
        import dicom_sar
        dicom_sar.load_pydicom()
        dicom_sar.QIDO_PAGE = 3
        target = dicom_sar.WebTarget({ROOT!r}, None, {USER!r}, {PASSWORD!r})
        held, why = dicom_sar.held_by_series(target, [{key!r}], 1)
        print(len(held[{key!r}]), why or "-")"""))
    assert found.split() == ["4", "-"]
    assert held(web_orthanc) == {e["sop_uid"] for e in instances(manifest, scenario="default")}


def test_https_that_wants_a_client_certificate(ns, front, certs: Path, generated: Path,
                                               manifest: dict, tmp_path: Path,
                                               web_orthanc) -> None:
    front(cert=str(certs / "server.crt"), key=str(certs / "server.key"),
          client_ca=str(certs / "ca.crt"))
    tree = tree_of(generated, manifest, tmp_path, "default")
    url = f"https://127.0.0.1:{FRONT_PORT}/dicom-web"
    code, summary, out = web(ns, tmp_path, "--path", tree, "--tls-ca", certs / "ca.crt",
                             "--retries", "0", url=url)
    assert code == 1 and summary["successful_transfers"] == 0 and not held(web_orthanc)
    assert "want a client certificate (--tls-cert, --tls-key)?" in \
        summary["failed_files"][0]["reason"], out
    code, summary, out = web(ns, tmp_path, "--path", tree, "--tls-ca", certs / "ca.crt",
                             "--tls-cert", certs / "client.crt", "--tls-key",
                             certs / "client.key", url=url)
    assert code == 0 and summary["successful_transfers"] == 4 == len(held(web_orthanc)), out
