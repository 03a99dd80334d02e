"""--ui: the wizard page and its JSON API, against the running server and in a real
headless Chromium (Debian's chromium and chromium-driver, driven by Selenium)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

from conftest import HTTP_PORT, IN_CI, PASSWORD, PORT, TOOL, USER, held, need, run_tool, tree_digest


@pytest.fixture
def ui(tmp_path: Path):
    """The wizard server on a free port: (base URL, token)."""
    proc = subprocess.Popen([sys.executable, str(TOOL), "--ui", "--port", "0", "-j", "2",
                             "--log-dir", str(tmp_path / "logs")], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={k: v for k, v in os.environ.items()
                                 if k not in ("DISPLAY", "BROWSER", "WAYLAND_DISPLAY")})
    line = proc.stdout.readline()
    assert line.startswith("dicom_sar wizard: http://127.0.0.1:"), line
    url = line.split(": ", 1)[1].strip()
    base, token = url.split("/?token=")
    try:
        yield base, token
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def call(base: str, path: str, token: str | None, body: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"X-Token": token} if token else {})
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, data=data,
                                                           headers=headers)) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_job(base: str, token: str, job: str) -> dict:
    return finished(lambda path: call(base, path, token)[1], job)


def finished(api, job: str) -> dict:
    """A job's state once it has finished, asked of api(path) -> JSON; at most 120 s."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = api(f"/api/jobs/{job}")
        if state["finished"]:
            return state
        time.sleep(0.2)
    raise AssertionError("the job did not finish")


def test_every_request_needs_the_token(ui) -> None:
    base, token = ui
    assert call(base, "/api/catalogue", None)[0] == 403
    assert call(base, "/api/catalogue", "wrong")[0] == 403
    assert call(base, "/api/plan", "wrong", {"scenarios": ["default"]})[0] == 403
    with pytest.raises(urllib.error.HTTPError) as page:
        urllib.request.urlopen(base + "/")
    assert page.value.code == 403
    code, catalogue = call(base, "/api/catalogue", token)
    assert code == 200 and "cu_bits_mismatch" in catalogue["scenarios"]
    assert urllib.request.urlopen(f"{base}/?token={token}").read().startswith(b"<!doctype html>")
    assert base.startswith("http://127.0.0.1:")  # loopback only


def test_an_invalid_config_gives_the_error_config_gives(ui, tmp_path: Path) -> None:
    base, token = ui
    config = {"current_study": {"count": 2, "images": [{"tags": {"StudyDate": "2023-01-01"}}]}}
    (tmp_path / "c.json").write_text(json.dumps(config))
    cli = run_tool("--generate", "--config", tmp_path / "c.json", "--output", tmp_path / "x",
                   cwd=tmp_path)
    assert cli.code == 2
    code, body = call(base, "/api/validate", token, {"config": config,
                                                      "output": str(tmp_path / "y")})
    assert code == 400 and body["where"] == "current_study.images[0].tags.StudyDate"
    assert body["error"].split(": ", 1)[1] in cli.err  # the same message but for the file name
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_generate_writes_what_the_command_line_writes(ui, tmp_path: Path) -> None:
    base, token = ui
    options = {"scenarios": ["default", "cu_bits_mismatch"], "seed": "7", "patients": "2",
               "size": "32x32"}
    code, plan = call(base, "/api/plan", token, {**options, "output": str(tmp_path / "ui")})
    dry = run_tool("--generate", "--dry-run", "--scenario", "default", "--scenario",
                   "cu_bits_mismatch", "--seed", "7", "--patients", "2", "--size", "32x32",
                   "--output", tmp_path / "ui", cwd=tmp_path)
    assert code == 200 and plan["lines"] == dry.out.splitlines()  # exactly --dry-run's plan
    code, started = call(base, "/api/generate", token, {**options, "output": str(tmp_path / "ui")})
    assert code == 200
    state = wait_job(base, token, started["job"])
    assert state["code"] == 0 and state["done"] == state["total"] == plan["files"]
    assert state["summary"]["files_written"] == plan["files"]
    cli = run_tool("--generate", "--scenario", "default", "--scenario", "cu_bits_mismatch",
                   "--seed", "7", "--patients", "2", "--size", "32x32", "--output",
                   tmp_path / "cli", cwd=tmp_path)
    assert cli.code == 0, cli.err
    assert tree_digest(tmp_path / "ui") == tree_digest(tmp_path / "cli")  # files and manifest
    again = call(base, "/api/generate", token, {"scenarios": ["default"],
                                                "output": str(tmp_path / "logs")})
    assert again[0] == 400 and "did not write" in again[1]["error"]  # --generate's rule


