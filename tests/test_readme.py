"""The README cannot drift: its tour runs in fish and must print what the README shows.

Run as a script (`venv/bin/python tests/test_readme.py`) to rewrite the README's pasted
outputs and --help from a fresh run.
"""

from __future__ import annotations

import itertools
import os
import re
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
    """Run README commands in fish with this interpreter standing in for venv/bin/python."""
    script = commands.replace("venv/bin/python dicom_sar.py", f"{sys.executable} {TOOL}")
    proc = subprocess.run([*(prefix or []), need("fish"), "-c", script], cwd=cwd,
                          capture_output=True, env={**os.environ, "COLUMNS": "100"}, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr.decode()
    return proc.stdout.decode()


def main_job(text: str) -> str:
    """The setup block's tool commands (the venv and pip lines are the user's, not ours)."""
    setup = next(b for b in blocks(text) if "<!-- ci:setup -->" in text[b.start() - 30:b.start()])
    lines = [line.removeprefix("and ") for line in setup[2].splitlines()
             if "dicom_sar.py" in line]
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


VOLATILE = re.compile(r"^(  (?:avg ms per file|total seconds|files per second|mb per second|"
                      r"workers|free threaded|session id|start time|end time|total time ms|"
                      r"average transfer time ms|throughput mbps)\s+|session ).*$"
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


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        README.write_text(render(README.read_text(), Path(tmp)))
