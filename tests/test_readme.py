"""The README cannot drift: its tour runs in fish and must print what the README shows.

Run as a script (`venv/bin/python tests/test_readme.py`) to rewrite the README's pasted
outputs and --help from a fresh run.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, TOOL, Namespace, need

README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)


def blocks(text: str) -> list[re.Match[str]]:
    """Every fenced block of the README, in order."""
    return list(FENCE.finditer(text))


def tour_pairs(text: str) -> list[tuple[re.Match[str], re.Match[str]]]:
    """(fish commands, pasted output) pairs: a fish block directly followed by a plain one."""
    found = blocks(text)
    return [(a, b) for a, b in itertools.pairwise(found)
            if a[1] == "fish" and b[1] == "" and b.start() == a.end()
            and "<!-- ci:" not in text[max(0, a.start() - 30):a.start()]]


def in_fish(commands: str, cwd: Path, prefix: list[str] | None = None) -> str:
    """Run README commands in fish with this interpreter and this checkout's dicom_sar.py
    standing in for the venv's installed command."""
    script = commands.replace("venv/bin/dicom_sar", f"{sys.executable} {TOOL}")
    proc = subprocess.run([*(prefix or []), need("fish"), "-c", script], cwd=cwd,
                          capture_output=True, env={**os.environ, "COLUMNS": "100"}, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr.decode()
    return proc.stdout.decode()


def main_job(text: str) -> str:
    """The setup block's tool commands (the venv and pip lines are the user's, not ours)."""
    setup = next(b for b in blocks(text) if "<!-- ci:setup -->" in text[b.start() - 30:b.start()])
    lines = [line.removeprefix("and ") for line in setup[2].splitlines()
             if "venv/bin/dicom_sar" in line]
    return "\n".join(lines)


def help_text() -> str:
    return subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True,
                          env={**os.environ, "COLUMNS": "100"}, text=True).stdout


def help_block(text: str) -> re.Match[str]:
    return next(b for b in blocks(text) if b.start() > text.index("## `--help`"))


def with_storescp(cwd: Path):
    """A private loopback-only namespace with DCMTK storescp on 11112, for the send tour."""
    space = Namespace()
    subprocess.run(["ip", "netns", "add", space.name], check=True)
    subprocess.run([*space.prefix, "ip", "link", "set", "lo", "up"], check=True)
    (cwd / "rx").mkdir(exist_ok=True)
    space.start(need("storescp"), "--fork", "-aet", "STORESCP", "-od", cwd / "rx", "11112",
                env={"TCP_NODELAY": "1"})
    space.wait_for_port(11112)
    return space


def render(text: str, cwd: Path) -> str:
    """The README with every pasted output (and --help) replaced by a fresh run's."""
    in_fish(main_job(text), cwd)
    out, pos, space = [], 0, None
    try:
        for commands, shown in tour_pairs(text):
            prefix = None
            if "--send" in commands[2]:
                space = space or with_storescp(cwd)
                prefix = space.prefix
            out += [text[pos:shown.start()], "```\n", in_fish(commands[2], cwd, prefix), "```\n"]
            pos = shown.end()
    finally:
        if space is not None:
            for proc in space.procs:
                space.stop(proc)
            subprocess.run(["ip", "netns", "del", space.name], check=False)
    out.append(text[pos:])
    text = "".join(out)
    block = help_block(text)
    return text[:block.start()] + "```\n" + help_text() + "```\n" + text[block.end():]


VOLATILE = re.compile(r"^(  (?:avg per file|total time|files per second|throughput|"
                      r"workers|free threaded|session id|start time|end time)\s+|session ).*$"
                      r"|^warning: this Python has the GIL.*\n", re.M)


ALIAS_METAVAR = re.compile(r"(-[\w-]+) [A-Z]+, ")  # 3.11 argparse: '--workers N, --threads N'


def stable(text: str) -> str:
    """The README without what varies from run to run: timings, CPU count, interpreter."""
    text = VOLATILE.sub(lambda m: m[1] + "*" if m[1] else "", text)
    return re.sub(r"\s+", " ", ALIAS_METAVAR.sub(r"\1, ", text))  # argparse alignment varies


def test_tour_outputs_are_what_the_tool_prints(tmp_path: Path) -> None:
    text = README.read_text()
    assert len(tour_pairs(text)) >= 5
    assert stable(render(text, tmp_path)) == stable(text)


def test_readme_commands_are_fish_not_bash() -> None:
    bash_only = re.compile(r"\$\(|\bexport\b|\[\[|^\w+=\S* ", re.M)
    fish_blocks = [b[2] for b in blocks(README.read_text()) if b[1] == "fish"]
    assert len(fish_blocks) >= 7
    assert not [b for b in fish_blocks if bash_only.search(b)]


def setup_block(text: str) -> str:
    """The README's ci:setup block, as .ci/run runs it."""
    return next(b for b in blocks(text) if "<!-- ci:setup -->" in text[b.start() - 30:b.start()])[2]


def test_fish_blocks_check_a_command_before_calling_it() -> None:
    """The user's rule: a command that may not exist is checked (`command -q X; and X`,
    `type -q X; and X`) before it is called: `missing-command; or ...` prints "Unknown
    command" in fish."""
    optional = ("../", "python3.13t", "uv", "python3", "parallel", "sbatch", "Orthanc")
    for block in (b[2] for b in blocks(README.read_text()) if b[1] == "fish"):
        for line in block.splitlines():
            for part in re.split(r";\s*(?:and|or)?\s*|\band\s+|&&", line):
                words = part.split()
                if words and words[0].startswith(optional) and not re.search(
                        rf"(command|type) -q {re.escape(words[0])}\b", line):
                    raise AssertionError(f"unchecked command in a README block: {line}")


def test_nothing_points_at_the_shared_folder() -> None:
    for path in (README, TOOL, ROOT / ".ci" / "run", ROOT / "tools" / "free-threaded-python",
                 ROOT / "pyproject.toml"):
        assert "../shared" not in path.read_text(), path


def test_fresh_clone_setup_block_in_fish(tmp_path: Path) -> None:
    """A clone with nothing beside it (no ../shared): the README's setup block, in fish,
    builds a free-threaded venv with the `dicom_sar` command and runs the demo job."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    clone = tmp_path / "clone"
    for name in filter(None, (f.decode() for f in files)):
        source = ROOT / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    assert not (tmp_path / "shared").exists()
    proc = subprocess.run([need("fish"), "-c", setup_block(README.read_text())], cwd=clone,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Unknown command" not in proc.stderr and "../shared" not in proc.stderr
    python = clone / "venv" / "bin" / "python"
    assert subprocess.run([python, "-c", "import sys; sys.exit(sys._is_gil_enabled())"]
                          ).returncode == 0, "the venv is not free-threaded"
    assert "GIL enabled" not in proc.stderr
    modified = list((clone / "demo_out").rglob("*"))
    assert len([p for p in modified if p.is_file()]) == 24
    assert "modified:" in (clone / "dicom_sar.log").read_text()
    version = subprocess.run([clone / "venv" / "bin" / "dicom_sar", "--version"],
                             capture_output=True, text=True)
    assert version.returncode == 0 and "free-threaded: yes" in version.stdout
    helped = subprocess.run([clone / "venv" / "bin" / "dicom_sar", "--help"],
                            capture_output=True, text=True).stdout
    assert helped.startswith("usage: dicom_sar [")


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        README.write_text(render(README.read_text(), Path(tmp)))