def png_is_blank(png: bytes) -> bool:
    """True when a PNG screenshot is (nearly) one colour."""
    pos, width, idat = 8, 0, b""
    while pos < len(png):
        (length,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        if kind == b"IHDR":
            width = struct.unpack(">I", png[pos + 8:pos + 12])[0]
        elif kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + length]
        pos += 12 + length
    pixels = zlib.decompress(idat)
    return len(set(pixels[: width * 4 * 200])) < 8


def test_the_wizard_in_headless_chromium(ui, tmp_path: Path) -> None:
    """Load the page, pick two scenarios, change a tag, preview, generate, wait for the
    summary: the files are on disk; a screenshot that is not blank."""
    chromium, driver_path = need("chromium"), need("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        if IN_CI:
            pytest.fail("selenium is not installed (requirements-dev.txt)")
        pytest.skip("selenium is not installed")
    base, token = ui
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1400",
                 f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    wait = WebDriverWait(browser, 30)
    try:
        browser.get(f"{base}/?token={token}")
        wait.until(expected_conditions.presence_of_element_located((By.ID, "sc-default")))
        browser.find_element(By.ID, "search").send_keys("bits")
        assert not browser.find_element(By.ID, "sc-cu_bits_mismatch").find_element(
            By.XPATH, "../..").get_attribute("hidden")
        browser.find_element(By.ID, "sc-cu_bits_mismatch").click()
        browser.find_element(By.ID, "search").clear()
        browser.find_element(By.ID, "search").send_keys("default")
        browser.find_element(By.ID, "sc-default").click()
        browser.find_element(By.ID, "output").send_keys(str(tmp_path / "out"))
        browser.find_element(By.ID, "add-current_study").click()
        browser.find_element(By.XPATH, "//button[text()='add image']").click()
        browser.find_element(By.CSS_SELECTOR, ".new-tag").send_keys("InstitutionName")
        browser.find_element(By.CSS_SELECTOR, ".add-tag").click()
        field = wait.until(expected_conditions.presence_of_element_located(
            (By.CSS_SELECTOR, "input[data-tag='InstitutionName']")))
        field.send_keys("WIZARD HOSPITAL\t")
        browser.find_element(By.ID, "preview").click()
        wait.until(lambda b: "files would be written" in b.find_element(By.ID, "plan").text)
        assert "cu_bits_mismatch" in browser.find_element(By.ID, "plan").text
        browser.find_element(By.ID, "generate").click()
        wait.until(expected_conditions.presence_of_element_located((By.ID, "summary-table")))
        png = browser.get_screenshot_as_png()
        (tmp_path / "wizard.png").write_bytes(png)
        assert not png_is_blank(png)
    finally:
        browser.quit()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {e["scenario"] for e in manifest["instances"]} == {"default", "cu_bits_mismatch",
                                                               "config"}
    import pydicom
    first = next(e for e in manifest["instances"] if e["scenario"] == "config")
    assert pydicom.dcmread(tmp_path / "out" / first["path"]).InstitutionName == "WIZARD HOSPITAL"


def wizard_in(ns, tmp_path: Path, env: dict[str, str] | None = None):
    """The wizard served inside the namespace: its API as a function (path, body) -> JSON."""
    ns.start(sys.executable, TOOL, "--ui", "--port", "18099", "--log-dir", tmp_path / "logs",
             log=tmp_path / "ui.log", env=env)
    ns.wait_for_port(18099)
    deadline = time.monotonic() + 20
    while "token=" not in (tmp_path / "ui.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    token = (tmp_path / "ui.log").read_text().split("token=", 1)[1].split()[0]

    def api(path: str, body: dict | None = None) -> dict:
        code = (f"import json, urllib.request; r = urllib.request.Request("
                f"'http://127.0.0.1:18099{path}', data={json.dumps(json.dumps(body))}.encode() "
                f"if {body is not None} else None, headers={{'X-Token': '{token}', "
                "'Content-Type': 'application/json'}); "
                "print(urllib.request.urlopen(r).read().decode())")
        return json.loads(ns.python(code))

    return api


def test_the_send_section_echoes_sends_and_checks(ns, orthanc, tmp_path: Path) -> None:
    """The page's Send section through its API, inside a loopback-only namespace with
    Orthanc: echo, send the generated tree, and the ingestion check's report."""
    api = wizard_in(ns, tmp_path)
    out = str(tmp_path / "gen")
    job = api("/api/generate", {"scenarios": ["default", "cu_bits_mismatch"], "output": out})
    finished(api, job["job"])
    receiver = {"host": "127.0.0.1", "port": PORT, "called": "ORTHANC", "output": out}
    echo = api("/api/echo", receiver)
    assert echo["ok"] and "success" in echo["message"]
    sent = api("/api/send", receiver)
    state = finished(api, sent["job"])
    assert state["summary"]["successful_transfers"] == 12 and state["code"] == 0
    assert state["done"] == state["total"] > 0  # the page's bar moved, to the end, in bytes
    assert orthanc("/statistics")["CountInstances"] == 12
    check = api("/api/check", receiver)
    assert check["report"]["scenarios"]["default"]["accept"] == {"expected": 4, "held": 4,
                                                                 "mismatches": 0}
    assert check["code"] == 1  # Orthanc keeps the bits_mismatch image the manifest rejects


def test_the_send_section_against_a_pacs_that_refuses_queries(ns, default_orthanc,
                                                              tmp_path: Path) -> None:
    """Orthanc as Debian configures it stores from anyone but refuses C-FIND from an AE it
    does not know: the page's check says it could not be made, and why, with exit 1."""
    api = wizard_in(ns, tmp_path)
    out = str(tmp_path / "gen")
    finished(api, api("/api/generate", {"scenarios": ["default"], "output": out})["job"])
    receiver = {"host": "127.0.0.1", "port": PORT, "called": "ORTHANC", "output": out}
    state = finished(api, api("/api/send", receiver)["job"])
    assert state["code"] == 0 and not state["error"], state
    check = api("/api/check", receiver)
    assert check["code"] == 1 and check["report"]["checked"] is False
    assert "register AE title DICOM_SAR there" in check["report"]["error"]
    assert api("/api/echo", receiver)["ok"]  # C-ECHO, as C-STORE, it allows anyone


def test_the_send_section_takes_a_dicomweb_url(ns, web_orthanc, tmp_path: Path) -> None:
    """The Send section with a URL instead of host and port: echo by QIDO-RS, send by
    STOW-RS, check by QIDO-RS, the password from the wizard's own environment."""
    api = wizard_in(ns, tmp_path, env={"DICOMWEB_PASSWORD": PASSWORD})
    out = str(tmp_path / "gen")
    finished(api, api("/api/generate", {"scenarios": ["default"], "output": out})["job"])
    receiver = {"url": f"http://127.0.0.1:{HTTP_PORT}/dicom-web", "user": USER, "output": out}
    echo = api("/api/echo", receiver)
    assert echo["ok"] and "HTTP 200 OK" in echo["message"], echo
    state = finished(api, api("/api/send", receiver)["job"])
    assert state["code"] == 0 and state["summary"]["successful_transfers"] == 4, state
    assert state["summary"]["transport"] == "DICOMweb STOW-RS" and len(held(web_orthanc)) == 4
    check = api("/api/check", receiver)
    assert check["code"] == 0 and check["report"]["checked"], check
    refused = api("/api/echo", {**receiver, "user": "mallory"})
    assert not refused["ok"] and "HTTP 401" in refused["message"]
