"""Shared fixtures: run the tool, find real peers (DCMTK), make trees of test data."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "dicom_sar.py"
sys.path.insert(0, str(ROOT))
import dicom_sar  # noqa: E402

dicom_sar.load_pydicom()  # the tests call the tool's internals, most of which need pydicom
IN_CI = os.environ.get("CI") == "true"
FREE_THREADED_BUILD = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def need(program: str) -> str:
    """Path of a real peer program; missing is a failure in CI and a skip elsewhere."""
    path = shutil.which(program)
    if path is None:
        message = (f"{program} is not installed "
                   "(apt-get install dcmtk dicom3tools orthanc orthanc-dicomweb fish strace)")
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclasses.dataclass
class Run:
    """A finished run of the tool."""

    code: int
    out: str
    err: str
    cwd: Path

    def log(self, name: str = "dicom_sar.log") -> str:
        """Text of a log file the run wrote into its cwd."""
        path = self.cwd / name
        return path.read_text(encoding="utf-8") if path.exists() else ""


def run_tool(*args: str | Path, cwd: Path, python: str | None = None,
             timeout: float = 600, env: dict[str, str] | None = None,
             prefix: list[str] | None = None) -> Run:
    """Run dicom_sar.py in cwd with the test interpreter (prefix: e.g. ip netns exec NS)."""
    cmd = [*(prefix or []), python or sys.executable, str(TOOL), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return Run(proc.returncode, proc.stdout.decode("utf-8", "surrogateescape"),
               proc.stderr.decode("utf-8", "replace"), cwd)


def sar_one(opts: Any, cand: Any) -> Any:
    """One file through sar_task and a Committer, as a run takes it: the FileResult."""
    import dicom_sar
    result = dicom_sar.guarded(lambda c: dicom_sar.sar_task(c, opts), cand)
    return next(iter(dicom_sar.committed([result], dicom_sar.Committer(opts.fsync))))


def run_into_head(*args: str | Path, cwd: Path, lines: int = 1,
                  stderr_too: bool = False) -> tuple[bytes, Run]:
    """Run the tool into a reader that takes its first lines and goes away, like `| head`
    (`&| head` in fish with stderr_too): (those lines, the finished run; err is empty when
    stderr went into the pipe too)."""
    proc = subprocess.Popen([sys.executable, str(TOOL), *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if stderr_too else subprocess.PIPE)
    head = b"".join(proc.stdout.readline() for _ in range(lines))
    proc.stdout.close()
    err = b"" if stderr_too else proc.stderr.read()
    code = proc.wait(timeout=120)
    return head, Run(code, "", err.decode("utf-8", "replace"), cwd)


def dcmdump(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    """Run DCMTK's dcmdump (the oracle)."""
    return subprocess.run([need("dcmdump"), *map(str, args)], capture_output=True)


def squeeze(text: str) -> list[str]:
    """Lines with runs of spaces folded (dcmdump pads; the spec allows other padding)."""
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below root, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def pydicom_files() -> list[Path]:
    """pydicom's bundled DICOM test files (test data and character set samples)."""
    skip = (".txt", ".json", ".gz", ".icc", ".dump", ".py")
    return sorted(Path(f) for f in get_testdata_files() + get_charset_files()
                  if not f.endswith(skip) and Path(f).is_file())


def dcmdump_reads(path: Path, *options: str) -> bool:
    """True when dcmdump reads the file without any error or warning."""
    proc = dcmdump(*options, path)  # not -q: that would hide the warnings
    return proc.returncode == 0 and not proc.stderr.strip()


CORPUS = ROOT.parent / "shared" / "corpus"  # other projects' test files, beside the checkout


def corpus_files() -> list[Path]:
    """The shared corpus of real files (../shared/corpus): a failure in CI where it is
    missing, a skip elsewhere (a user's clone has no ../shared)."""
    if not CORPUS.is_dir():
        if IN_CI:
            pytest.fail(f"the shared corpus is missing: {CORPUS}")
        pytest.skip(f"no shared corpus at {CORPUS}")
    return sorted(p for p in CORPUS.rglob("*")
                  if p.is_file() and p.name not in ("README.md", "SOURCES.tsv"))


