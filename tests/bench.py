#!/usr/bin/env python3
"""Benchmark dicom_sar against DCMTK (and pynetdicom, and a naive pydicom loop) side by side.

    venv/bin/python tests/bench.py [--quick] [--json FILE] [--workers N] [--runs N] [--only 2,6b]

Corpora come from `dicom_sar.py --generate --seed ...` (cached); the page cache is warmed
with a pair's corpus before the pair; each pair runs alternately (A B A B ...), after a sync,
and the medians (wall and CPU), ratios and peak RSS are reported. "ours" is the installed
`dicom_sar` command beside the interpreter (as the README runs it: its module compiled once),
or `python dicom_sar.py` where there is none; pair 10 times both.
Not a test: timings belong here, never in assertions (the machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "dicom_sar.py"
PY = sys.executable
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
NAIVE = """
import sys, pydicom
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
src, out, workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
def one(p):
    ds = pydicom.dcmread(p)
    ds.PatientID = "GENHOSP" + ds.PatientID
    target = out / p.relative_to(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
with ThreadPoolExecutor(workers) as pool:
    list(pool.map(one, [p for p in src.rglob("*") if p.is_file()]))
"""

FLOOR = """
import os, sys
from concurrent.futures import ThreadPoolExecutor
root, workers = sys.argv[1], int(sys.argv[2])
def one(path):  # the least an atomic replacement does: new file beside, kernel copy, rename
    tmp = path + ".floor-tmp"
    src = os.open(path, os.O_RDONLY)
    dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    size, done = os.fstat(src).st_size, 0
    while done < size:
        done += os.copy_file_range(src, dst, size - done, done, done)
    os.close(src)
    os.close(dst)
    os.replace(tmp, path)
files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
with ThreadPoolExecutor(workers) as pool:
    list(pool.map(one, files, chunksize=16))
"""


def run_measured(cmd: str | list[str], env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + sys of the whole process tree: wait4 counts the
    children each process reaped) and peak RSS (KiB, largest process) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, shell=isinstance(cmd, str), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                            cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise SystemExit(f"benchmark command failed ({code}): {cmd}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss


def generate(cache: Path, name: str, *args: str) -> Path:
    """A cached corpus made by our own generator (manifest removed: only DICOM files)."""
    target = cache / name
    if not target.exists():
        tmp = cache / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([PY, TOOL, "--generate", "--output", tmp, "-j", "2", "--no-progress",
                        "-q", "--log-dir", cache, *args], check=True)
        (tmp / "manifest.json").unlink()
        tmp.rename(target)
    return target


def warm(tree: Path) -> None:
    """Read every file once (untimed), so a pair starts with its corpus in the page cache
    whatever the pairs before it pushed out."""
    for path in tree.rglob("*"):
        if path.is_file():
            path.read_bytes()


def files_of(tree: Path) -> int:
    return sum(1 for p in tree.rglob("*") if p.is_file())


def size_of(tree: Path) -> int:
    return sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())


class Bench:
    """Runs pairs alternately and keeps the results."""

    def __init__(self, runs: int, only: set[str] | None = None):
        self.runs, self.only = runs, only
        self.rows: list[dict] = []

    def pair(self, name: str, sides: dict[str, object], prepare=None, nbytes: int = 0,
             target: str = "", corpus: Path | None = None) -> dict:
        """Run every side `runs` times, interleaved; prepare() before each run (untimed)."""
        if self.only and name.split(maxsplit=1)[0] not in self.only:
            return {}
        if corpus is not None:
            warm(corpus)
        times: dict[str, list[float]] = {k: [] for k in sides}
        cpu: dict[str, list[float]] = {k: [] for k in sides}
        rss: dict[str, int] = dict.fromkeys(sides, 0)
        for _ in range(self.runs):
            for side, cmd in sides.items():
                if prepare:
                    prepare()
                # Untimed: the previous run's writes (or prepare()'s fresh copy) reach the disk
                # now, not during this run; the files a side works on are on disk, as a
                # user's tree is.
                os.sync()
                seconds, cpu_seconds, peak = run_measured(cmd() if callable(cmd) else cmd)
                times[side].append(seconds)
                cpu[side].append(cpu_seconds)
                rss[side] = max(rss[side], peak)
        medians = {k: statistics.median(v) for k, v in times.items()}
        ours = next(iter(sides))
        row = {"pair": name, "median_s": medians,
               "median_cpu_s": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
               "peak_rss_mb": {k: round(v / 1024, 1) for k, v in rss.items()},
               "ratio_vs_ours": {k: round(medians[k] / medians[ours], 2)
                                 for k in sides if k != ours}, "target": target}
        if nbytes:
            row["mb_per_s"] = {k: round(nbytes / 1e6 / v, 1) for k, v in medians.items()}
        self.rows.append(row)
        print(format_row(row), flush=True)
        return row


def format_row(row: dict) -> str:
    parts = [f"{row['pair']:<44}"]
    for side, seconds in row["median_s"].items():
        mb = f" {row['mb_per_s'][side]:>6} MB/s" if "mb_per_s" in row else ""
        parts.append(f"{side} {seconds:7.3f}s{mb} (cpu {row['median_cpu_s'][side]:.2f}s, "
                     f"{row['peak_rss_mb'][side]:.0f} MB)")
    ratios = ", ".join(f"{k}/ours = {v}x" for k, v in row["ratio_vs_ours"].items())
    return "  ".join(parts) + f"\n{'':<44}  {ratios}   target: {row['target']}"


def main() -> None:
    # as users run it: an imported module's bytecode is cached (an environment that turns
    # the cache off would charge every run of the installed command a compile)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small corpora, under 2 minutes")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    ap.add_argument("--workers", type=int, default=2, help="parallel workers for every side")
    ap.add_argument("--runs", type=int, default=3, help="runs per side (median)")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-cache")
    ap.add_argument("--only", help="run only these pairs, e.g. 2,6b (default: all)")
    ap.add_argument("--gil-python", default=str(ROOT / "venv-gil" / "bin" / "python"),
                    help="a stock (GIL) python with the requirements, for the scaling pair")
    args = ap.parse_args()
    for program in ("dcmdump", "dcmodify", "storescu", "storescp"):
        if not shutil.which(program):
            raise SystemExit(f"{program} missing: apt-get install dcmtk")
    w = str(args.workers)
    small_n, ct_n = (2000, 200) if args.quick else (10000, 2000)
    cache = args.cache / ("quick" if args.quick else "full")
    cache.mkdir(parents=True, exist_ok=True)
    free = bool(sysconfig.get_config_var("Py_GIL_DISABLED")) and not sys._is_gil_enabled()
    print(f"interpreter: {PY} (Python {platform.python_version()}), free-threaded: "
          f"{'yes' if free else 'no'}; workers: {w}; CPUs: {os.cpu_count()}; "
          f"runs per side: {args.runs}", flush=True)
    small = generate(cache, f"mg64_{small_n}", "--scenario", "multi_patient", "--patients",
                     str(small_n // 8), "--studies", "2", "--size", "64x64", "--seed", "101")
    ct = generate(cache, f"ct512_{ct_n}", "--scenario", "ct", "--patients", str(ct_n // 100),
                  "--instances", "100", "--seed", "202")
    print(f"corpora: {files_of(small)} MG 64x64 files; {files_of(ct)} CT 512x512 files "
          f"({size_of(ct) / 1e6:.0f} MB)", flush=True)
    bench = Bench(args.runs, set(args.only.split(",")) if args.only else None)
    work = Path(tempfile.mkdtemp(dir=cache))
    command = Path(PY).with_name("dicom_sar")  # the installed command, as the README runs it
    script = [PY, str(TOOL), "--no-progress", "-q", "--log-dir", str(work / "logs")]
    ours = [str(command), *script[2:]] if command.exists() else script
    print(f"ours: {ours[0]}" + ("" if command.exists() else " (no installed dicom_sar: "
                                 "the script, compiled on every run)"), flush=True)
    xargs = "find {tree} -type f -print0 | xargs -0 -P " + w + " -n {n} "

    # 1. dump one tag
    bench.pair("1 dump PatientID", {
        "ours": [*ours, "--dump", "--tag", "PatientID", "--path", str(small), "-j", w],
        "dcmdump": xargs.format(tree=small, n=small_n // (4 * args.workers))
        + "dcmdump -q +P PatientID"}, target="ours <= 1.0x dcmdump", corpus=small)

    # 2./3. SAR in place, and to a new tree, on fresh copies (copy time excluded)
    fresh = work / "fresh"

    def copy_ct() -> None:
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(work / "out", ignore_errors=True)
        shutil.copytree(ct, fresh)
    sar = [*ours, "--sar", "--tag", "PatientID", "--regex_search", "^(.*)$",
           "--regex_replace", r"GENHOSP\1", "-j", w]
    dcmodify = xargs.format(tree="{tree}", n=max(1, ct_n // (4 * args.workers))) + \
        "dcmodify -nb -m '(0010,0020)=GENHOSPX'"
    floor = work / "floor.py"
    floor.write_text(FLOOR)
    bench.pair("2 SAR in place (CT 512x512)", {
        "ours": [*sar, "--inplace", "--no-backup", "--path", str(fresh)],
        "ours --no-fsync": [*sar, "--inplace", "--no-backup", "--no-fsync", "--path",
                            str(fresh)],
        "dcmodify": dcmodify.format(tree=fresh),
        "dcmodify, then sync": dcmodify.format(tree=fresh) + " && sync",
        "atomic floor": [PY, str(floor), str(fresh), w]}, prepare=copy_ct, corpus=ct,
        target="ours (durable, by default) <= 1.0x dcmodify (in place, no flush)")
    bench.pair("3 SAR to a new tree (CT 512x512)", {
        "ours": [*sar, "--path", str(fresh), "--output", str(work / "out")],
        "ours --no-fsync": [*sar, "--no-fsync", "--path", str(fresh), "--output",
                            str(work / "out")],
        "cp+dcmodify": f"cp -r {fresh} {work / 'out'} && "
        + dcmodify.format(tree=work / "out"),
        "cp+dcmodify, then sync": f"cp -r {fresh} {work / 'out'} && "
        + dcmodify.format(tree=work / "out") + " && sync"}, prepare=copy_ct, target="ours <= 1.0x",
        corpus=ct)

    # 4. send to storescp --ignore on loopback
    send_pair(bench, ours, ct, w, size_of(ct), work)

    # 5. naive dcmread/save_as loop vs ours, same tree out
    naive = work / "naive.py"
    naive.write_text(NAIVE)
    bench.pair("5 naive pydicom loop vs ours (to new tree)", {
        "ours": [*sar, "--no-fsync", "--path", str(fresh), "--output", str(work / "out")],
        "naive": [PY, str(naive), str(fresh), str(work / "out"), w]},
        prepare=copy_ct, target="naive >= 5x ours", corpus=ct)

    # 6. scaling: workers 1 vs 2 (3.13t), and the GIL build at the same workers
    bench.pair("6a dump, workers 2 vs 1", {
        "ours -j2": [*ours, "--dump", "--tag", "PatientID", "--path", str(small), "-j", "2"],
        "ours -j1": [*ours, "--dump", "--tag", "PatientID", "--path", str(small), "-j", "1"]},
        target="-j1 >= 1.7x -j2", corpus=small)
    bench.pair("6b SAR in place, workers 2 vs 1", {
        "ours -j2": [*sar[:-2], "-j", "2", "--inplace", "--no-backup", "--no-fsync", "--path",
                     str(fresh)],
        "ours -j1": [*sar[:-2], "-j", "1", "--inplace", "--no-backup", "--no-fsync", "--path",
                     str(fresh)]}, prepare=copy_ct, target="-j1 > -j2", corpus=ct)
    if Path(args.gil_python).exists():
        gil = [args.gil_python, *ours[1:]]
        bench.pair("6c dump, 3.13t vs stock python3 (GIL), -j2", {
            "3.13t": [*ours, "--dump", "--tag", "PatientID", "--path", str(small), "-j", "2"],
            "GIL": [*gil, "--dump", "--tag", "PatientID", "--path", str(small), "-j", "2"]},
            target="GIL slower", corpus=small)
    else:
        print(f"6c skipped: no GIL python at {args.gil_python} (.ci/run makes venv-gil)")
    # 7. generating the CT corpus vs copying it (the same bytes and files: the disk's floor).
    # "then sync" sides: what the reference costs once its output is on disk, as ours is by
    # default (the least any durable writer pays on this disk)
    def clear_gen() -> None:
        shutil.rmtree(work / "gen", ignore_errors=True)
    gen = [*ours, "--generate", "--output", str(work / "gen"), "--scenario", "ct", "--patients",
           str(ct_n // 100), "--instances", "100", "--seed", "202", "-j", w]
    bench.pair("7 generate CT 512x512 vs cp -r of it", {
        "ours": gen, "ours --no-fsync": [*gen, "--no-fsync"],
        "cp -r": f"cp -r {ct} {work / 'gen'}",
        "cp -r, then sync": f"cp -r {ct} {work / 'gen'} && sync"}, prepare=clear_gen, corpus=ct,
        target="ours <= 1.5x cp -r")
    # 8./9. send to a real PACS (Orthanc): real files nobody here wrote, and clean CT
    real = real_tree(cache)
    if real is not None:
        orthanc_pair(bench, "8 send real files to Orthanc", {
            "ours": [*ours, "--send", "--path", str(real), "-H", "{host}", "-p", "{port}",
                     "-a", "ORTHANC", "-t", w],
            "dcmsend": ["dcmsend", "--no-halt", "-aec", "ORTHANC", "--scan-directories",
                        "--recurse", "-nh", "{host}", "{port}", str(real)]}, work,
            target="ours stores >= dcmsend's instances and takes <= 1.0x its time")
    orthanc_pair(bench, f"9 send {ct_n} CT to Orthanc", {
        "ours -j2": [*ours, "--send", "--path", str(ct), "-H", "{host}", "-p", "{port}",
                     "-a", "ORTHANC", "-t", "2"],
        "ours -j4": [*ours, "--send", "--path", str(ct), "-H", "{host}", "-p", "{port}",
                     "-a", "ORTHANC", "-t", "4"],
        "dcmsend": ["dcmsend", "-aec", "ORTHANC", "--scan-directories", "--recurse", "-nh",
                    "{host}", "{port}", str(ct)]}, work, target="ours faster than dcmsend")
    # 12. the same by STOW-RS (Orthanc's DICOMweb plugin), against C-STORE, dcmsend and
    # Orthanc's own intake floor: four curl processes POSTing the files to /instances
    stow = [*ours, "--send", "--path", str(ct), "--url", "http://127.0.0.1:18098/dicom-web"]
    orthanc_pair(bench, f"12 send {ct_n} CT to Orthanc by STOW-RS", {
        "ours STOW -j2": [*stow, "-j", "2"],
        "ours STOW -j4": [*stow, "-j", "4"],
        "ours C-STORE -j2": [*ours, "--send", "--path", str(ct), "-H", "{host}", "-p",
                             "{port}", "-a", "ORTHANC", "-t", "2"],
        "dcmsend": ["dcmsend", "-aec", "ORTHANC", "--scan-directories", "--recurse", "-nh",
                    "{host}", "{port}", str(ct)],
        "curl x4 /instances": ["sh", "-c", f"find {ct} -type f -print0 | xargs -0 -P 4 -I {{}} "
                               "curl -s -o /dev/null -H Expect: --data-binary @{} "
                               "http://127.0.0.1:18098/instances"]}, work,
        target="ours STOW <= 1.1x the curl floor", web=True)

    # 11. de-identification against dicognito (PyPI), as its README runs it (one thread)
    dicognito = shutil.which("dicognito", path=str(Path(PY).parent))
    if dicognito:
        key = work / "deid.key"
        key.write_bytes(os.urandom(32))

        def clear_deid() -> None:
            shutil.rmtree(work / "deid", ignore_errors=True)
        deid = [*ours, "--deid", "--key", str(key), "--path", str(ct), "--output",
                str(work / "deid"), "-j", w]
        bench.pair(f"11 de-identify {ct_n} CT vs dicognito", {
            "ours": deid, "ours --no-fsync": [*deid, "--no-fsync"],
            "dicognito": [PY, "-m", "dicognito", "--quiet", "--output-directory",
                          str(work / "deid"), str(ct)]}, prepare=clear_deid, corpus=ct,
            target="dicognito >= 5x ours")
    else:
        print("11 skipped: no dicognito beside the interpreter (pip install dicognito)")

    # 10. start-up: one file, one tag, each side a whole process
    one = next(p for p in small.rglob("*") if p.is_file())
    sides: dict[str, object] = {}
    if command.exists():
        sides["dicom_sar"] = [str(command), "-q", "--dump", "--tag", "PatientID", "--path",
                              str(one), "--log-dir", str(work / "logs")]
    sides |= {"python dicom_sar.py": [*script, "--dump", "--tag", "PatientID", "--path",
                                      str(one)],
              "python -c pass": [PY, "-c", "pass"],
              "dcmdump": ["dcmdump", "-q", "+P", "PatientID", str(one)]}
    row = Bench(max(10, args.runs), bench.only).pair(  # 10 runs at least: start-up is short
        "10 start-up: one file, one tag", sides, corpus=small,
        target="dicom_sar <= 4x python -c pass")
    if row:
        bench.rows.append(row)
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"interpreter": PY, "free_threaded": free,
                                         "workers": args.workers, "cpus": os.cpu_count(),
                                         "quick": args.quick, "pairs": bench.rows}, indent=2))


def real_tree(cache: Path) -> Path | None:
    """pydicom's test files and ../shared/corpus (when beside the checkout) in one tree."""
    corpus = ROOT.parent / "shared" / "corpus"
    target = cache / "real"
    if not target.exists():
        from pydicom.data import get_charset_files, get_testdata_files
        files = [Path(f) for f in get_testdata_files() + get_charset_files()
                 if not f.endswith((".txt", ".json", ".gz", ".icc", ".dump", ".py"))
                 and Path(f).is_file()]
        if corpus.is_dir():
            files += [p for p in corpus.rglob("*")
                      if p.is_file() and p.name not in ("README.md", "SOURCES.tsv")]
        tmp = cache / "real.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for i, f in enumerate(sorted(files)):
            shutil.copy(f, tmp / f"{i:04d}")
        tmp.rename(target)
    return target


def orthanc_pair(bench: Bench, name: str, sides: dict[str, list[str]], work: Path,
                 target: str, web: bool = False) -> None:
    """Each side, alternately, into a fresh Orthanc on loopback (its own network namespace
    when root): wall and CPU time, and the distinct instances Orthanc holds afterwards.
    web: with the DICOMweb plugin loaded (apt-get install orthanc-dicomweb)."""
    if bench.only and name.split(maxsplit=1)[0] not in bench.only:
        return
    if not shutil.which("Orthanc") or (web and not DICOMWEB_PLUGIN.exists()):
        print(f"{name}: skipped (apt-get install orthanc orthanc-dicomweb)")
        return
    ns = f"dsar-orthanc-{os.getpid()}"
    prefix: list[str] = []
    if os.geteuid() == 0 and subprocess.run(["ip", "netns", "add", ns]).returncode == 0:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        prefix = ["ip", "netns", "exec", ns]
    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    held: dict[str, int] = {}
    try:
        for _ in range(bench.runs):
            for side, cmd in sides.items():
                store = work / "orthanc"
                shutil.rmtree(store, ignore_errors=True)
                config = {"StorageDirectory": str(store), "IndexDirectory": str(store),
                          "DicomAet": "ORTHANC", "DicomPort": 11198, "HttpPort": 18098,
                          "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                          "DicomAlwaysAllowStore": True,
                          "Plugins": [str(DICOMWEB_PLUGIN)] if web else []}
                (work / "orthanc.json").write_text(json.dumps(config))
                server = subprocess.Popen([*prefix, "Orthanc", str(work / "orthanc.json")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True)
                try:
                    wait_http(prefix)
                    full = [a.replace("{host}", "127.0.0.1").replace("{port}", "11198")
                            for a in cmd]
                    os.sync()
                    seconds, cpu_seconds, _ = run_measured([*prefix, *full])
                    times[side].append(seconds)
                    cpu[side].append(cpu_seconds)
                    held[side] = int(json.loads(subprocess.run(
                        [*prefix, PY, "-c", "import urllib.request; print(urllib.request."
                         "urlopen('http://127.0.0.1:18098/statistics').read().decode())"],
                        capture_output=True, text=True).stdout)["CountInstances"])
                finally:
                    os.killpg(server.pid, 9)
                    server.wait()
    finally:
        if prefix:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    medians = {k: statistics.median(v) for k, v in times.items()}
    ours = next(iter(sides))
    row = {"pair": name, "median_s": medians,
           "median_cpu_s": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
           "instances_held": held,
           "ratio_vs_ours": {k: round(medians[k] / medians[ours], 2) for k in sides
                             if k != ours}, "target": target}
    bench.rows.append(row)
    print(f"{name:<44}  " + "  ".join(
        f"{k} {medians[k]:7.3f}s (cpu {row['median_cpu_s'][k]:.2f}s, {held[k]} held)"
        for k in sides) + f"\n{'':<44}  " + ", ".join(
        f"{k}/ours = {v}x" for k, v in row["ratio_vs_ours"].items()) + f"   target: {target}",
        flush=True)


def wait_http(prefix: list[str]) -> None:
    """Until Orthanc answers on its REST port."""
    code = ("import socket, time, sys\nend = time.time() + 30\nwhile time.time() < end:\n"
            "    try:\n        socket.create_connection(('127.0.0.1', 18098), 0.5).close()\n"
            "        socket.create_connection(('127.0.0.1', 11198), 0.5).close(); sys.exit(0)\n"
            "    except OSError:\n        time.sleep(0.1)\nsys.exit(1)")
    subprocess.run([*prefix, PY, "-c", code], check=True)


def send_pair(bench: Bench, ours: list[str], tree: Path, w: str, nbytes: int,
              work: Path) -> None:
    """storescp --ignore --fork -pdu 131072 on loopback; ours vs storescu vs pynetdicom."""
    port = "11199"
    prefix: list[str] = []
    ns = f"dsar-bench-{os.getpid()}"
    if os.geteuid() == 0 and subprocess.run(["ip", "netns", "add", ns]).returncode == 0:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        prefix = ["ip", "netns", "exec", ns]  # loopback only, nothing else can reach it
    env = {**os.environ, "TCP_NODELAY": "1"}
    scp = subprocess.Popen([*prefix, "storescp", "--ignore", "--fork", "-pdu", "131072",
                            "-aet", "STORESCP", port], env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        pre = " ".join(prefix)
        bench.pair("4 send CT tree to storescp (MB/s)", {
            "ours": [*prefix, *ours, "--send", "--path", str(tree), "-H", "127.0.0.1", "-p",
                     port, "-a", "STORESCP", "-t", w, "--max-pdu", "131072"],
            "storescu": f"cd {tree} && find . -type f -print0 | TCP_NODELAY=1 xargs -0 -P {w} "
                        f"-n 100 {pre} storescu -aec STORESCP -pdu 131072 127.0.0.1 {port}",
            "pynetdicom": [*prefix, PY, "-m", "pynetdicom", "storescu", "127.0.0.1", port,
                           "-aec", "STORESCP", str(tree), "-r"]},
            nbytes=nbytes, target="ours >= 0.5x storescu MB/s and >= 5x pynetdicom",
            corpus=tree)
    finally:
        os.killpg(scp.pid, 9)
        scp.wait()
        if prefix:
            subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