@pytest.fixture(scope="session")
def real_files() -> list[Path]:
    """pydicom's test files and the shared corpus: real files nobody here wrote."""
    return pydicom_files() + corpus_files()


@pytest.fixture(scope="session")
def readable_real_files(real_files: list[Path]) -> list[Path]:
    """The real files that dcmdump +U8 reads without an error or a warning."""
    need("dcmdump")
    return [p for p in real_files if dcmdump_reads(p, "+U8")]


@pytest.fixture(scope="session")
def readable_pydicom_files() -> list[Path]:
    """pydicom's test files that dcmdump reads cleanly (the oracle's own domain)."""
    need("dcmdump")
    return [p for p in pydicom_files() if dcmdump_reads(p)]


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree from --generate with every preset (made once per session)."""
    base = tmp_path_factory.mktemp("generated")
    names = run_tool("--list-scenarios", cwd=base).out.split("\n")
    args = [x for line in names if line.strip() for x in ("--scenario", line.split()[0])]
    run = run_tool("--generate", "--output", base / "tree", "--seed", "11", "-j", "2",
                   "--no-progress", *args, cwd=base)
    assert run.code == 0, run.err
    return base / "tree"


@pytest.fixture(scope="session")
def manifest(generated: Path) -> dict:
    """The generated tree's manifest.json."""
    return json.loads((generated / "manifest.json").read_text())


def instances(manifest: dict, **match: object) -> list[dict]:
    """Manifest entries whose fields equal the given values."""
    return [e for e in manifest["instances"] if all(e.get(k) == v for k, v in match.items())]


def tree_of(generated: Path, manifest: dict, tmp_path: Path, *scenarios: str) -> Path:
    """The accepted files of these scenarios of the generated tree, copied to tmp_path/tree."""
    tree = tmp_path / "tree"
    for scenario in scenarios:
        for e in instances(manifest, scenario=scenario, expect="accept"):
            target = tree / e["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(generated / e["path"], target)
    return tree


@pytest.fixture
def copy_of(tmp_path: Path):
    """Copy files (or manifest entries of a generated tree) into a fresh input dir."""

    def make(*sources: Path, names: list[str] | None = None) -> Path:
        target = tmp_path / "in"
        target.mkdir(exist_ok=True)
        for i, src in enumerate(sources):
            name = names[i] if names else src.name
            shutil.copy2(src, target / name)
        return target

    return make


def read(path: Path) -> pydicom.Dataset:
    """Read a file with pydicom, leniently."""
    return pydicom.dcmread(path, force=True)


def _deep_nesting(depth: int) -> bytes:
    """A bare explicit-VR dataset with sequences nested depth levels deep."""
    import struct
    body = b"\x10\x00\x20\x00LO\x04\x00DEEP"
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + body + \
            struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        body = struct.pack("<HH", 0x0010, 0x1002) + b"SQ\x00\x00" + \
            struct.pack("<I", 0xFFFFFFFF) + item + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + body


def _deflate_bomb() -> bytes:
    """A Part 10 file whose deflated dataset inflates to 2 GiB."""
    import zlib
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    buf = pydicom.filebase.DicomBytesIO()
    pydicom.filewriter.write_file_meta_info(buf, meta)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = b"\x00" * (1 << 24)
    body = b"".join(comp.compress(chunk) for _ in range(128)) + comp.flush()
    return b"\x00" * 128 + b"DICM" + buf.getvalue() + body


@pytest.fixture(scope="session")
def fuzz_tree(tmp_path_factory: pytest.TempPathFactory, generated: Path,
              manifest: dict) -> Path:
    """1,000+ hostile files mutated (fixed seed) from generated and pydicom test files."""
    import random
    import struct
    rng = random.Random(20261123)
    sources = [generated / e["path"] for e in manifest["instances"]
               if e["expect"] == "accept"][::25] + pydicom_files()[::6]
    datas = [p.read_bytes() for p in sources if p.stat().st_size < 2_000_000]
    tree = tmp_path_factory.mktemp("fuzz")
    for i in range(1000):
        data = bytearray(rng.choice(datas))
        kind = i % 5
        if kind == 0:  # bit flips
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncation anywhere
            data = data[: rng.randrange(len(data))]
        elif kind == 2:  # a length field that claims gigabytes (or 0xFFFFFFFE)
            at = rng.randrange(132, max(133, min(len(data) - 4, 3000)))
            data[at:at + 4] = struct.pack("<I", rng.choice([0xFFFFFFFE, 0x7FFFFFF0, 0xFFFFFFFF]))
        elif kind == 3:  # undefined-length item, no delimiters, then garbage
            at = rng.randrange(132, max(133, min(len(data), 4000)))
            data = data[:at] + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + \
                bytes(rng.randrange(256) for _ in range(64))
        else:  # garbage spliced in the header
            at = rng.randrange(0, max(1, min(len(data), 2000)))
            data[at:at + 16] = bytes(rng.randrange(256) for _ in range(16))
        (tree / f"f{i:04d}").write_bytes(bytes(data))
    (tree / "deep").write_bytes(_deep_nesting(10_000))
    (tree / "bomb").write_bytes(_deflate_bomb())
    return tree


class Namespace:
    """A network namespace with only lo, and the processes started in it."""

    def __init__(self) -> None:
        self.name = f"dsar-{uuid.uuid4().hex[:8]}"
        self.prefix = ["ip", "netns", "exec", self.name]
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *cmd: str | Path, env: dict[str, str] | None = None,
              log: Path | None = None) -> subprocess.Popen[bytes]:
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen([*self.prefix, *map(str, cmd)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    def python(self, code: str, timeout: float = 30) -> str:
        return subprocess.run([*self.prefix, sys.executable, "-c", code], capture_output=True,
                              text=True, timeout=timeout, check=True).stdout

    def wait_for_port(self, port: int, timeout: float = 20) -> None:
        code = textwrap.dedent(f"""
            import socket, time, sys
            end = time.time() + {timeout}
            while time.time() < end:
                try:
                    socket.create_connection(("127.0.0.1", {port}), 0.5).close(); sys.exit(0)
                except OSError:
                    time.sleep(0.1)
            sys.exit(1)""")
        subprocess.run([*self.prefix, sys.executable, "-c", code], check=True, timeout=60)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def ns():
    """A private network namespace (root needed; in CI its absence is a failure)."""
    need("ip")
    space = Namespace()
    made = subprocess.run(["ip", "netns", "add", space.name], capture_output=True)
    if made.returncode:
        if IN_CI:
            pytest.fail(f"cannot create a network namespace: {made.stderr.decode()}")
        pytest.skip("network namespaces need root")
    subprocess.run([*space.prefix, "ip", "link", "set", "lo", "up"], check=True)
    try:
        yield space
    finally:
        for proc in space.procs:
            space.stop(proc)
        subprocess.run(["ip", "netns", "del", space.name], check=False)


PORT, HTTP_PORT = 11112, 18042  # inside a test's own network namespace


@pytest.fixture
def orthanc(ns: Namespace, tmp_path: Path):
    """Orthanc with its own storage, called AE checked, answering C-FIND; rest(url) reads
    its REST API, rest.restart(lua=FILE) starts it again with a Lua script."""
    running: list[subprocess.Popen[bytes]] = []

    def start(lua: Path | None = None) -> None:
        config = {"Name": "dicom_sar_test", "StorageDirectory": str(tmp_path / "orthanc"),
                  "IndexDirectory": str(tmp_path / "orthanc"), "DicomAet": "ORTHANC",
                  "DicomPort": PORT, "HttpPort": HTTP_PORT, "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
                  "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
                  "DicomAlwaysAllowEcho": True, "Plugins": [],
                  "LuaScripts": [str(lua)] if lua else []}
        path = tmp_path / "orthanc.json"
        path.write_text(json.dumps(config))
        running.append(ns.start(need("Orthanc"), path, log=tmp_path / "orthanc.log"))
        ns.wait_for_port(HTTP_PORT)
        ns.wait_for_port(PORT)

    def restart(lua: Path | None = None) -> None:
        ns.stop(running.pop())
        start(lua)

    def rest(url: str) -> object:
        return json.loads(ns.python("import urllib.request; print(urllib.request.urlopen("
                                    f"'http://127.0.0.1:{HTTP_PORT}{url}').read().decode())"))

    start()
    rest.restart = restart  # type: ignore[attr-defined]
    return rest



@pytest.fixture
def default_orthanc(ns: Namespace, tmp_path: Path):
    """Debian's Orthanc with its configuration untouched but its ports and storage, as a
    user has it: C-STORE and C-ECHO from anyone, C-FIND only from AEs it knows."""
    need("Orthanc")
    config = tmp_path / "orthanc-default"
    config.mkdir()
    for source in Path("/etc/orthanc").glob("*.json"):
        text = source.read_text()
        for key, value in (("HttpPort", str(HTTP_PORT)), ("DicomPort", str(PORT))):
            text = re.sub(rf'"{key}"\s*:\s*\d+', f'"{key}" : {value}', text)
        text = re.sub(r'"/var/lib/orthanc/[^"]*"', json.dumps(str(tmp_path / "db")), text)
        (config / source.name).write_text(text)
    ns.start(need("Orthanc"), config, log=tmp_path / "orthanc.log")
    ns.wait_for_port(PORT)


# ── TLS: a CA made the classic way (openssl req -x509) ───────────────────────────────

def openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run([need("openssl"), *map(str, args)], cwd=cwd, check=True,
                   capture_output=True)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost, one for another host,
    a client certificate, and a second CA nobody uses."""
    d = tmp_path_factory.mktemp("certs")
    for ca in ("ca", "other_ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                f"/CN=dicom_sar test {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for name, san in (("server", "DNS:localhost,IP:127.0.0.1"), ("wronghost",
                                                                 "DNS:elsewhere.invalid"),
                      ("client", "DNS:client.invalid")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
                f"{name}.key", "-out", f"{name}.csr", cwd=d)
        usage = "clientAuth" if name == "client" else "serverAuth"
        (d / f"{name}.ext").write_text(
            f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\nauthorityKeyIdentifier=keyid,issuer\n"
            "subjectKeyIdentifier=hash\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out",
                f"{name}.crt", cwd=d)
    return d


# ── Orthanc with its DICOMweb plugin, HTTP authentication on ────────────────────────────

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "alice", "correct horse battery staple"


@pytest.fixture
def web_orthanc(ns: Namespace, tmp_path: Path):
    """Orthanc with the DICOMweb plugin at /dicom-web/, HTTP Basic authentication on (one
    registered user), no DICOM port in use; rest(url) reads its REST API,
    rest.restart(lua=FILE) starts it again with a Lua script."""
    need("Orthanc")
    if not PLUGIN.exists():
        message = f"{PLUGIN} is missing (apt-get install orthanc-dicomweb)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    running = []

    def start(lua: Path | None = None) -> None:
        config = {"Name": "dicom_sar_web", "StorageDirectory": str(tmp_path / "orthanc"),
                  "IndexDirectory": str(tmp_path / "orthanc"), "DicomPort": 11112,
                  "HttpPort": HTTP_PORT, "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
                  "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                  "LuaScripts": [str(lua)] if lua else []}
        path = tmp_path / "orthanc.json"
        path.write_text(json.dumps(config))
        running.append(ns.start(need("Orthanc"), path, log=tmp_path / "orthanc.log"))
        ns.wait_for_port(HTTP_PORT)

    def restart(lua: Path | None = None) -> None:
        ns.stop(running.pop())
        start(lua)

    def rest(url: str, method: str = "GET") -> object:
        return json.loads(ns.python(textwrap.dedent(f"""
            import base64, urllib.request
            auth = base64.b64encode({f"{USER}:{PASSWORD}".encode()!r}).decode()
            req = urllib.request.Request('http://127.0.0.1:{HTTP_PORT}{url}', method={method!r},
                                         headers={{'Authorization': 'Basic ' + auth}})
            print(urllib.request.urlopen(req).read().decode() or 'null')""")))

    start()
    rest.restart = restart  # type: ignore[attr-defined]
    return rest


def held(orthanc) -> set[str]:
    """The SOP Instance UIDs Orthanc holds, from its REST API."""
    return {x["MainDicomTags"]["SOPInstanceUID"] for x in orthanc("/instances?expand")}


# ── Random DICOM files for the property tests (hypothesis) ──────────────────────────────

def property_settings(examples: int) -> settings:
    """The same examples on every run (CI stays reproducible); PROPERTY_EXAMPLES=N explores
    N fresh random ones instead. No deadline: time is never asserted (noisy machines)."""
    explore = os.environ.get("PROPERTY_EXAMPLES")
    return settings(max_examples=int(explore) if explore else examples, deadline=None,
                    derandomize=not explore)


# top-level string elements a SAR or tag dump may name: keyword -> (VR, longest value)
PROPERTY_TAGS = {"PatientID": ("LO", 64), "PatientName": ("PN", 64),
                 "AccessionNumber": ("SH", 16), "StudyDescription": ("LO", 64),
                 "InstitutionName": ("LO", 64), "StudyID": ("SH", 16),
                 "ReferringPhysicianName": ("PN", 64), "OperatorsName": ("PN", 64),
                 "StationName": ("SH", 16), "Modality": ("CS", 16)}
SYNTAXES = [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian,
            pydicom.uid.ExplicitVRBigEndian]
CHARSETS = {None: "ABCXYZabcxyz0189 .-", "ISO_IR 100": "ABCabc019 äöüßéÈ",
            "ISO_IR 192": "ABCabc019 äéЖ中文"}


@st.composite
def element_value(draw: st.DrawFn, vr: str, longest: int, letters: str) -> str:
    """A value valid for its VR: text in the file's character set, several values at times."""
    if vr == "CS":
        alphabet, longest = "ABCDEFXYZ0189 _", 16
    elif vr == "PN":
        alphabet = letters.replace(" ", "") + "^"
    else:
        alphabet = letters
    values = draw(st.lists(st.text(alphabet, max_size=min(longest, 20)), min_size=1,
                           max_size=3 if vr in ("CS", "PN") else 1))
    return "\\".join(v.strip() for v in values)


@st.composite
def code_item(draw: st.DrawFn, letters: str, nested_id: bool) -> Dataset:
    """A sequence item: a code, sometimes with a PatientID of its own."""
    item = Dataset()
    item.CodeValue = draw(st.text("0123456789", min_size=1, max_size=16))
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = draw(element_value("LO", 64, letters))
    if nested_id:
        item.PatientID = draw(element_value("LO", 64, letters))
    item.is_undefined_length_sequence_item = draw(st.booleans())
    return item


@st.composite
def dicom_files(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """A small, valid Part 10 file in a random transfer syntax and character set, with
    random top-level string elements, sequences (defined or undefined length, a nested
    PatientID at times) and pixel data at times: (bytes, keywords of its string elements)."""
    syntax = draw(st.sampled_from(SYNTAXES))
    charset = draw(st.sampled_from(sorted(CHARSETS, key=str)))
    letters = CHARSETS[charset]
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(draw(st.integers(0, 9**9)))])
    present = draw(st.lists(st.sampled_from(sorted(PROPERTY_TAGS)), unique=True, max_size=6))
    for keyword in present:
        vr, longest = PROPERTY_TAGS[keyword]
        setattr(ds, keyword, draw(element_value(vr, longest, letters)))
    if draw(st.booleans()):
        ds.Rows, ds.Columns, ds.InstanceNumber = 2, 2, draw(st.integers(0, 99999))
        ds.PixelSpacing = ["0.5", "0.25"]
    if draw(st.booleans()):  # a private block: odd group, a long-VR (OB) element
        block = ds.private_block(0x0009, "DICOM_SAR TEST", create=True)
        block.add_new(0x10, "LO", draw(element_value("LO", 64, letters)))
        block.add_new(0x11, "OB", draw(st.binary(max_size=40)))
    for keyword in draw(st.lists(st.sampled_from(["AnatomicRegionSequence",
                                                  "OtherPatientIDsSequence"]),
                                 unique=True, max_size=2)):
        nested = keyword == "OtherPatientIDsSequence"
        items = draw(st.lists(code_item(letters, nested), max_size=3))
        setattr(ds, keyword, Sequence(items))
        ds[keyword].is_undefined_length = draw(st.booleans())
    if draw(st.booleans()):
        ds.BitsAllocated, ds.SamplesPerPixel, ds.PhotometricInterpretation = 16, 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 2
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 0
        ds.PixelData = bytes(draw(st.binary(min_size=8, max_size=8)))
    return as_part10(ds, syntax), present


def as_part10(ds: Dataset, syntax: str = pydicom.uid.ExplicitVRLittleEndian) -> bytes:
    """ds encoded as a Part 10 file in syntax, its file meta naming its SOP class and
    instance (Secondary Capture and a fresh UID where it has none)."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID",
                                                  pydicom.uid.SecondaryCaptureImageStorage)
    ds.file_meta.MediaStorageSOPInstanceUID = (ds.get("SOPInstanceUID")
                                               or pydicom.uid.generate_uid())
    fp = pydicom.filebase.DicomBytesIO()
    ds.save_as(fp, enforce_file_format=True)
    return fp.getvalue()


DAMAGE = ["flip", "cut", "insert", "delete"]


def damaged(data: bytes, damage: str, draw: st.DataObject) -> bytes:
    """data with a byte changed, bytes inserted or deleted, or cut short, after the magic."""
    out = bytearray(data)
    at = draw.draw(st.integers(132, len(out) - 1))
    if damage == "flip":
        out[at] = draw.draw(st.integers(0, 255))
    elif damage == "cut":
        del out[at:]
    elif damage == "insert":
        out[at:at] = draw.draw(st.binary(min_size=1, max_size=4))
    else:
        del out[at:at + draw.draw(st.integers(1, 4))]
    return bytes(out)


# ── Files whose readability DCMTK decides (built with pydicom) ───────────────────────────

def _encapsulated(ds: Dataset) -> None:
    """Give ds a 2x2 monochrome image as one JPEG 2000 fragment (undefined length)."""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(12)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True


def icon_in_item(depth: int) -> bytes:
    """A JPEG 2000 MR image whose IconImageSequence item (undefined length) holds its own
    encapsulated PixelData, depth 1 or 2 (inside a ReferencedImageSequence item): the
    compressed icon that Siemens and GE archives carry, which dcmdump reads cleanly."""
    icon = Dataset()
    _encapsulated(icon)
    holder = Dataset()
    holder.IconImageSequence = Sequence([icon])
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = pydicom.uid.MRImageStorage, pydicom.uid.generate_uid()
    ds.StudyInstanceUID = ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.PatientID, ds.Modality = "ICON^PATIENT", "MR"
    if depth == 1:
        ds.IconImageSequence = holder.IconImageSequence
    else:
        outer = Dataset()
        outer.ReferencedSOPInstanceUID = pydicom.uid.generate_uid()
        outer.IconImageSequence = holder.IconImageSequence
        ds.ReferencedImageSequence = Sequence([outer])
    _encapsulated(ds)
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
    return as_part10(ds, pydicom.uid.JPEG2000Lossless)


def sequence_delimiter_in_item(data: bytes) -> bytes:
    """data with its first item delimiter (FFFE,E00D) made a sequence delimiter (FFFE,E0DD):
    dcmdump refuses it ("Parse error in sequence item")."""
    item_end = bytes.fromhex("feff0de000000000")
    at = data.index(item_end)
    return data[:at] + bytes.fromhex("feffdde000000000") + data[at + 8:]


def readability_cases() -> dict[str, bytes]:
    """Built files on the edge of readability, by name."""
    return {"icon_depth1": icon_in_item(1), "icon_depth2": icon_in_item(2),
            "seqdelim_in_item_depth1": sequence_delimiter_in_item(icon_in_item(1)),
            "seqdelim_in_item_depth2": sequence_delimiter_in_item(icon_in_item(2))}
