#!/usr/bin/env python3
"""dicom_sar: bulk search/replace, de-identify, dump, generate and send for trees of DICOM files.

The file reads like its pipeline; each section starts with a ═══ header naming it:

    Runtime             which interpreter, how many workers
    pydicom             its dictionaries at start-up, the package itself on first need
    Options             the mode table (MODES), the option table (OPTION_MODES), Options
    Tag specs           --tag: lazy hex, keywords, sequence paths, private tags
    Discovery           the walk, --files-from, --shard
    Reading             the raw scanner; every file read to its last byte
    Engine              the bounded, ordered pool; Status and FileResult
    Writing             temporary files, group commit (Committer), atomic renames
    Journal             --resume: exactly once
    Report              counters, logs, progress bar, summary, exit status
    Mode --dump         dcmdump's lines, JSON, --count
    Mode --sar          plan, validate, splice or rewrite
    Mode --deid         PS3.15 Annex E (Table E.1-1 as generated data), --deid-audit
    Mode --generate     synthetic trees, faults, manifest.json
    Mode --send         C-STORE by study (and --echo), TLS
    DICOMweb            --url: STOW-RS for --send, QIDO-RS for --verify, --check-ingest, --echo
    Mode --check-ingest C-FIND or QIDO-RS against a manifest (and --ingest-test)
    Mode --merge-summaries
    Mode --ui           the generator's wizard on loopback
    Shell completions
    main()              options -> the mode's driver (RUNNERS) -> exit status

Each mode's section holds its checks, its per-file task and its driver.
Runs on free-threaded CPython 3.13t (parallel) and on any CPython >= 3.11 (GIL, serial speed).
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import difflib
import enum
import fnmatch
import functools
import gc
import hashlib
import hmac
import importlib.util
import io
import itertools
import json
import logging
import math
import operator
import os
import random
import re
import shutil
import signal
import stat
import struct
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple, NoReturn

if TYPE_CHECKING:  # imported by load_pydicom(), on first need
    from pydicom.dataelem import DataElement, RawDataElement
    from pydicom.dataset import Dataset

__version__ = "0.1.0"
PROG = "dicom_sar"
EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143
EXIT_INTERNAL = 70  # a bug of ours (sysexits' EX_SOFTWARE), never a file's or a peer's fault
LOG_NAME, ERROR_LOG_NAME = "dicom_sar.log", "errors.log"
TEMP_PREFIX = ".dicom_sar-tmp-"  # every temporary file this tool writes starts with this
DEFAULT_OUTPUT, DEFAULT_BACKUP = "dicom_sar_output", "dicom_sar_backup"
DEFAULT_DEID = "dicom_sar_deid"
DEFAULT_GENERATED = "dicom_sar_generated"
DEFAULT_TIME_LIMIT = 600.0  # seconds per file; generous: a multi-GB file on slow storage


def table(items: Iterable[Any]) -> dict[Any, None]:
    """A shared read-only membership table. Not a frozenset: on 3.13t `in` locks a set, so
    workers sharing one wait for each other on every lookup; reading a dict takes no lock."""
    return dict.fromkeys(items)


# pydicom.valuerep's tables, retyped because the raw tag dump runs without importing pydicom;
# tests/test_dump.py proves each equal to pydicom's
VALID_VRS = table("AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV "
                  "TM UC UI UL UN UR US UT UV".split())  # STANDARD_VR
STRING_VRS = table("AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT".split())  # STR_VR
TEXT_VRS = table("SH LO ST LT UC UT PN".split())  # CUSTOMIZABLE_CHARSET_VR
BULK_VRS = table("OB OD OF OL OV OW UN".split())  # BYTES_VR
LONG_LENGTH_VRS = table("OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())  # EXPLICIT_VR_LENGTH_32
SINGLE_VALUE_VRS = table("LT ST UT UR".split())  # VM 1 by the standard: backslash is text

log = logging.getLogger(PROG)
errlog = logging.getLogger(PROG + ".errors")


# ════════════════════════════════════════════════════════════════════════════════════════
# Runtime: which interpreter we are on, and how many workers it can use
# ════════════════════════════════════════════════════════════════════════════════════════


def gil_disabled() -> bool:
    """True when this interpreter runs Python threads in parallel (free-threaded, GIL off)."""
    check = getattr(sys, "_is_gil_enabled", None)
    return check is not None and not check()


def usable_cpus() -> int:
    """CPUs this process may run on (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers() -> int:
    """The user's rule: leave four CPUs for the rest of the machine."""
    return max(1, usable_cpus() - 4)


def runtime_line() -> str:
    """One line for logs and summaries: Python version, free-threaded yes/no, and pydicom's
    version once it is imported (a raw tag dump may never import it)."""
    imported = sys.modules.get("pydicom")
    return (f"Python {sys.version.split()[0]}, free-threaded: {'yes' if gil_disabled() else 'no'}, "
            + (f"pydicom {imported.__version__}" if imported is not None
               else "pydicom's dictionaries (package not imported)"))


# ════════════════════════════════════════════════════════════════════════════════════════
# pydicom: its dictionaries at start-up, the package itself on first need
# ════════════════════════════════════════════════════════════════════════════════════════


def pydicom_table(name: str) -> ModuleType:
    """One of pydicom's generated table modules (`_dicom_dict`, `_uid_dict`: plain dicts, no
    imports), loaded from the installed package without running its __init__ (which imports
    pixel handlers, codecs and importlib.metadata: most of a tag dump's start-up). pydicom's
    own import finds it in sys.modules and uses the same objects."""
    qualified = "pydicom." + name
    module = sys.modules.get(qualified)
    if module is None:
        package = importlib.util.find_spec("pydicom")  # finds, does not import
        if package is None or not package.submodule_search_locations:
            raise SystemExit(f"{PROG}: pydicom is not installed (pip install -r requirements.txt)")
        spec = importlib.util.spec_from_file_location(
            qualified, os.path.join(package.submodule_search_locations[0], name + ".py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module = sys.modules.setdefault(qualified, module)
    return module


DICOM_DICTIONARY: dict[int, tuple[str, str, str, str, str]] = \
    pydicom_table("_dicom_dict").DicomDictionary  # tag: (VR, VM, name, retired, keyword)
UID_DICTIONARY: dict[str, tuple[str, str, str, str, str]] = \
    pydicom_table("_uid_dict").UID_dictionary  # uid: (name, type, info, retired, keyword)
UID_BY_KEYWORD = {info[4]: uid for uid, info in UID_DICTIONARY.items() if info[4]}
IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED = (UID_BY_KEYWORD[k] for k in (
    "ImplicitVRLittleEndian", "ExplicitVRLittleEndian", "ExplicitVRBigEndian",
    "DeflatedExplicitVRLittleEndian"))
# pydicom.charset's Python names for the character sets most files declare, retyped for the
# raw tag dump (equal to pydicom's: tests/test_dump.py); any other goes to pydicom
COMMON_CHARSETS = {"ISO_IR 6": "iso8859", "ISO_IR 100": "latin_1", "ISO_IR 192": "UTF8"}
DEFAULT_ENCODING = COMMON_CHARSETS["ISO_IR 6"]  # pydicom.charset.default_encoding
_PYDICOM_LOCK = threading.Lock()
_PYDICOM_READY = threading.Event()  # set once load_pydicom() has imported and configured it


def dictionary_entry(tag: int) -> tuple[str, str, str, str, str] | None:
    """A public tag's entry in pydicom's dictionary, as pydicom.datadict.get_entry finds it:
    the dictionary, else the repeating groups (curves, overlays); None for an unknown tag."""
    entry = DICOM_DICTIONARY.get(tag)
    if entry is None and not (tag >> 16) % 2:
        group = tag >> 16
        for group_fixed, group_care, masks in repeater_masks():
            if (group ^ group_fixed) & group_care == 0:
                for fixed, care, repeater in masks:
                    if (tag ^ fixed) & care == 0:  # the first match, as in mask_match
                        return repeater
    return entry


Masks = list[tuple[int, int, tuple[str, str, str, str, str]]]


@functools.cache
def repeater_masks() -> list[tuple[int, int, Masks]]:
    """pydicom's repeating-group entries (keys like 60xx3000) as the masks pydicom.datadict
    builds of them, (the fixed digits, which digits are fixed, entry), in its order, under
    the group pattern they share (a tag's group picks its few)."""
    by_pattern: dict[tuple[int, int], Masks] = {}
    for mask, entry in pydicom_table("_dicom_dict").RepeatersDictionary.items():
        fixed = int(mask.replace("x", "0"), 16)
        care = int("".join("0" if c == "x" else "F" for c in mask), 16)
        by_pattern.setdefault((fixed >> 16, care >> 16), []).append((fixed, care, entry))
    return [(fixed, care, masks) for (fixed, care), masks in by_pattern.items()]


@functools.cache
def keyword_tags() -> dict[str, int]:
    """Keyword -> tag, as pydicom.datadict.keyword_dict."""
    return {entry[4]: tag for tag, entry in DICOM_DICTIONARY.items()}


def python_encodings(terms: list[str]) -> list[str]:
    """pydicom.charset.convert_encodings of a SpecificCharacterSet's terms; the common single
    ones without importing pydicom."""
    if len(terms) == 1 and (terms[0] or "ISO_IR 6") in COMMON_CHARSETS:
        return [COMMON_CHARSETS[terms[0] or "ISO_IR 6"]]
    load_pydicom()
    return pydicom.charset.convert_encodings(terms)


def load_pydicom() -> None:
    """Import pydicom and configure it, once a process, from whichever thread first needs it:
    every mode but the raw tag dump, before its pool starts; a raw dump when a file is
    unusual. Binds the module-level names the TYPE_CHECKING block above declares."""
    global pydicom, DataElement, RawDataElement, Dataset, BaseTag, DicomBytesIO  # noqa: PLW0603
    global convert_raw_data_element, correct_ambiguous_vr_element, write_data_element  # noqa: PLW0603
    global generate_fragments  # noqa: PLW0603
    if _PYDICOM_READY.is_set():
        return
    with _PYDICOM_LOCK:
        if _PYDICOM_READY.is_set():
            return
        # Importing pydicom allocates ~100k objects; the cyclic GC would stop the world a
        # dozen times to scan them meanwhile
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            import pydicom
            import pydicom.charset
            import pydicom.config
            import pydicom.datadict
            import pydicom.encaps
            import pydicom.filewriter
            import pydicom.multival
            import pydicom.uid
            import pydicom.valuerep
            from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
            from pydicom.dataset import Dataset
            from pydicom.encaps import generate_fragments
            from pydicom.filebase import DicomBytesIO
            from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element
            from pydicom.tag import BaseTag
            pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
            pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
            # no warnings of pydicom's from the threads (errors.log tells what is wrong with a
            # file); other libraries' warnings are left as they are
            warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
            _PYDICOM_READY.set()
        finally:
            if was_enabled:
                gc.enable()


# ════════════════════════════════════════════════════════════════════════════════════════
# Options: argparse with a group per mode, turned once into a frozen Options object (each
# mode's own checks sit in its section)
# ════════════════════════════════════════════════════════════════════════════════════════


EPILOG = """\
examples (fish):
  dump:      python dicom_sar.py --dump --tag 10,20 --path ~/archive
  count:     python dicom_sar.py --dump --count --tag PatientID --path ~/archive
  preview:   python dicom_sar.py --sar --dry-run --tag PatientID \\
                 --regex_search '^(.*)$' --regex_replace 'GENHOSP\\1' --path ~/archive
  sar:       python dicom_sar.py --sar --tag PatientID --output ~/archive_fixed \\
                 --regex_search '^(.*)$' --regex_replace 'GENHOSP\\1' --path ~/archive
  in place:  python dicom_sar.py --sar --inplace --tag "(0010, 0020), (0010,0010)" \\
                 --regex_search '^X' --regex_replace 'Y' --path ~/archive
  generate:  python dicom_sar.py --generate --scenario default --patients 3 --seed 7 --output demo
  send:      python dicom_sar.py --send --path demo -H 127.0.0.1 -p 11112 -a STORESCP -t 4
  stow-rs:   python dicom_sar.py --send --path demo --url http://127.0.0.1:8042/dicom-web -t 4

exit status: 0 all fine, 1 some files failed or were rejected (or a peer refused), 2 usage
error, 70 internal error (a bug: the traceback is in dicom_sar.log), 130 interrupted (143
SIGTERM), 141 the reader of the output went away.
"""


class Mode(NamedTuple):
    """One entry of the mode table: its flag, its --help line, how argparse takes it, and
    whether it runs (over files or a peer) or only answers (a list, a version, a script)."""

    flag: str
    help: str
    takes: dict[str, Any]  # add_argument's keywords beyond the help
    runs: bool = True

    @property
    def name(self) -> str:
        """The mode as Options.mode and the dispatch table (RUNNERS) name it."""
        return self.flag.removeprefix("--").replace("-", "_")


# The mode table: the only list of modes. The parser's mode group, the completions and the
# option checks read it; RUNNERS (the last section) maps each mode that runs to its driver.
MODES = (
    Mode("--dump", "print header elements like dcmdump", {"action": "store_true"}),
    Mode("--sar", "regex search/replace on tag values", {"action": "store_true"}),
    Mode("--generate", "write a synthetic DICOM tree", {"action": "store_true"}),
    Mode("--deid", "de-identify (PS3.15 Basic Profile), keyed by --key FILE",
         {"action": "store_true"}),
    Mode("--deid-audit", "list what the Basic Profile would still act on; exit 1 if any",
         {"action": "store_true"}),
    Mode("--send", "send the tree study by study: C-STORE, or STOW-RS to a --url",
         {"action": "store_true"}),
    Mode("--echo", "C-ECHO the destination (QIDO-RS for a --url), send nothing",
         {"action": "store_true"}),
    Mode("--check-ingest", "ask (C-FIND, QIDO-RS) what a PACS kept of a generated tree, "
         "against its manifest", {"metavar": "MANIFEST"}),
    Mode("--ingest-test", "generate -> send -> wait for the PACS -> --check-ingest, in one run",
         {"action": "store_true"}),
    Mode("--ui", "serve the generator's wizard on 127.0.0.1 (--port P, else a free one)",
         {"action": "store_true"}),
    Mode("--merge-summaries", "sum the --summary-json files of --shard runs into one",
         {"nargs": "+", "metavar": "FILE"}),
    Mode("--list-scenarios", "list --generate presets", {"action": "store_true"}, runs=False),
    Mode("--version", "print versions for a bug report", {"action": "store_true"}, runs=False),
    Mode("--completions", "print a shell completion script (see README)",
         {"choices": ("fish", "bash", "zsh")}, runs=False),
)
RUN_MODES = tuple(m.name for m in MODES if m.runs)
FLAG_OF = {m.name: m.flag for m in MODES}  # "check_ingest" -> "--check-ingest"
WALKING = ("dump", "sar", "deid", "deid_audit", "send")  # the modes that read a tree
TALKING = ("send", "echo", "check_ingest", "ingest_test")  # the modes that talk to a PACS
# The modes that take each option (by argparse dest) that not every mode takes: any other
# mode refuses it (exit 2) rather than ignore it. ui takes --port as the port it listens on
# (its page names the destination).
OPTION_MODES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("path", "glob", "files_from", "null", "shard", "follow_symlinks"),
                    WALKING),
    "tag": ("dump", "sar"),
    "workers": (*WALKING, "generate", "check_ingest", "ingest_test", "ui"),
    "summary_json": (*WALKING, "generate", "check_ingest", "ingest_test", "merge_summaries"),
    "time_limit": (*WALKING, "generate", "ingest_test"),
    "dry_run": ("sar", "deid", "generate", "send"),
    **dict.fromkeys(("resume", "restart", "inplace", "backup_dir", "no_backup"), ("sar", "deid")),
    **dict.fromkeys(("format", "with_filename", "count"), ("dump",)),
    **dict.fromkeys(("regex_search", "regex_replace", "force", "deep", "copy_unmodified"),
                    ("sar",)),
    **dict.fromkeys(("output", "no_fsync"), ("sar", "deid", "generate", "ingest_test")),
    **dict.fromkeys(("key", "new_key", "allow_burned_in", "mapping"), ("deid",)),
    **dict.fromkeys(("deid_option", "keep_private"), ("deid", "deid_audit")),
    **dict.fromkeys(("scenario", "seed", "patients", "studies", "series", "instances",
                     "modality", "size", "layout", "config"), ("generate", "ingest_test")),
    **dict.fromkeys(("host", "ae_title", "calling_ae", "retries", "acse_timeout",
                     "dimse_timeout", "network_timeout", "max_pdu", "tls", "tls_ca",
                     "tls_cert", "tls_key", "tls_no_verify"), TALKING),
    "port": (*TALKING, "ui"),
    **dict.fromkeys(("url", "token_file", "user", "allow_plain_http"), TALKING),
    "verify": ("send",),
    "settle_timeout": ("ingest_test",),
}


def given_options(parser: argparse.ArgumentParser, ns: argparse.Namespace,
                  dests: Iterable[str]) -> dict[str, str]:
    """Those of these options (argparse dests) the command line set, each with its long
    flag, in --help order."""
    dests = set(dests)
    return {a.dest: max(a.option_strings, key=len) for a in parser._actions
            if a.dest in dests and getattr(ns, a.dest) != a.default}


def refuse_foreign_options(parser: argparse.ArgumentParser, ns: argparse.Namespace,
                           mode: str) -> None:
    """A usage error for an option given to a mode that would ignore it, naming its modes."""
    foreign = given_options(parser, ns, (d for d, modes in OPTION_MODES.items()
                                         if mode not in modes))
    for dest, flag in foreign.items():
        raise UsageError(f"{flag} belongs to " + ", ".join(FLAG_OF[m] for m in OPTION_MODES[dest])
                         + f", not to {FLAG_OF[mode]}")


def build_parser(prog: str = "dicom_sar.py") -> argparse.ArgumentParser:
    """The command line, grouped by mode."""
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Bulk search/replace, de-identify, dump, generate and send for trees of "
                    "DICOM files.")
    modes = p.add_argument_group("mode (choose one)").add_mutually_exclusive_group()
    for mode in MODES:
        modes.add_argument(mode.flag, help=mode.help, **mode.takes)

    common = p.add_argument_group("common")
    common.add_argument("--path", action="append", metavar="P",
                        help="file or directory to process, repeatable (default: .)")
    common.add_argument("--tag", action="append", metavar="SPEC",
                        help="10,20 | (0010, 0020) | 00100020 | PatientID | "
                             "Seq[*].Tag | (0029,\"CREATOR\",10); comma lists; repeatable")
    common.add_argument("--glob", metavar="PATTERN", help="only file names matching this pattern")
    common.add_argument("--files-from", metavar="FILE",
                        help="work on the files listed in FILE (- for stdin), one per line: "
                             "as listed, or below a --path root when one is given")
    common.add_argument("-0", "--null", action="store_true",
                        help="--files-from is NUL-separated (find -print0)")
    common.add_argument("--shard", metavar="I/N",
                        help="take only slice I of N of the files (a stable hash of each "
                             "path below its root): for parallel, Slurm arrays")
    common.add_argument("--workers", "--threads", "-j", "-t", type=int, metavar="N",
                        help="worker threads (default: max(1, usable CPUs - 4))")
    common.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT, metavar="S",
                        help="per-file time limit; a file past it becomes an error, the run "
                             f"goes on (default {DEFAULT_TIME_LIMIT:g} s, 0 = none)")
    common.add_argument("--follow-symlinks", action="store_true",
                        help="follow symlinked directories and files (loops are detected)")
    common.add_argument("--log-dir", metavar="DIR", default=".",
                        help="where dicom_sar.log and errors.log go (default: .)")
    common.add_argument("--summary-json", metavar="FILE", help="also write the summary as JSON")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="DEBUG logs, values in error lines")
    common.add_argument("-q", "--quiet", action="store_true",
                        help="print only errors and the mode's own output")
    common.add_argument("--dry-run", action="store_true",
                        help="write nothing; show what would change")
    common.add_argument("--resume", action="store_true",
                        help="skip files an interrupted run with the same options completed")
    common.add_argument("--restart", action="store_true",
                        help="forget an interrupted run's journal and start over")

    dump = p.add_argument_group("dump")
    dump.add_argument("--format", choices=("text", "json"), default="text",
                      help="text like dcmdump (default) or one DICOM JSON object per file")
    dump.add_argument("--with-filename", action="store_true", help="prefix lines with 'path: '")
    dump.add_argument("--count", action="store_true",
                      help="histogram of the tags' values instead of per-file lines")

    sar = p.add_argument_group("sar")
    sar.add_argument("--regex_search", "--regex-search", dest="regex_search", metavar="PATTERN",
                     help="Python regular expression to search for in each value")
    sar.add_argument("--regex_replace", "--regex-replace", dest="regex_replace", metavar="REPL",
                     help="replacement, with backreferences \\1 and \\g<name>")
    sar.add_argument("--force", action="store_true",
                     help="allow SAR on every string element when no --tag is given")
    sar.add_argument("--deep", action="store_true",
                     help="also match plain tags inside sequence items at any depth")
    sar.add_argument("--inplace", action="store_true",
                     help="sar, deid: replace files in place (atomic; original kept in "
                          "--backup-dir)")
    sar.add_argument("--output", "-o", metavar="DIR",
                     help=f"output tree (sar: ./{DEFAULT_OUTPUT}; deid: ./{DEFAULT_DEID}; "
                          f"generate: ./{DEFAULT_GENERATED})")
    sar.add_argument("--backup-dir", metavar="DIR",
                     help=f"backup tree for --inplace (default: ./{DEFAULT_BACKUP}/<UTC time>)")
    sar.add_argument("--no-backup", action="store_true", help="no backup with --inplace")
    sar.add_argument("--copy-unmodified", action="store_true",
                     help="also copy unmodified DICOM files into the output tree")
    sar.add_argument("--no-fsync", action="store_true",
                     help="sar, generate: no flush to disk before the renames (faster; a "
                     "power cut may then leave files empty)")

    deid = p.add_argument_group("deid, deid-audit")
    deid.add_argument("--key", metavar="FILE",
                      help="the secret (16+ bytes) that keys pseudonyms, UIDs and date shifts; "
                           "same key, same output on every host")
    deid.add_argument("--new-key", metavar="FILE",
                      help=f"write a new key ({KEY_BYTES} random bytes, mode 0600) and exit")
    deid.add_argument("--deid-option", action="append", metavar="NAME",
                      help="a PS3.15 option, repeatable: " + ", ".join(DEID_OPTIONS[1:]))
    deid.add_argument("--keep-private", action="append", metavar="CREATOR",
                      help="keep the private blocks of this creator (e.g. 'SIEMENS CSA "
                           "HEADER'); repeatable; every other private element goes")
    deid.add_argument("--allow-burned-in", action="store_true",
                      help="de-identify files whose pixels may show text (the pixels are "
                           "not cleaned)")
    deid.add_argument("--mapping", metavar="FILE",
                      help="write original -> pseudonym rows (PatientID, AccessionNumber, "
                           "StudyInstanceUID) there, mode 0600")

    gen = p.add_argument_group("generate")
    gen.add_argument("--scenario", action="append", metavar="NAME",
                     help="preset to generate, repeatable (see --list-scenarios)")
    gen.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    gen.add_argument("--patients", type=int, metavar="N", help="patients per scenario")
    gen.add_argument("--studies", type=int, metavar="N", help="studies per patient")
    gen.add_argument("--series", type=int, metavar="N", help="series per study")
    gen.add_argument("--instances", type=int, metavar="N", help="instances per series")
    gen.add_argument("--modality", choices=("MG", "CT", "MR"), help="modality of the images")
    gen.add_argument("--size", metavar="ROWSxCOLS", help="image size, e.g. 64x64")
    gen.add_argument("--layout", choices=("tree", "flat"), default="tree",
                     help="tree: OUTPUT/PatientID/Study/Series/SOP (default); flat: OUTPUT/SOP")
    gen.add_argument("--config", metavar="FILE.json", help="power-customize JSON config")

    send = p.add_argument_group("send")
    send.add_argument("--host", "-H", metavar="HOST", help="receiver's host name or address")
    send.add_argument("--port", "-p", type=int, metavar="PORT",
                      help="receiver's port (--ui: the port the wizard listens on)")
    send.add_argument("--ae-title", "-a", default="ANY-SCP", metavar="AET",
                      help="called AE title (default ANY-SCP)")
    send.add_argument("--calling-ae", "-c", default="DICOM_SAR", metavar="AET",
                      help="our AE title (default DICOM_SAR)")
    send.add_argument("--retries", type=int, default=3,
                      help="reopen an association this often after transient faults (default 3)")
    send.add_argument("--verify", action="store_true",
                      help="C-FIND each sent study afterwards and compare instance counts")
    send.add_argument("--acse-timeout", type=float, default=30, metavar="S",
                      help="association negotiation timeout (default 30 s)")
    send.add_argument("--dimse-timeout", type=float, default=60, metavar="S",
                      help="timeout for each C-STORE response, and for a whole C-FIND "
                           "query (default 60 s)")
    send.add_argument("--network-timeout", type=float, default=60, metavar="S",
                      help="timeout for a silent connection (default 60 s)")
    send.add_argument("--max-pdu", type=int, default=0, metavar="BYTES",
                      help="largest PDU we receive, 0 = no limit (default)")
    send.add_argument("--settle-timeout", type=float, default=60, metavar="S",
                      help="--ingest-test: wait this long at most for the PACS to settle "
                           "(default 60 s)")
    send.add_argument("--tls", action="store_true",
                      help="DICOM TLS (TLS 1.2+, the system's trust store, host name checked)")
    send.add_argument("--tls-ca", metavar="FILE",
                      help="trust this CA (PEM) instead of the system's (implies --tls)")
    send.add_argument("--tls-cert", metavar="FILE",
                      help="our client certificate (PEM), with --tls-key (implies --tls)")
    send.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    send.add_argument("--tls-no-verify", action="store_true",
                      help="TLS without checking the receiver's certificate: test setups only")

    web = p.add_argument_group("DICOMweb destination (instead of -H/-p/-a), for send, echo, "
                               "check-ingest, ingest-test")
    web.add_argument("--url", metavar="URL",
                     help="the DICOMweb service root: STOW-RS sends, QIDO-RS checks, e.g. "
                          "http://127.0.0.1:8042/dicom-web; https:// takes the --tls-* options")
    web.add_argument("--token-file", metavar="FILE",
                     help="a bearer token, read again for each request (a refreshed token is "
                          "picked up)")
    web.add_argument("--user", metavar="NAME",
                     help=f"HTTP Basic user; the password comes from ${PASSWORD_VARIABLE}")
    web.add_argument("--allow-plain-http", action="store_true",
                     help="allow http:// to a host other than loopback (patient data "
                          "unencrypted)")
    return p


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything a run needs, validated once; workers only read it."""

    mode: str
    paths: tuple[Path, ...]
    specs: tuple[TagSpec, ...]
    glob: str | None
    workers: int
    time_limit: float
    follow_symlinks: bool
    log_dir: Path
    summary_json: Path | None
    progress: bool
    verbose: bool
    quiet: bool
    dry_run: bool
    fmt: str = "text"
    with_filename: bool = False
    count: bool = False
    pattern: re.Pattern[str] | None = None
    replacement: str = ""
    deep: bool = False
    all_strings: bool = False
    inplace: bool = False
    output: Path | None = None
    backup: Path | None = None
    copy_unmodified: bool = False
    fsync: bool = True
    generate: GenerateRequest | None = None
    manifest: Path | None = None  # --check-ingest
    files_from: str | None = None  # a path, or "-" for stdin
    null: bool = False
    shard: tuple[int, int] | None = None  # (I, N), 1 <= I <= N
    merge: tuple[str, ...] = ()  # --merge-summaries
    ui_port: int = 0  # --ui: 0 for a free port
    send: Destination | None = None  # --send, --echo, --check-ingest, --ingest-test
    deid: DeidOptions | None = None  # --deid, --deid-audit
    resume: bool = False
    restart: bool = False
    journal: JournalView | None = None  # a journalled SAR run's key, and what its
    # interrupted predecessor completed (the journal itself belongs to run_mode)
    fast: bool = False  # plain public --tag (text dump, or SAR): the raw scanner may read


class DicomSarError(Exception):
    """The base of every error this tool raises on purpose: the fault of a file, a peer or
    the command line, each reported in one line (anything else is a bug of ours)."""


class UsageError(DicomSarError):
    """A problem with the command line; reported before any file is touched (exit 2)."""


def options_from_args(ns: argparse.Namespace, parser: argparse.ArgumentParser | None = None
                      ) -> Options:
    """Validate the command line parser parsed into Options; raise UsageError with advice."""
    mode = next((m for m in RUN_MODES if getattr(ns, m)), None)
    if mode is None:
        raise UsageError("choose a mode: " + ", ".join(FLAG_OF[m] for m in RUN_MODES)
                         + " (see --help)")
    parser = parser or build_parser()
    refuse_foreign_options(parser, ns, mode)
    specs = tuple(s for text in (ns.tag or ()) for s in parse_tag_specs(text))
    workers = ns.workers if ns.workers is not None else default_workers()
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, not {workers}")
    if not 0 <= ns.time_limit < 1e9:
        raise UsageError(f"--time-limit must be 0 (none) or a number of seconds, "
                         f"not {ns.time_limit:g}")
    # --files-from without --path takes the listed paths as they are (find /mnt/archive ...)
    paths = tuple(Path(p) for p in (ns.path or ([] if ns.files_from else ["."])))
    if ns.files_from and not paths and (mode == "sar" or (mode == "deid" and ns.inplace)):
        raise UsageError(f"{FLAG_OF[mode]} with --files-from needs --path: the tree the listed "
                         "files are in, whose layout the output and the backup mirror (e.g. "
                         "--path ~/archive)")
    for path in paths:
        if not path.exists() and not path.is_symlink() and mode in WALKING:
            raise UsageError(f"--path {path}: no such file or directory")
    shard = parse_shard(ns.shard) if ns.shard else None
    if ns.files_from and ns.files_from != "-" and not Path(ns.files_from).is_file():
        raise UsageError(f"--files-from {ns.files_from}: no such file")
    if ns.null and not ns.files_from:
        raise UsageError("-0/--null goes with --files-from")
    summary_json = Path(ns.summary_json) if ns.summary_json else None
    if shard and summary_json is None and mode in WALKING:
        summary_json = Path(ns.log_dir) / f"dicom_sar-summary.{shard_tag(shard)}.json"
    common = dict(
        mode=mode, paths=paths, specs=specs, glob=ns.glob, workers=workers,
        time_limit=ns.time_limit, fsync=not ns.no_fsync,
        follow_symlinks=ns.follow_symlinks, log_dir=Path(ns.log_dir),
        summary_json=summary_json,
        progress=not ns.no_progress and not ns.quiet and sys.stderr.isatty(),
        verbose=ns.verbose, quiet=ns.quiet, dry_run=ns.dry_run, resume=ns.resume,
        restart=ns.restart, files_from=ns.files_from, null=ns.null, shard=shard)
    if mode == "merge_summaries":
        return Options(**common, merge=tuple(ns.merge_summaries))
    if mode == "ui":
        if ns.port is not None and not 0 <= ns.port <= 65535:
            raise UsageError(f"--port {ns.port}: use 1-65535, or 0 for a free port")
        return Options(**common, ui_port=ns.port or 0)
    if mode == "dump":
        return Options(**common, **dump_options(ns, specs))
    if mode == "sar":
        return Options(**common, **sar_options(ns, specs))
    if mode in ("deid", "deid_audit"):
        deid = deid_options(ns, mode)
        if mode == "deid_audit" or deid.new_key is not None:
            return Options(**common, deid=deid)
        return Options(**common, deid=deid, **write_targets(ns, DEFAULT_DEID))
    if mode in ("send", "echo"):
        return Options(**common, send=send_options(ns, parser))
    if mode == "check_ingest":
        manifest = Path(ns.check_ingest)
        if not manifest.is_file():
            raise UsageError(f"--check-ingest {manifest}: no such file (the manifest.json of "
                             "a --generate tree)")
        return Options(**common, send=send_options(ns, parser), manifest=manifest)
    if mode == "ingest_test":
        if not ns.output:
            raise UsageError("--ingest-test needs --output DIR (new or empty: the generated "
                             "tree goes there)")
        return Options(**common, send=send_options(ns, parser), output=Path(ns.output),
                       generate=generate_plan_from_args(ns))
    return Options(**common, output=Path(ns.output) if ns.output else None,
                   generate=generate_plan_from_args(ns))


def parse_shard(text: str) -> tuple[int, int]:
    """'3/8' -> (3, 8)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise UsageError(f"--shard {text!r}: use I/N with 1 <= I <= N, e.g. --shard 3/8")
    return int(m[1]), int(m[2])


def shard_tag(shard: tuple[int, int]) -> str:
    """'shard-3-of-8': in the names of a shard's logs, journal and summary."""
    return f"shard-{shard[0]}-of-{shard[1]}"


def output_holds(output: Path, root: Path) -> bool:
    """Whether the output tree could hold root's originals. It mirrors each file's path below
    its root: with the root inside the output (or a file named alone, and its own directory
    as the output), a written file can land on an original and replace it, unbacked."""
    if root.is_dir():
        return is_within(root, output)
    return os.path.realpath(root.parent) == os.path.realpath(output)


def is_within(path: str | Path, root: str | Path) -> bool:
    """True when path is root or lies below it (after resolving symlinks and '..')."""
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


# ════════════════════════════════════════════════════════════════════════════════════════
# Tag specs: one parser for every mode — lazy hex, keywords, sequence paths, private tags
# ════════════════════════════════════════════════════════════════════════════════════════


_HEX = r"[0-9A-Fa-f]{1,4}"
_END = r"(?=\s*(?:$|,|\.|\[))"
_ELEMENT_FORMS = [
    re.compile(rf'\(\s*(?P<g>{_HEX})\s*,\s*"(?P<c>[^"]*)"\s*,\s*(?P<e>{_HEX})\s*\)'),
    re.compile(rf'(?P<g>{_HEX})\s*,\s*"(?P<c>[^"]*)"\s*,\s*(?P<e>{_HEX}){_END}'),
    re.compile(rf"\(\s*(?P<g>{_HEX})\s*,\s*(?P<e>{_HEX})\s*\)"),
    re.compile(rf"(?P<g8>[0-9A-Fa-f]{{8}}){_END}"),
    re.compile(rf"(?P<g>{_HEX})\s*,\s*(?P<e>{_HEX}){_END}"),
    re.compile(rf"(?P<kw>[A-Za-z][A-Za-z0-9_]*){_END}"),
]
_ITEM = re.compile(r"\[\s*(?P<i>\d+|\*)\s*\]")


@dataclasses.dataclass(frozen=True)
class Step:
    """One element of a tag path; item selects sequence items when a step follows."""

    tag: int  # for a private tag by creator: group << 16 | element offset (0x00-0xFF)
    creator: str | None = None
    item: int | None = None  # None = every item

    def label(self) -> str:
        """DCMTK-style text of this step."""
        g, e = self.tag >> 16, self.tag & 0xFFFF
        return f'({g:04x},"{self.creator}",{e:02x})' if self.creator else f"({g:04x},{e:04x})"


@dataclasses.dataclass(frozen=True)
class TagSpec:
    """A parsed --tag: a path of steps from the top-level dataset down to one element."""

    steps: tuple[Step, ...]
    text: str

    @property
    def leaf(self) -> Step:
        """The element the spec names (the last step)."""
        return self.steps[-1]

    @property
    def plain(self) -> bool:
        """A single public or private tag with no sequence path."""
        return len(self.steps) == 1

    def dictionary_vr(self) -> str | None:
        """The VR pydicom's dictionary gives the leaf, when it is a public tag."""
        entry = dictionary_entry(self.leaf.tag) if self.leaf.creator is None else None
        if entry is None:
            return None
        vr = entry[0]
        return vr if vr in STRING_VRS or " or " not in vr else None

    def label(self) -> str:
        """DCMTK-style path text, e.g. (0008,1110)[0].(0008,1155)."""
        parts = []
        for step in self.steps:
            part = step.label()
            if step is not self.leaf:
                part += "[*]" if step.item is None else f"[{step.item}]"
            parts.append(part)
        return ".".join(parts)


def parse_tag_specs(text: str) -> list[TagSpec]:
    """Parse one --tag argument, which may hold several comma-separated specs."""
    specs, pos, s = [], 0, text.strip()
    if not s:
        raise UsageError("--tag is empty; give e.g. --tag PatientID or --tag 10,20")
    while True:
        start = pos
        steps, pos = _parse_path(s, pos)
        specs.append(TagSpec(tuple(steps), s[start:pos].strip()))
        sep = re.compile(r"\s*,\s*").match(s, pos)
        if pos == len(s):
            return specs
        if not sep:
            raise UsageError(f"--tag {text!r}: cannot read {s[pos:]!r}; "
                             "use forms like 10,20  (0010,0020)  PatientID")
        pos = sep.end()


def _parse_path(s: str, pos: int) -> tuple[list[Step], int]:
    steps: list[Step] = []
    while True:
        step, pos = _parse_element(s, pos)
        item_match = _ITEM.match(s, pos)
        if item_match:
            pos = item_match.end()
            index = item_match["i"]
            step = dataclasses.replace(step, item=None if index == "*" else int(index))
        steps.append(step)
        if s.startswith(".", pos):
            pos += 1
            continue
        if item_match:
            raise UsageError(f"--tag {s!r}: an item index [..] must be followed by .TAG")
        return steps, pos


def _parse_element(s: str, pos: int) -> tuple[Step, int]:
    while pos < len(s) and s[pos].isspace():
        pos += 1
    for form in _ELEMENT_FORMS:
        m = form.match(s, pos)
        if not m:
            continue
        d = m.groupdict()
        if d.get("kw"):
            return Step(tag_for_keyword(d["kw"])), m.end()
        if d.get("g8"):
            return Step(int(d["g8"], 16)), m.end()
        group, elem = int(d["g"], 16), int(d["e"], 16)
        if d.get("c") is not None:
            if group % 2 == 0 or elem > 0xFF:
                raise UsageError(f"--tag {s!r}: a private tag by creator needs an odd group "
                                 "and an element offset 00-ff, e.g. (0029,\"CREATOR\",10)")
            return Step(group << 16 | elem, creator=d["c"]), m.end()
        return Step(group << 16 | elem), m.end()
    raise UsageError(f"--tag {s!r}: cannot read {s[pos:]!r} as a tag; "
                     "use forms like 10,20  (0010,0020)  00100020  PatientID")


def tag_for_keyword(keyword: str) -> int:
    """The tag of a dictionary keyword, or a UsageError with a did-you-mean suggestion."""
    keywords = keyword_tags()
    tag = keywords.get(keyword)
    if tag is not None:
        return tag
    by_lower = {k.lower(): k for k in keywords}
    guess = by_lower.get(keyword.lower()) or next(
        iter(difflib.get_close_matches(keyword, list(keywords), n=1, cutoff=0.75)), None)
    hint = f"did you mean {guess}?" if guess else "check the spelling in the DICOM dictionary"
    raise UsageError(f"--tag {keyword}: unknown keyword; {hint}")


def keyword_of(tag: int, creator: str | None = None) -> str:
    """DCMTK-style name of a tag: the dictionary keyword (RETIRED_ before a retired one), a
    private tag's name from pydicom's private dictionary in DCMTK's CamelCase (given its
    creator), or a generic label."""
    if tag & 0xFFFF == 0 and tag >> 16 != 2:
        return "PrivateGroupLength" if (tag >> 16) % 2 else "GenericGroupLength"
    if (tag >> 16) % 2 == 1:
        if 0x10 <= tag & 0xFFFF <= 0xFF:
            return "PrivateCreator"
        load_pydicom()
        try:
            words = pydicom.datadict.private_dictionary_description(tag, creator or "")
        except KeyError:
            return "Unknown Tag & Data"
        return "".join(w[:1].upper() + w[1:] for w in re.split(r"[^A-Za-z0-9]+", words))
    entry = dictionary_entry(tag)
    if entry is None or not entry[4]:
        return "Unknown Tag & Data"
    return "RETIRED_" + entry[4] if "retired" in entry[3].lower() else entry[4]


def creator_of(ds: Dataset, tag: int) -> str | None:
    """The private creator of a private element of ds (None for a public one)."""
    if not (tag >> 16) % 2 or tag & 0xFFFF < 0x1000:
        return None
    raw = ds.get_item((tag & 0xFFFF0000) | (tag >> 8 & 0xFF))
    value = getattr(raw, "value", None)
    if isinstance(value, bytes):
        return value.rstrip(b"\x00 ").decode("latin-1")
    return str(value).strip() if value is not None else None


def resolve_step(ds: Dataset, step: Step) -> int | None:
    """The concrete tag a step names in ds (private blocks looked up by creator)."""
    if step.creator is None:
        return step.tag
    try:
        return int(ds.private_block(step.tag >> 16, step.creator).get_tag(step.tag & 0xFF))
    except KeyError:
        return None


# ════════════════════════════════════════════════════════════════════════════════════════
# Discovery: a lazy, sorted walk; files are recognised later by content, not by name
# ════════════════════════════════════════════════════════════════════════════════════════


class Problem(NamedTuple):
    """Why the walk hands a path over without a task: an error (counted, exit 1) or a skip."""

    status: Status  # ERROR or SKIPPED
    message: str

    @classmethod
    def skip(cls, message: str) -> Problem:
        """A path the walk passes over (a symlink, a FIFO, a leftover temporary file)."""
        return cls(Status.SKIPPED, message)

    @classmethod
    def error(cls, message: str) -> Problem:
        """A path the walk cannot use although the user named it (an OSError, outside)."""
        return cls(Status.ERROR, message)


class Candidate(NamedTuple):
    """A path found by the walk, the --path root it came from, or why it cannot be used.
    (A tuple: the walk makes one per file, and a frozen dataclass costs more to build.)"""

    path: Path
    root: Path
    problem: Problem | None = None
    found_as: str = ""  # the path as the walk's scandir gave it, when it did

    @property
    def file(self) -> str | Path:
        """What to open. The walk's own string when there is one: a Path handed to the OS
        parses itself first, a cost a tag dump would pay on every file."""
        return self.found_as or self.path


def discover(opts: Options, excluded: Iterable[Path]) -> Iterator[Candidate]:
    """Yield candidates in deterministic order (sorted names per directory, or the order of
    --files-from), lazily; with --shard only this shard's."""
    excluded = list(excluded)
    found = listed(opts, excluded) if opts.files_from else walked(opts, excluded)
    if opts.shard is None:
        yield from found
        return
    index, count = opts.shard
    for cand in found:
        if shard_of(cand, count, as_listed=not opts.paths) == index:
            yield cand


def shard_of(cand: Candidate, count: int, *, as_listed: bool = False) -> int:
    """Which of count shards a file belongs to: a stable hash of its path below its --path
    root (of the path as --files-from lists it, without --path), the same whatever the
    host, its mount point or the order of the walk."""
    rel = str(cand.path) if as_listed else cand.path.name if cand.root == cand.path else \
        os.path.relpath(cand.path, cand.root)
    digest = hashlib.blake2b(os.fsencode(rel), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count + 1


def listed(opts: Options, excluded: list[Path]) -> Iterator[Candidate]:
    """The files --files-from names (relative to the current directory): as they are
    without --path, else each below one of the --path roots; with the walk's rules: content
    decides, our own files and temporary files are not input, FIFOs and devices are
    skipped, directories ignored. A first name outside every root is a usage error."""
    roots = [(root, os.path.abspath(root)) for root in opts.paths]
    for i, name in enumerate(listed_names(opts)):
        path = Path(name)
        absolute = os.path.abspath(path)
        root = next((r for r, a in roots if absolute == a or absolute.startswith(
            a.rstrip(os.sep) + os.sep)), None) if roots else path
        if root is None:
            where = " ".join(f"--path {r}" for r, _ in roots)
            if i == 0:  # the list and the roots do not go together: say so once
                raise UsageError(f"--files-from lists {name}, which is not below {where}: "
                                 "name the tree the list is in, or leave --path out to take "
                                 "the listed paths as they are")
            yield Candidate(path, path, Problem.error(f"not below {where}"))
            continue
        if path.name.startswith(TEMP_PREFIX):
            yield Candidate(path, root, Problem.skip("leftover temporary file of an earlier run"))
        elif path.is_dir() or any(is_within(path, place) for place in excluded):
            continue
        else:
            yield from _file_candidate(path, root, opts, explicit=False)


def listed_names(opts: Options) -> Iterator[str]:
    """The names in --files-from, one per line or NUL-separated, read as they come."""
    stream = sys.stdin.buffer if opts.files_from == "-" else \
        open(opts.files_from, "rb")  # noqa: SIM115 (closed below, unless it is stdin)
    try:
        if not opts.null:
            for line in stream:
                if line.rstrip(b"\r\n"):
                    yield os.fsdecode(line.rstrip(b"\r\n"))
            return
        pending = b""
        while chunk := stream.read(1 << 16):
            *names, pending = (pending + chunk).split(b"\0")
            yield from (os.fsdecode(n) for n in names if n)
        if pending:
            yield os.fsdecode(pending)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def walked(opts: Options, excluded: list[Path]) -> Iterator[Candidate]:
    """The --path roots, walked."""
    skip = set()
    for place in excluded:  # compared by (device, inode): no realpath() per entry
        with contextlib.suppress(OSError):
            st = os.stat(place)
            skip.add((st.st_dev, st.st_ino))
    for root in opts.paths:
        if root.is_dir() and (opts.follow_symlinks or not root.is_symlink()
                              or root in opts.paths):
            yield from _walk(root, root, opts, skip)
        else:
            yield from _file_candidate(root, root, opts, explicit=True)


def _walk(root: Path, top: Path, opts: Options,
          skip: set[tuple[int, int]]) -> Iterator[Candidate]:
    seen_dirs: set[tuple[int, int]] = set()
    stack: list[tuple[Iterator[os.DirEntry[str]], int]] = []  # entries, device

    def enter(directory: str) -> Iterator[Candidate]:
        # str, not Path: a fresh Path parses itself on first use, and most directories
        # never need one
        try:
            st = os.stat(directory)
            if (st.st_dev, st.st_ino) in seen_dirs:
                yield Candidate(Path(directory), root, Problem.skip("symlink loop"))
                return
            seen_dirs.add((st.st_dev, st.st_ino))
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
            stack.append((iter(entries), st.st_dev))
        except OSError as exc:
            yield Candidate(Path(directory), root,
                            Problem.error(f"{type(exc).__name__}: {exc.strerror}"))

    yield from enter(os.fspath(top))
    while stack:
        entries, device = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith(TEMP_PREFIX):
            yield Candidate(Path(entry.path), root,
                            Problem.skip("leftover temporary file of an earlier run"))
            continue
        try:
            is_link = entry.is_symlink()
            is_dir = entry.is_dir(follow_symlinks=opts.follow_symlinks)
            if is_link and opts.follow_symlinks:
                st = os.stat(entry.path)
                identity = (st.st_dev, st.st_ino)
            else:
                identity = (device, entry.inode())
        except OSError as exc:
            yield Candidate(Path(entry.path), root,
                            Problem.error(f"{type(exc).__name__}: {exc.strerror}"))
            continue
        if identity in skip:
            continue
        if is_dir:
            yield from enter(entry.path)
        elif is_link or opts.glob:
            yield from _file_candidate(Path(entry.path), root, opts, explicit=False,
                                       is_link=is_link)
        elif not entry.is_file(follow_symlinks=False):  # from the directory listing: no stat
            yield Candidate(Path(entry.path), root, Problem.skip(NOT_REGULAR))
        else:
            yield Candidate(Path(entry.path), root, found_as=entry.path)


def _file_candidate(path: Path, root: Path, opts: Options, *, explicit: bool,
                    is_link: bool | None = None) -> Iterator[Candidate]:
    if is_link is None:
        is_link = path.is_symlink()
    if is_link and not opts.follow_symlinks and not explicit:
        yield Candidate(path, root, Problem.skip("symlink (use --follow-symlinks)"))
        return
    if opts.glob and not fnmatch.fnmatch(path.name, opts.glob):
        return
    if special_file(path):  # named on the command line: an error; met in the walk: a skip
        yield Candidate(path, root, (Problem.error if explicit else Problem.skip)(NOT_REGULAR))
    else:
        yield Candidate(path, root)


# Opening a FIFO for reading waits for a writer, forever if none comes; no such file (nor a
# socket or device) is a DICOM file, and `find -type f` would not hand it to dcmdump either.
NOT_REGULAR = "not a regular file (a FIFO, socket or device)"


def special_file(path: Path) -> bool:
    """A FIFO, socket or device (through a symlink too); False for a regular file, and for
    one that cannot be looked at (opening it reports why)."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def sniff_dicom(head: bytes, size: int) -> str | None:
    """'part10' for preamble+DICM, 'bare' for a plausible dataset without preamble, else None."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "part10"
    if len(head) < 8:
        return None
    for order in "<>":
        group, elem = struct.unpack(order + "HH", head[:4])
        if group % 2 or not 0x0002 <= group <= 0x0010 or elem > 0x0100:
            continue
        vr = head[4:6].decode("latin-1")
        if vr in VALID_VRS:
            return "bare"
        (length,) = struct.unpack(order + "I", head[4:8])
        if length < size:
            return "bare"
    return None


def excluded_locations(opts: Options, log_paths: list[Path]) -> list[Path]:
    """Our own output, backup and log files are never input."""
    places = [Path(DEFAULT_OUTPUT), Path(DEFAULT_BACKUP), *log_paths]
    if opts.output is not None:
        places.append(opts.output)
    if opts.backup is not None:
        places.append(opts.backup)
    if opts.summary_json is not None:
        places.append(opts.summary_json)
    roots = opts.paths or (Path(),)  # files listed as they are: from the current directory
    if opts.log_dir.resolve() not in [p.resolve() for p in roots] and not any(
            is_within(p, opts.log_dir) for p in roots):
        places.append(opts.log_dir)
    return places


# ════════════════════════════════════════════════════════════════════════════════════════
# Reading: every file is read to its last byte before anything is done with it — the raw
# scanner first (no pydicom), pydicom's reader for anything unusual — then its elements
# looked up and decoded
# ════════════════════════════════════════════════════════════════════════════════════════


class RawScanError(DicomSarError):
    """The raw scanner met something it leaves to pydicom."""


# what makes a raw-scan caller hand the file to pydicom, which decides and reports; anything
# else the scanner raises is a bug of ours, and fails loudly
RAW_FALLBACK = (RawScanError,)


class RawElement(NamedTuple):
    """An element as the raw scanner read it: pydicom's RawDataElement's fields (raw_header()
    hands them to pydicom as such), without importing pydicom."""

    tag: int
    VR: str
    length: int
    value: bytes
    value_tell: int
    is_implicit_VR: bool  # noqa: N815 (pydicom's field name)
    is_little_endian: bool


def tag_label(tag: int) -> str:
    """(GGGG,EEEE), as pydicom's BaseTag prints a tag."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def element_label(tag: int, name: str | None = None) -> str:
    """(gggg,eeee) Keyword, as dcmdump names an element (and our logs and errors do)."""
    return f"({tag >> 16:04x},{tag & 0xFFFF:04x}) {name or keyword_of(tag)}"


PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # where stop_before_pixels stops
SHORT_VRS = table(vr for vr in VALID_VRS if vr not in LONG_LENGTH_VRS)  # 2-byte lengths
EXPLICIT_LE_HEADER = struct.Struct("<HHHH")  # group, element, VR as a number, 16-bit length


def vr_code_table(vrs: Iterable[str]) -> bytes:
    """A byte per possible two-letter VR code, 1 for those in vrs: indexing bytes is the
    cheapest membership test there is, and takes no lock on 3.13t."""
    codes = bytearray(1 << 16)
    for vr in vrs:
        if len(vr) == 2:
            codes[int.from_bytes(vr.encode("latin-1"), "little")] = 1
    return bytes(codes)


SHORT_VR_CODES = vr_code_table(SHORT_VRS)
DELIMITERS = (0xFFFEE00D, 0xFFFEE0DD)  # item and sequence delimitation items


def fast_specs_ok(specs: Iterable[TagSpec]) -> bool:
    """The raw scanner handles plain public tags with one non-sequence dictionary VR."""
    for spec in specs:
        vr = spec.dictionary_vr() if spec.plain else None
        if vr is None or vr == "SQ" or " or " in vr:
            return False
    return True


def implicit_vr(tag: int, length: int) -> str:
    """The VR of an implicit-VR element, from the dictionary."""
    entry = dictionary_entry(tag) if (tag >> 16) % 2 == 0 else None
    vr = entry[0] if entry is not None else "UN"
    return "SQ" if length == 0xFFFFFFFF and tag != 0x7FE00010 else vr


def guessed_encoding(head: bytes) -> tuple[bool, bool]:
    """(implicit VR?, little endian?) of a dataset without a transfer syntax, from its first
    element: a VR after the tag means explicit; a small even group reads right one way."""
    implicit = head[4:6].decode("latin-1") not in VALID_VRS
    little = len(head) < 2 or not (head[0] == 0 and head[1] != 0)
    return implicit, little


class RawScan:
    """Scan one file's encoded elements, collecting the wanted ones at every depth.

    Every scan is also the check that the whole file can be read (see unreadable()): it
    walks every sequence and item, and on past the pixel data (its fragments too) to the end
    of the file, reading what lies beyond data from fd where it must.
    """

    def __init__(self, data: bytes, size: int, wanted: dict[int, None],
                 keep_top: dict[int, None] | None = None, fd: int = -1, record: bool = False):
        self.data, self.size, self.wanted, self.fd = data, size, wanted, fd
        # record: every byte range a decision of the scan read, for a Shape (8-byte element
        # headers by position alone); None when not recording, or when a Shape cannot say it
        self.heads: list[int] | None = [] if record else None
        self.spans: list[tuple[int, int]] = []
        self.hits: list[tuple[int, RawElement, str, list[str]]] = []
        self.top_level = 0  # dataset elements seen at the top: none means a broken file
        self.odd = 0  # the first element of odd length (PS3.5 wants even ones), if any
        self.keep_top = keep_top or {}  # top-level tags kept with their file offsets
        self.top: dict[int, RawElement] = {}
        self.meta: list[RawElement] = []  # with keep_top: the file meta, with offsets
        self.kind, self.implicit, self.little = "", False, True
        tags = [t for t in (*self.wanted, *self.keep_top) if t != 0x00080005]
        self.interesting = (min(tags), max(tags)) if tags else (1, 0)  # tags element() needs
        lo, hi = self.interesting  # their groups, and 0008 for the charset
        self.interesting_groups = (min(lo >> 16, 0x0008), max(hi >> 16, 0x0008))

    def run(self, kind: str) -> None:
        """Scan the file meta (Part 10) and the dataset up to the pixel data."""
        self.kind = kind
        pos, implicit, little = 0, False, True
        if kind == "part10":
            pos, syntax = self.scan_meta(132)
            if syntax in (None, DEFLATED):
                self.heads = None
            if syntax == DEFLATED:
                if self.keep_top:  # their offsets would be the inflated data's
                    raise RawScanError("deflated")
                self.inflate(pos)
            if syntax is None:  # the encoding the dataset itself shows, as DCMTK reads it
                if self.keep_top:
                    raise RawScanError("no transfer syntax in the file meta")
                implicit, little = guessed_encoding(self.data[pos:pos + 8])
            else:
                implicit, little = syntax == IMPLICIT_LE, syntax != EXPLICIT_BE
        else:
            implicit, little = guessed_encoding(self.data[:8])
            self.heads = None
        self.implicit, self.little = implicit, little
        end = self.scan(pos, len(self.data), implicit, little, 0, ["iso8859"])
        if end >= len(self.data) < self.size:
            raise RawScanError("the header goes on past the data read")
        if not self.top_level:
            raise RawScanError("no data elements after the file meta")
        if end < self.size:
            self.past_pixels(end, implicit, little)

    def inflate(self, pos: int) -> None:
        """A deflated file: the dataset after the file meta, inflated."""
        import zlib

        rest = read_rest(self.fd, self.size - len(self.data)) if self.fd >= 0 else b""
        try:
            body = b"".join(inflated([self.data[pos:], rest], self.size))
        except DeflateBombError as exc:
            raise RawScanError(str(exc)) from None
        except zlib.error as exc:  # not a deflate stream
            raise RawScanError(f"the deflated dataset does not inflate: {exc}") from None
        self.data = self.data[:pos] + body
        self.size, self.fd = len(self.data), -1

    def read_at(self, pos: int, count: int) -> bytes:
        """count bytes at pos, from data or beyond it from the file."""
        if pos + count <= len(self.data) or self.fd < 0:
            return self.data[pos:pos + count]
        self.heads = None
        return os.pread(self.fd, count, pos)

    def past_pixels(self, pos: int, implicit: bool, little: bool) -> None:
        """The pixel data element and what follows it must run to the end of the file."""
        order = "<" if little else ">"
        head = self.read_at(pos, 12)  # as header() read it: its bytes are recorded
        if len(head) < 8:
            raise RawScanError("the file ends inside the pixel data's element header")
        group, elem = struct.unpack(order + "HH", head[:4])
        tag = group << 16 | elem
        if implicit:
            (length,), vpos = struct.unpack(order + "I", head[4:8]), pos + 8
        elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"):
            if len(head) < 12:
                raise RawScanError("the file ends inside the pixel data's element header")
            (length,), vpos = struct.unpack(order + "I", head[8:12]), pos + 12
        else:
            (length,), vpos = struct.unpack(order + "H", head[6:8]), pos + 8
        name = keyword_of(tag) or tag_label(tag)
        if length != 0xFFFFFFFF:
            if length & 1 and not self.odd:
                self.odd = tag
            end = vpos + length
            if end > self.size:
                raise RawScanError(f"{name} declares {length} bytes, the file ends after "
                                   f"{self.size - vpos}")
        else:
            self.heads = None
            end = self.fragments(vpos, order, name)
        if end < self.size:  # trailing elements (padding, signatures): they must parse too
            if self.size - end > 1 << 24:
                raise RawScanError(f"{self.size - end} bytes after {name} that no element holds")
            tail = RawScan(self.read_at(end, self.size - end), self.size - end, {})
            self.heads = None
            if tail.scan(0, tail.size, implicit, little, 1, ["iso8859"]) != tail.size:
                raise RawScanError(f"a delimiter after {name} outside any sequence")
            self.odd = self.odd or tail.odd

    def fragments(self, pos: int, order: str, name: str) -> int:
        """The items of encapsulated pixel data up to its sequence delimiter."""
        while True:
            head = self.read_at(pos, 8)
            if len(head) < 8:
                raise RawScanError(f"{name}: the file ends before its sequence delimiter")
            group, elem, length = struct.unpack(order + "HHI", head)
            tag = group << 16 | elem
            if tag == 0xFFFEE0DD:
                return pos + 8
            if tag != 0xFFFEE000 or length == 0xFFFFFFFF:
                raise RawScanError(f"{name}: no fragment item where one belongs")
            pos += 8 + length
            if pos > self.size:
                raise RawScanError(f"{name}: a fragment declares {length} bytes, past the end "
                                   "of the file")

    def scan_meta(self, pos: int) -> tuple[int, str | None]:
        syntax, data, wanted, keep = None, self.data, self.wanted, bool(self.keep_top)
        while pos + 8 <= len(data):
            # the file meta is explicit VR little endian, but what follows it may not be
            group, elem, vr_code, length = EXPLICIT_LE_HEADER.unpack_from(data, pos)
            if self.heads is not None:
                self.spans.append((pos, 8))
            if group != 0x0002:
                break
            if SHORT_VR_CODES[vr_code]:
                vpos, vr = pos + 8, data[pos + 4:pos + 6].decode("latin-1")
            else:
                _, vpos, length, vr = self.header(pos, False, True)
            tag = 0x0002 << 16 | elem
            if tag == 0x00020010 or keep or tag in wanted:  # values only where someone looks
                value = self.value(vpos, length)
                if tag == 0x00020010:
                    if self.heads is not None:
                        self.spans.append((vpos, length))
                    syntax = value.rstrip(b"\x00 ").decode("ascii", "replace")
                if keep:
                    self.meta.append(RawElement(tag, vr, length, value, vpos, False, True))
                if tag in wanted:
                    self.collect(tag, vr, vpos, length, value, True, ["iso8859"])
            pos = vpos + length
        return pos, syntax

    def header(self, pos: int, implicit: bool, little: bool) -> tuple[int, int, int, str]:
        """(tag, value position, length, VR) of the element at pos."""
        data = self.data
        if pos + 8 > len(data):
            raise RawScanError(f"the data ends inside an element header at byte {pos}")
        group, elem, length = struct.unpack_from("<HHI" if little else ">HHI", data, pos)
        tag = group << 16 | elem
        if self.heads is not None:
            self.spans.append((pos, 12 if pos + 12 <= len(data) else 8))
        if implicit or group == 0xFFFE:
            vr = implicit_vr(tag, length) if group != 0xFFFE else "na"
            return tag, pos + 8, length, vr
        vr = data[pos + 4:pos + 6].decode("latin-1")
        if vr in LONG_LENGTH_VRS:
            if pos + 12 > len(data):
                raise RawScanError(f"the data ends inside an element header at byte {pos}")
            (length,) = struct.unpack_from("<I" if little else ">I", data, pos + 8)
            return tag, pos + 12, length, vr
        # an unknown VR: nothing could use the element's value; a check alone (no wanted
        # tags) steps over it, assuming a 2-byte length as DCMTK does
        if vr not in VALID_VRS and (self.wanted or self.keep_top):
            raise RawScanError(f"unknown VR {vr!r}")
        return tag, pos + 8, length >> 16 if little else length & 0xFFFF, vr

    def value(self, vpos: int, length: int) -> bytes:
        if vpos + length > len(self.data):
            raise RawScanError("value past the data read")
        return self.data[vpos:vpos + length]

    def collect(self, tag: int, vr: str, vpos: int, length: int, value: bytes, little: bool,
                encodings: list[str]) -> None:
        raw = RawElement(tag, vr, length, value, vpos, False, little)
        self.hits.append((tag, raw, vr, encodings))

    def scan(self, pos: int, end: int, implicit: bool, little: bool, level: int,
             encodings: list[str]) -> int:
        """Scan elements from pos to end (or to an item delimiter); return where it stopped."""
        data, size, start, top = self.data, len(self.data), pos, level == 0
        # Globals bound to locals: on 3.13t every global load touches a shared refcount,
        # which two workers scanning at once would fight over on every element.
        unpack, short_vrs, delimiters = EXPLICIT_LE_HEADER.unpack_from, SHORT_VR_CODES, DELIMITERS
        heads = self.heads
        (lo, hi), (glo, ghi) = self.interesting, self.interesting_groups
        inline_end = size - 7 if not implicit and little else 0
        while pos < end:
            if pos < inline_end:
                # The common element, inline: explicit VR little endian, a short VR, below the
                # pixel data group, so never a delimiter, sequence or pixel data. Integer
                # compares skip it unless its group may matter (3.13t does not specialise
                # bytecode, so every instruction here costs on each of ~100 elements a file).
                group, elem, vr_code, length = unpack(data, pos)
                if group < 0x7FE0 and short_vrs[vr_code]:
                    if heads is not None:
                        heads.append(pos)
                    vpos = pos + 8
                    pos = vpos + length
                    if length & 1 and not self.odd:
                        self.odd = group << 16 | elem
                    if glo <= group <= ghi:
                        tag = group << 16 | elem
                        if lo <= tag <= hi or tag == 0x00080005:
                            if pos > size:
                                raise self.overrun(tag, vpos, length)
                            vr = data[vpos - 4:vpos - 2].decode("latin-1")
                            encodings = self.element(tag, vr, vpos, length, level, encodings)
                    continue
            tag, vpos, length, vr = self.header(pos, implicit, little)
            if length & 1 and length != 0xFFFFFFFF and not self.odd:
                self.odd = tag
            if tag == 0xFFFEE000 or (top and tag in delimiters):
                raise RawScanError(f"an item or delimiter {tag_label(tag)} outside any sequence")
            if tag in delimiters:
                if tag != 0xFFFEE00D:  # an item ends with its own delimiter, as DCMTK insists
                    raise RawScanError("a sequence delimiter where an item delimiter belongs")
                self.top_level += top and pos > start  # elements before the delimiter
                return vpos
            if top and tag in PIXEL_TAGS:
                self.top_level += 1
                if length != 0xFFFFFFFF and vpos + length > self.size:
                    raise RawScanError("pixel data past the end of the file")
                return pos  # a tag dump stops before the pixel data
            if tag == 0x7FE00010 and length == 0xFFFFFFFF:  # encapsulated, in an item (an
                self.heads = None  # icon): fragments, whose lengths a Shape cannot record
                pos = self.fragments(vpos, "<" if little else ">", "PixelData")
                continue
            if vr == "SQ" or length == 0xFFFFFFFF:
                # an undefined-length UN holds implicit VR little endian items (CP-246)
                un = vr == "UN"
                pos = self.sequence(vpos, length, implicit or un, little or un, level,
                                    encodings)
                continue
            pos = vpos + length
            if pos > size:
                raise self.overrun(tag, vpos, length)
            encodings = self.element(tag, vr, vpos, length, level, encodings)
        if pos > size:
            raise RawScanError(f"an element ends {pos - size} bytes past the data read")
        self.top_level += top and pos > start
        return pos

    def overrun(self, tag: int, vpos: int, length: int) -> RawScanError:
        """An element whose value runs past the data (the file's end, in a whole read)."""
        return RawScanError(f"element {tag_label(tag)} declares {length} bytes, the data ends "
                            f"after {len(self.data) - vpos}")

    def element(self, tag: int, vr: str, vpos: int, length: int, level: int,
                encodings: list[str]) -> list[str]:
        """Collect an element if wanted; return the encodings in force after it."""
        if tag == 0x00080005:
            if self.heads is not None:
                self.spans.append((vpos, length))
            try:
                encodings = python_encodings(
                    [v.strip() for v in self.value(vpos, length).decode(
                        "ascii", "replace").split("\\")])
            except (LookupError, ValueError):  # garbage, not a character set: pydicom decides
                raise RawScanError("an unknown SpecificCharacterSet") from None
        if tag in self.wanted:
            self.collect(tag, vr, vpos, length, self.value(vpos, length), self.little, encodings)
        if level == 0 and tag in self.keep_top:
            self.top[tag] = RawElement(tag, vr, length, self.value(vpos, length), vpos,
                                       self.implicit, self.little)
        return encodings

    def sequence(self, pos: int, length: int, implicit: bool, little: bool, level: int,
                 encodings: list[str]) -> int:
        end = pos + length if length != 0xFFFFFFFF else 1 << 62
        while pos < end:
            tag, vpos, item_length, _ = self.header(pos, implicit, little)
            if tag == 0xFFFEE0DD:
                if length != 0xFFFFFFFF:
                    raise RawScanError("a sequence delimiter in a defined-length sequence")
                return vpos
            if tag != 0xFFFEE000:
                raise RawScanError("no item where an item belongs")
            if item_length == 0xFFFFFFFF:
                pos = self.scan(vpos, 1 << 62, implicit, little, level + 1, encodings)
            else:
                # an item claiming more than the file holds is read to its end, as DCMTK
                # and pydicom read it (the last item of a DICOMDIR that a writer cut short)
                pos = vpos + item_length if end < len(self.data) else \
                    min(vpos + item_length, end)
                if self.scan(vpos, pos, implicit, little, level + 1, encodings) != pos:
                    raise RawScanError("item length does not add up")
        if pos != end and length != 0xFFFFFFFF:
            raise RawScanError("sequence length does not add up")
        return pos


def read_rest(fd: int, count: int) -> bytes:
    """Up to count more bytes from fd (os.read may return less than asked)."""
    chunks = []
    while count > 0 and (chunk := os.read(fd, min(count, 1 << 24))):
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


class Scanned(NamedTuple):
    """What a whole-file raw scan found (RawScan's findings, or a Shape's for a file like)."""

    kind: str
    implicit: bool
    little: bool
    odd: int
    hits: list[tuple[int, RawElement, str, list[str]]]
    top: dict[int, RawElement]
    meta: list[RawElement]

    @classmethod
    def of(cls, scan: RawScan) -> Scanned:
        return cls(scan.kind, scan.implicit, scan.little, scan.odd, scan.hits, scan.top,
                   scan.meta)


class Shape:
    """Where a scanned file's element headers lie, and what the scan made of them.

    The scan's every decision comes from the bytes it recorded (element headers, the
    transfer syntax, character sets) and the file's size. Another file of that size with
    the same bytes there would scan the same way, element for element: only the values it
    collects differ, and they are sliced from where they lie. Files of one series often
    share their shape.
    """

    def __init__(self, scan: RawScan):
        slices = [slice(p, p + 8) for p in scan.heads or ()]
        slices += [slice(p, p + n) for p, n in scan.spans]
        self.bytes_read = operator.itemgetter(*slices)
        self.expected = b"".join(self.bytes_read(scan.data))
        self.found = Scanned.of(scan)
        self.hits, self.misses = 0, 0

    def fits(self, data: bytes) -> bool:
        """Whether data (a file of the recorded size) holds the same bytes where they matter."""
        return b"".join(self.bytes_read(data)) == self.expected

    def scanned(self, data: bytes) -> Scanned:
        """The scan of data: the recorded findings, the values sliced from data."""
        f = self.found
        return f._replace(
            hits=[(tag, valued(raw, data), vr, enc) for tag, raw, vr, enc in f.hits],
            top={tag: valued(raw, data) for tag, raw in f.top.items()},
            meta=[valued(raw, data) for raw in f.meta])


def valued(raw: RawElement, data: bytes) -> RawElement:
    """raw with its value taken from data, at its position."""
    at = raw.value_tell
    return RawElement(raw.tag, raw.VR, raw.length, data[at:at + raw.length], at,
                      raw.is_implicit_VR, raw.is_little_endian)


_worker_shapes = threading.local()  # each thread's own shapes: no thread sees another's
SHAPES_KEPT = 4096  # per thread and request; past it, they are forgotten and learnt anew


def shapes(request: tuple[tuple[int, ...], tuple[int, ...]]) -> dict[tuple[int, int, str], Any]:
    """This thread's shapes for one request (its wanted and kept tags), by (size, bytes
    read, kind): a Shape, None for a size seen once, False where shapes kept missing."""
    by_request = getattr(_worker_shapes, "by_request", None)
    if by_request is None:
        by_request = _worker_shapes.by_request = {}
    known = by_request.get(request)
    if known is None or len(known) > SHAPES_KEPT:
        known = by_request[request] = {}
    return known


def raw_scan(path: str | Path, wanted: dict[int, None], keep_top: dict[int, None] | None = None
             ) -> tuple[Scanned | None, int]:
    """Scan a file raw, the whole of it (see RawScan): (findings, size), None for a file that
    is not DICOM. A file shaped like one this thread scanned before takes its Shape.

    Raises RawScanError when the file should go the pydicom way, or cannot be read to its end.
    """
    # the same descriptor as read_fd(), opened inline: the context manager is a cost on
    # every file of a tag dump
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, HEADER_CHUNK)
        kind = sniff_dicom(data[:132], size)
        if kind is None:
            return None, size
        known = shapes(((*wanted,), (*(keep_top or ()),)))
        key = (size, len(data), kind)
        shape = known.get(key)
        if shape:
            if shape.fits(data):
                shape.hits += 1
                return shape.scanned(data), size
            shape.misses += 1
        scan = RawScan(data, size, wanted, keep_top, fd, record=shape is not False and key in known)
        try:
            scan.run(kind)
        except RawScanError:
            if len(data) >= size:
                raise
            data += read_rest(fd, size - len(data))  # a long header: read it all, once more
            scan = RawScan(data, size, wanted, keep_top, fd)
            scan.run(kind)
    except RecursionError:  # sequences nested thousands deep: pydicom decides
        raise RawScanError("sequences nested too deeply") from None
    finally:
        os.close(fd)
    learn_shape(known, key, shape, scan)
    return Scanned.of(scan), size


def learn_shape(known: dict[tuple[int, int, str], Any], key: tuple[int, int, str],
                shape: Shape | bool | None, scan: RawScan) -> None:
    """Keep what scan teaches about files of its key: its Shape, when it recorded one, or
    that shapes of this key keep missing (more often than they fit, past a few)."""
    if shape and shape.misses > max(4, shape.hits):
        known[key] = False
    elif scan.heads is not None and len(scan.heads) + len(scan.spans) >= 2:
        known[key] = Shape(scan)
        if shape:  # a new shape for the key: the tally goes on
            known[key].hits, known[key].misses = shape.hits, shape.misses
    elif key not in known:
        known[key] = None


def checked_whole(path: str | Path) -> int:
    """Check that a file reads to its end (every element, item and sequence, the pixel
    data's fragments and whatever follows them whole and where their lengths say): the
    first element of odd length (0 for none); raises UnreadableFileError."""
    try:
        scan, _ = raw_scan(path, {})
    except RawScanError as exc:
        raise UnreadableFileError(str(exc)) from None
    return scan.odd if scan is not None else 0


def unreadable(path: str | Path) -> str | None:
    """Why a DICOM file cannot be read to its end, or None when it can (see checked_whole).
    SAR writes, and send sends, only files that pass."""
    try:
        checked_whole(path)
    except UnreadableFileError as exc:
        return str(exc)
    return None


class UnreadableFileError(DicomSarError):
    """A DICOM file that cannot be read to its end (see unreadable())."""


HEADER_CHUNK = 1 << 16  # one read holds almost every header; parsing it costs no syscalls


def read_dataset(path: str | Path, *, header_only: bool) -> tuple[Dataset | None, int, str | None]:
    """Read a file if its content says DICOM: (dataset or None, size, kind)."""
    with buffered_reader(path) as fp:
        size = os.fstat(fp.fileno()).st_size
        head = fp.read(HEADER_CHUNK if header_only else 4096 + 132)
        kind = sniff_dicom(head[:132], size)
        if kind is None:
            return None, size, None
        if kind == "part10" and DEFLATED_UID in head[:4096 + 132]:
            check_inflated_size(fp, size)
        elif header_only:
            ds = header_in_memory(head, size)
            if ds is not None:
                return ds, size, kind
        fp.seek(0)
        ds = pydicom.dcmread(fp, force=True, stop_before_pixels=header_only)
        check_complete(ds, fp, size)
    return ds, size, kind


@contextlib.contextmanager
def read_fd(path: Path) -> Iterator[int]:
    """A read-only file descriptor of path, closed afterwards (why not a file: buffered_reader)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def buffered_reader(path: str | Path) -> Iterator[io.BufferedReader]:
    """A buffered reader of path, closed through its raw file.

    On 3.13t, closing (or detaching) a buffered file enters a nested critical section that
    spins on sched_yield before it gets its own lock, longer while other threads want the
    CPU. A buffered file whose raw file is closed is left alone.
    """
    with open(path, "rb", buffering=0) as raw:
        yield io.BufferedReader(raw)


def header_in_memory(head: bytes, size: int) -> Dataset | None:
    """Parse the header from the first chunk; None if it may go on past the chunk."""
    mem = DicomBytesIO(head)
    try:
        ds = pydicom.dcmread(mem, force=True, stop_before_pixels=True)
    except Exception:
        if len(head) < size:
            return None  # perhaps only the chunk ends here: the file decides
        raise
    if len(head) < size and mem.tell() + 12 > len(head):
        return None  # the header (or the pixel data's element header) is not all here
    check_complete(ds, mem, size)
    return ds


DEFLATED_UID = DEFLATED.encode()
MAX_INFLATED = 1 << 30  # a deflated dataset may not inflate beyond 1 GiB


def check_inflated_size(fp: Any, size: int) -> None:
    """Refuse a deflate bomb before pydicom inflates it all into memory."""
    fp.seek(132)
    (group_length,) = struct.unpack("<I", fp.read(12)[8:12])
    fp.seek(132 + 12 + group_length)
    for _ in inflated(iter(lambda: fp.read(1 << 16), b""), size):
        pass


class DeflateBombError(DicomSarError):
    """A deflated dataset that would inflate far beyond its file's size."""


def inflated(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The inflated pieces of a deflated dataset (raw deflate), refusing a deflate bomb: no
    more than 1 GiB, nor 2,000 times the file's size."""
    import zlib

    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    for chunk in chunks:
        data = inflater.decompress(chunk, 1 << 20)
        while True:
            total += len(data)
            if total > MAX_INFLATED or total > 2000 * size:
                raise DeflateBombError(f"deflated dataset inflates to over {total >> 20} MiB "
                                       f"from {size} bytes (deflate bomb?)")
            yield data
            if not inflater.unconsumed_tail:
                break
            data = inflater.decompress(inflater.unconsumed_tail, 1 << 20)
    yield inflater.flush()


class TruncatedFileError(DicomSarError):
    """The file ends before an element it declares."""


def check_complete(ds: Dataset, fp: Any, size: int) -> None:
    """Raise if the file is cut short: pydicom silently returns short values."""
    if len(ds) == 0:
        raise TruncatedFileError("no data elements after the file meta (truncated?)")
    last = ds.get_item(list(ds.keys())[-1])
    if isinstance(last, RawDataElement) and last.length != 0xFFFFFFFF \
            and isinstance(last.value, bytes) and len(last.value) < last.length:
        raise TruncatedFileError(f"element {BaseTag(last.tag)} declares {last.length} bytes, "
                                 f"the file ends after {len(last.value)}")
    pos = fp.tell()
    little = ds.original_encoding[1] is not False
    order = "<" if little else ">"
    if getattr(last, "length", 0) == 0xFFFFFFFF and pos >= size \
            and not ends_with_delimiter(fp, size, order):
        raise TruncatedFileError(f"element {BaseTag(last.tag)} has no sequence delimiter "
                                 "before the end of the file")
    if pos + 8 > size:
        return
    pixels = pixel_element_at(fp, pos, ds)
    if pixels is None or pixels[0] != 0x7FE00010:
        return
    _, header, length = pixels
    if length is None:
        raise TruncatedFileError("the file ends inside PixelData's element header")
    if length != 0xFFFFFFFF and pos + header + length > size:
        raise TruncatedFileError(f"PixelData declares {length} bytes, the file ends after "
                                 f"{size - pos - header}")


def ends_with_delimiter(fp: Any, size: int, order: str) -> bool:
    """Whether the file ends with a sequence delimiter (FFFE,E0DD): what an undefined-length
    element that ends the file must end with."""
    fp.seek(size - 8)
    return fp.read(8) == struct.pack(order + "HHI", 0xFFFE, 0xE0DD, 0)


def pixel_element_at(fp: Any, pos: int, ds: Dataset) -> tuple[int, int, int | None] | None:
    """(tag, header size, value length) of the pixel data element (PIXEL_TAGS) at pos, where
    pydicom's stop_before_pixels leaves the file, in ds's encoding; None if another element
    (or nothing) is there; the length None if the file ends inside the header."""
    implicit, little = ds.original_encoding
    order = "<" if little is not False else ">"
    fp.seek(pos)
    head = fp.read(12)
    if len(head) < 4:
        return None
    group, element = struct.unpack(order + "HH", head[:4])
    if group << 16 | element not in PIXEL_TAGS:
        return None
    header = 8 if implicit is True else 12
    if len(head) < header:
        return group << 16 | element, header, None
    (length,) = struct.unpack(order + "I", head[header - 4:header])
    return group << 16 | element, header, length


Header = tuple["Dataset | None", int, str | None, int]  # read_dataset's, and the first odd tag


def raw_header(path: Path, wanted: Iterable[int]) -> Header:
    """The top-level elements wanted of a header, by a raw scan of the whole file:
    (dataset, size, kind) like read_dataset, the dataset holding only the wanted elements,
    their group lengths, SpecificCharacterSet and the file meta, each raw with its offset;
    and the first element of odd length in the file (0 for none).

    Raises RawScanError when the file should go the pydicom way.
    """
    wanted = list(wanted)
    scan, size = raw_scan(path, {}, table([*wanted, *(t & 0xFFFF0000 for t in wanted),
                                           0x00080005]))
    if scan is None:
        return None, size, None, 0
    if scan.kind != "part10":
        raise RawScanError("no file meta: pydicom decides the encoding")
    # from {tag: raw element} dicts, as pydicom's own reader builds them (without the
    # per-element __setitem__ checks)
    ds = Dataset({raw.tag: RawDataElement(BaseTag(raw.tag), *raw[1:])
                  for raw in scan.top.values()})
    ds.file_meta = pydicom.dataset.FileMetaDataset(
        {raw.tag: RawDataElement(BaseTag(raw.tag), *raw[1:]) for raw in scan.meta})
    ds.set_original_encoding(scan.implicit, scan.little, None)
    return ds, size, scan.kind, scan.odd


def header_with(path: Path, wanted: Iterable[int]) -> Header:
    """A header holding at least the wanted top-level tags, of a file that reads to its end,
    with its first odd-length element: raw_header, or pydicom's whole header for anything
    unusual (pydicom decides, and reports what is wrong with the file). Raises
    UnreadableFileError for a file cut short or broken."""
    try:
        return raw_header(path, wanted)
    except RAW_FALLBACK:
        ds, size, kind = read_dataset(path, header_only=True)
        return ds, size, kind, checked_whole(path) if ds is not None else 0


def whole(path: str | Path, read: tuple[Dataset | None, int, str | None]
          ) -> tuple[Dataset | None, int, str | None]:
    """read_dataset's answer for path, once the whole file is known to read to its end (what
    pydicom does not check: it reads sequences lazily and stops at the pixel data)."""
    if read[0] is not None:
        checked_whole(path)
    return read


class ItemPlace(NamedTuple):
    """Where one sequence item sits in its file."""

    item: Dataset  # held, so that its id stays its own while the Layout lives
    base: int  # what turns value_tell of the item's raw elements into a file offset
    offset: int  # of the item's tag
    length: int | None  # its length field (0xFFFFFFFF: undefined; None: not in the value)
    parent: Dataset
    tag: int  # the sequence's, in parent


class SequencePlace(NamedTuple):
    """Where one sequence's value sits in its file."""

    sequence: DataElement  # held, as ItemPlace.item
    length: int  # its length field
    value_offset: int


class Layout:
    """Where the sequences and items of one dataset sit in its file, learnt as each sequence
    is converted: pydicom keeps no lengths once an element is converted, and gives nested
    elements offsets relative to their sequence's value. One per walk of a dataset, owned by
    the function that starts the walk (for the splice writer's offsets, the dump's lengths)."""

    def __init__(self) -> None:
        self.items: dict[int, ItemPlace] = {}
        self.sequences: dict[int, SequencePlace] = {}

    def sequence(self, ds: Dataset, tag: int) -> DataElement:
        """ds[tag] for a sequence, noting where it and its items are in the file."""
        raw = ds.get_item(tag)
        elem = ds[tag]
        if isinstance(raw, RawDataElement):
            start = self.base(ds) + raw.value_tell
            self.sequences[id(elem)] = SequencePlace(elem, raw.length, start)
            order = "<" if raw.is_little_endian else ">"
            for item in elem.value or []:
                at = item.seq_item_tell - raw.value_tell  # the item's tag, in the raw value
                length = struct.unpack_from(order + "I", raw.value, at + 4)[0] \
                    if raw.value is not None and at + 8 <= len(raw.value) else None
                self.items[id(item)] = ItemPlace(item, start, start + at, length, ds, tag)
        return elem

    def base(self, ds: Dataset) -> int:
        """Offset that turns value_tell of ds's raw elements into a file offset."""
        place = self.items.get(id(ds))
        return place.base if place is not None else 0

    def sequence_length(self, sequence: DataElement) -> int:
        """The length field of a sequence as read (0 when it was not read from the file)."""
        place = self.sequences.get(id(sequence))
        return place.length if place is not None else 0

    def item_length(self, item: Dataset) -> int | None:
        """The length field of an item as read, if known."""
        place = self.items.get(id(item))
        return place.length if place is not None else None

    def value_offset(self, ds: Dataset, tag: int) -> int | None:
        """File offset of the value of ds[tag], if ds has it and we know where it is."""
        elem = ds.get_item(tag)
        if elem is None:
            return None
        # a decoded element keeps its raw value_tell as file_tell: relative to its item too
        tell = elem.value_tell if isinstance(elem, RawDataElement) else \
            getattr(elem, "file_tell", None)
        return self.base(ds) + tell if tell is not None else None

    def length_fields(self, ds: Dataset, group: int, meta: Dataset | None) -> tuple[int, ...]:
        """4-byte length fields that enclose an element of group in ds: group lengths,
        items, sequences."""
        fields = []
        while True:
            group_length = self.value_offset(ds, group << 16) if group or ds is meta else None
            if group_length is not None:
                fields.append(group_length)
            place = self.items.get(id(ds))
            if place is None:
                return tuple(fields)
            if not ds.is_undefined_length_sequence_item:
                fields.append(place.offset + 4)
            sq = self.sequences[id(place.parent[place.tag])]
            if sq.length != 0xFFFFFFFF:
                fields.append(sq.value_offset - 4)
            ds, group = place.parent, place.tag >> 16


def retired_group_lengths(ds: Dataset) -> int:
    """How many group length elements (beyond the command and meta groups) ds holds, nested
    items included: pydicom writes none of them (PS3.5 7.2), each is 12 bytes in the file."""
    count = 0
    for tag in ds.keys():
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            count += 1
        elif is_sequence(ds, tag):
            count += sum(retired_group_lengths(item) for item in ds[tag].value or [])
    return count


def item_length(item: Dataset) -> int:
    """Encoded length of an explicit-length item (pydicom keeps no item lengths)."""
    fp = DicomBytesIO()
    fp.is_little_endian = item.is_little_endian if item.is_little_endian is not None else True
    fp.is_implicit_VR = item.is_implicit_VR if item.is_implicit_VR is not None else False
    try:
        pydicom.filewriter.write_dataset(fp, item)
    except Exception:
        return 0
    return len(fp.getvalue()) + 12 * retired_group_lengths(item)


def find_elements(ds: Dataset, spec: TagSpec, *, deep: bool, layout: Layout | None = None
                  ) -> Iterator[tuple[Dataset, int]]:
    """Every (dataset, tag) a spec names: a path, or a plain tag at the top (or any depth);
    the sequences on the way are noted in layout."""
    layout = Layout() if layout is None else layout
    if spec.plain:
        yield from _find_plain(ds, spec.leaf, deep, layout)
        return
    yield from _follow_path(ds, spec.steps, layout)


def _find_plain(ds: Dataset, step: Step, deep: bool, layout: Layout
                ) -> Iterator[tuple[Dataset, int]]:
    tag = resolve_step(ds, step)
    for key in list(ds.keys()):
        if key == tag:
            yield ds, tag
        if deep and is_sequence(ds, key):
            for item in layout.sequence(ds, key).value or []:
                yield from _find_plain(item, step, deep, layout)


def _follow_path(ds: Dataset, steps: tuple[Step, ...], layout: Layout
                 ) -> Iterator[tuple[Dataset, int]]:
    tag = resolve_step(ds, steps[0])
    if tag is None or tag not in ds:
        return
    if len(steps) == 1:
        yield ds, tag
        return
    if not is_sequence(ds, tag):
        return
    items = layout.sequence(ds, tag).value or []
    chosen = items if steps[0].item is None else items[steps[0].item: steps[0].item + 1]
    for item in chosen:
        yield from _follow_path(item, steps[1:], layout)


def is_sequence(ds: Dataset, tag: int) -> bool:
    """True when element tag of ds is a sequence (without decoding other values)."""
    raw = ds.get_item(tag)
    if raw is None:
        return False
    if isinstance(raw, DataElement):
        return raw.VR == "SQ"
    if raw.VR is not None:
        return raw.VR == "SQ"
    try:
        return pydicom.datadict.dictionary_VR(tag) == "SQ"
    except KeyError:
        return raw.length == 0xFFFFFFFF and tag != 0x7FE00010


def all_datasets_of(ds: Dataset) -> Iterator[tuple[str, Dataset]]:
    """The file meta (if any) then the dataset: what dcmdump walks, in that order."""
    meta = getattr(ds, "file_meta", None)
    if meta:
        yield "meta", meta
    yield "data", ds


def element_vr(raw: RawDataElement | DataElement, ds: Dataset) -> str:
    """The VR of an element, resolving implicit VR and ambiguous 'US or SS' forms."""
    vr = raw.VR
    if vr and " or " not in vr:
        return str(vr)
    if isinstance(raw, RawDataElement):
        elem = convert_raw_data_element(raw, encoding=charset_of(ds), ds=ds)
    else:
        elem = raw
    if " or " in (elem.VR or ""):
        elem = correct_ambiguous_vr_element(elem, ds, raw.is_little_endian)
    return str(elem.VR) if elem.VR and " or " not in elem.VR else "UN"


def charset_of(ds: Dataset) -> list[str]:
    """Python encodings for a dataset's SpecificCharacterSet (nested items inherit)."""
    encodings = getattr(ds, "_character_set", None) or ["iso8859"]
    return [encodings] if isinstance(encodings, str) else list(encodings)


def decode_text(value: bytes, vr: str, encodings: list[str], padding: bytes = b"\x00 ") -> str:
    """Decode a raw string value with the dataset's character set, padding stripped (UI: NUL,
    and spaces too)."""
    value = value.rstrip(padding if vr != "UI" else b"\x00 ")
    if vr in TEXT_VRS:
        if value.isascii() and b"\x1b" not in value:  # as every charset pydicom knows reads it
            return value.decode("ascii")
        load_pydicom()
        delimiters = {0x5C, 0x3D, 0x5E} if vr == "PN" else {0x5C}
        text = pydicom.charset.decode_bytes(value, encodings, delimiters)
        # pydicom hands ISO 2022 IR 58 (GB2312) to Python's codec whole, which keeps its
        # designation ESC $ ) A as text; no escape sequence belongs in a decoded value
        return iso2022_escapes().sub("", text) if "\x1b" in text else text
    # ASCII by the standard; other bytes pass through as themselves, as dcmdump prints them
    return value.decode("ascii", "surrogateescape")


@functools.cache
def iso2022_escapes() -> re.Pattern[str]:
    """The ISO 2022 escape sequences pydicom knows, as text."""
    return re.compile("|".join(re.escape(code.decode("latin-1"))
                               for code in pydicom.charset.CODES_TO_ENCODINGS))


# ════════════════════════════════════════════════════════════════════════════════════════
# Engine: a bounded, ordered pool — memory stays bounded, output keeps the walk order
# ════════════════════════════════════════════════════════════════════════════════════════


class Status(enum.StrEnum):
    """What a task did with its file (str-valued: the logs and the --ui page show the value)."""

    OK = "ok"  # read: dumped, counted, indexed
    UNCHANGED = "unchanged"  # nothing to change (or only copied to the output tree)
    MODIFIED = "modified"  # changed and written
    WRITTEN = "written"  # a new file (--generate)
    REJECTED = "rejected"  # a change failed validation: the file is left as it was
    ERROR = "error"  # unreadable, or the task failed: left as it was
    SKIPPED = "skipped"  # not a file of the tree's (a symlink, a leftover), or done before
    NOT_DICOM = "not-dicom"


class Outcome(enum.StrEnum):
    """What became of one file a --send tried (the summary's `outcome` of each file)."""

    SENT = "sent"
    WARNING = "warning"  # stored, with a warning status: counted as sent
    FAILED = "failed"
    NOT_SENT = "not-sent"  # the run was stopped first


class Expect(enum.StrEnum):
    """What an ingesting PACS should do with a generated file (manifest.json's `expect`)."""

    ACCEPT = "accept"
    REJECT = "reject"
    ABSENT = "absent"  # declared in the manifest, deliberately not written


@dataclasses.dataclass(slots=True)
class FileResult:
    """What one task did to one file; built in a worker, consumed by the main thread.

    Not frozen only so that guarded() can stamp the time without copying every field;
    nothing changes a result once it is returned.
    """

    path: Path
    status: Status
    nbytes: int = 0
    seconds: float = 0.0
    message: str = ""
    error_type: str = ""
    lines: tuple[str, ...] = ()
    values: tuple[tuple[str, str], ...] = ()  # --count: (tag label, value)
    changes: tuple[Change, ...] = ()
    rejections: tuple[str, ...] = ()
    record: Any = None  # --send: what the index found
    staged: Staged | None = None  # a written file waiting for its batch's commit (Committer)


class TimeLimitError(DicomSarError):
    """A worker found its file abandoned at the time limit; the file is left as it was."""


@dataclasses.dataclass(eq=False)
class Batch:
    """A few files for one pool task.

    This is the one state a worker shares with the main thread, and only for the per-file
    time limit: the worker appends results and stamps each file's start; the main thread may
    mark the batch abandoned. Both happen under the lock: a file reported as timed out is
    never committed (its staged file is removed).
    """

    files: list[Candidate]
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    done: list[FileResult] = dataclasses.field(default_factory=list)
    started: float = 0.0  # monotonic start of the file in progress; 0 between files
    abandoned: bool = False


@dataclasses.dataclass(eq=False)
class Slot:
    """A place in the output order: results settled so far, then the batch still running."""

    settled: list[FileResult]
    batch: Batch
    future: Future[list[FileResult]] | None


_current_batch = threading.local()  # the Batch a worker thread is running, for commit()
STOP_GRACE = 10.0  # seconds a file in flight may still take after Ctrl-C or SIGTERM


def run_ordered(candidates: Iterable[Candidate], task: Callable[[Candidate], FileResult],
                workers: int, stop: threading.Event, time_limit: float = 0,
                batch: int = 16, ahead: Callable[[], int] | None = None
                ) -> Iterator[FileResult]:
    """Run task over candidates on a thread pool, yielding results in submission order.

    Files go to the pool in small batches (fewer futures and wake-ups for the main thread),
    and at most a few batches per worker, plus ahead() files, are in flight (backpressure
    on the walk). A file that runs past time_limit seconds becomes an error (see Pool).
    """
    # ahead: a writing mode's commit batch (Committer.batch_files), so that the workers go
    # on while the main thread flushes and renames one
    pool = Pool(workers, task, time_limit, stop,
                lambda: max(2, workers * 3) + (-(-ahead() // batch) if ahead else 0))
    try:
        chunk: list[Candidate] = []
        for cand in candidates:
            if stop.is_set():
                chunk = []
                break  # stop taking new files; the ones in flight finish below
            chunk.append(cand)
            if len(chunk) < batch:
                continue
            pool.submit(chunk)
            chunk = []
            while pool.full():
                yield from pool.next_results()
        if chunk:
            pool.submit(chunk)
        while pool.slots:
            yield from pool.next_results()
    finally:
        pool.close()


class Pool:
    """The ThreadPoolExecutor behind run_ordered, plus the per-file time limit.

    Python cannot stop a thread, so a file past the limit is given up on: its batch is
    abandoned (that worker commits nothing more), the rest of the batch and the queued
    batches go to a fresh executor, and the process exits without waiting for the stuck
    thread (leave).
    """

    def __init__(self, workers: int, task: Callable[[Candidate], FileResult],
                 time_limit: float, stop: threading.Event, depth: Callable[[], int]):
        self.workers, self.task, self.time_limit, self.stop = workers, task, time_limit, stop
        self.depth = depth  # batches in flight at most, asked before each new one
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=PROG)
        self.retired: list[ThreadPoolExecutor] = []
        self.stuck = False  # a worker had to be abandoned: close() cannot wait for it
        self.slots: collections.deque[Slot] = collections.deque()

    def start(self, files: list[Candidate]) -> tuple[Batch, Future[list[FileResult]] | None]:
        """A batch of files on the current executor (nothing for no files)."""
        b = Batch(files)
        return b, self.executor.submit(run_batch, self.task, b) if files else None

    def submit(self, files: list[Candidate]) -> None:
        """Queue a batch behind the others."""
        self.slots.append(Slot([], *self.start(files)))

    def full(self) -> bool:
        """Backpressure: depth() batches in flight at most."""
        return len(self.slots) >= self.depth()

    def next_results(self) -> list[FileResult]:
        """The oldest slot's results, in order, once its batch is finished or given up on."""
        slot = self.slots[0]
        tick = min(1.0, self.time_limit / 4) if self.time_limit else 1.0
        while slot.future is not None:
            try:
                results = slot.future.result(timeout=tick)
                break
            except TimeoutError:
                self.enforce_time_limit()
        else:
            results = []
        self.slots.popleft()
        return slot.settled + results

    def limit(self) -> float:
        """How long a file may run: the time limit, cut to STOP_GRACE once stopped."""
        limit = self.time_limit or math.inf
        return min(limit, STOP_GRACE) if self.stop.is_set() else limit

    def enforce_time_limit(self) -> None:
        """Abandon every batch whose current file has run past the limit."""
        now, limit = time.monotonic(), self.limit()
        for slot in self.slots:
            b = slot.batch
            with b.lock:
                if b.abandoned or not b.started or now - b.started < limit:
                    continue
                b.abandoned = True
                finished = list(b.done)
            stuck = b.files[len(finished)]
            why = (f"after the {self.time_limit:g} s per-file time limit (--time-limit)"
                   if limit == self.time_limit else f"{limit:g} s after the stop signal")
            log.warning("%s: abandoned, still running %s", stuck.path, why)
            slot.settled += [*finished, FileResult(
                stuck.path, Status.ERROR, seconds=now - b.started, error_type="TimeLimit",
                message=f"still running {why}; left as it was")]
            self.replace_executor()
            slot.batch, slot.future = self.start(b.files[len(finished) + 1:])

    def replace_executor(self) -> None:
        """A fresh executor takes the queued batches; the old one keeps its stuck thread."""
        self.stuck = True
        old, self.executor = self.executor, ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix=PROG)
        self.retired.append(old)
        for slot in self.slots:
            if slot.future is not None and slot.future.cancel():  # not started: move it
                slot.batch, slot.future = self.start(slot.batch.files)
        old.shutdown(wait=False)

    def close(self) -> None:
        """Cancel what has not started; wait for the rest unless a worker is stuck."""
        for slot in self.slots:
            if slot.future is not None:
                slot.future.cancel()
        for executor in [*self.retired, self.executor]:
            executor.shutdown(wait=not self.stuck)


def run_batch(task: Callable[[Candidate], FileResult], b: Batch) -> list[FileResult]:
    """One pool task: a few files, each guarded on its own, stamped for the time limit."""
    _current_batch.value = b
    try:
        for cand in b.files:
            with b.lock:
                if b.abandoned:
                    break
                b.started = time.monotonic()
            result = guarded(task, cand) if cand.problem is None else problem_result(cand)
            with b.lock:
                if b.abandoned:
                    discard(result.staged)  # reported as timed out: nobody commits it
                    break
                b.done.append(result)
                b.started = 0.0
    finally:
        _current_batch.value = None
    return b.done


def commit(replace: Callable[[], None]) -> None:
    """Run the step that makes a write visible, unless this file was abandoned meanwhile."""
    b: Batch | None = getattr(_current_batch, "value", None)
    if b is None:
        replace()
        return
    with b.lock:
        if b.abandoned:
            raise TimeLimitError("abandoned at the per-file time limit")
        replace()


def problem_result(cand: Candidate) -> FileResult:
    """The result for a path the walk could not use (an error or a skip)."""
    status, message = cand.problem or (Status.ERROR, "")
    return FileResult(cand.path, status, message=message,
                      error_type="OSError" if status is Status.ERROR else "")


def guarded(task: Callable[[Candidate], FileResult], cand: Candidate) -> FileResult:
    """Run one task; any exception becomes an error result (the run goes on)."""
    t0 = time.perf_counter()
    try:
        result = task(cand)
    except Exception as exc:
        result = FileResult(cand.path, Status.ERROR, message=one_line(str(exc)) or repr(exc),
                            error_type=type(exc).__name__)
    result.seconds = time.perf_counter() - t0
    return result


def one_line(text: str) -> str:
    """An exception message on one line: first line, and the last if it differs."""
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


class StopSignal:
    """SIGINT/SIGTERM set an event: no new files are taken, in-flight files finish. So does
    a closed stdout (`--dump ... | head`), as SIGPIPE would stop dcmdump."""

    def __init__(self, handlers: bool = True) -> None:
        self.event = threading.Event()
        self.signum = 0
        # handlers=False: a --ui job's thread (signals belong to the main thread)
        self._old = {sig: signal.signal(sig, self._handle)
                     for sig in (signal.SIGINT, signal.SIGTERM)} if handlers else {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = self.signum or signum
        self.event.set()

    def output(self, stream: Any) -> Callable[[str], None]:
        """A line writer for stream that stops the run once nobody reads it any more."""
        def out(line: str) -> None:
            if self.signum == signal.SIGPIPE:
                return
            try:
                stream.write(line + "\n")
            except BrokenPipeError:
                # what is still buffered, and the flush at exit, go nowhere instead of
                # failing again (the recipe of Python's signal documentation)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)
                self._handle(signal.SIGPIPE, None)
        return out

    def cause(self) -> str:
        """What stopped the run, in words."""
        return "a closed output pipe" if self.signum == signal.SIGPIPE else f"signal {self.signum}"

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def exit_status(self) -> int:
        """130 after SIGINT, 143 after SIGTERM, 141 after a closed output pipe, else 0."""
        return 128 + self.signum if self.signum else 0


# ════════════════════════════════════════════════════════════════════════════════════════
# Writing: the only place that creates or replaces files (temp file, group commit, atomic
# rename)
# ════════════════════════════════════════════════════════════════════════════════════════


def output_path(cand: Candidate, opts: Options) -> Path:
    """Where a file goes in the output tree: its path relative to its --path root."""
    assert opts.output is not None
    return mirrored(cand, opts.output, opts)


def mirrored(cand: Candidate, base: Path, opts: Options) -> Path:
    """base / (path relative to its root); never escapes base."""
    rel = cand.path.name if cand.root == cand.path else relative_part(cand.path, cand.root)
    if len(opts.paths) > 1:
        rel = os.path.join(f"{opts.paths.index(cand.root)}_{cand.root.name or 'root'}", rel)
    target = base / rel
    if not leads_nowhere_else(target.parent, base):
        raise PermissionError(f"refusing to write outside {base}: {target}")
    return target


_checked_directories = threading.local()  # each worker's own, for the one run it lives for
DIRECTORIES_KEPT = 4096


def leads_nowhere_else(directory: Path, base: Path) -> bool:
    """Whether directory lies below base once symlinks are resolved, or is not there yet
    (it will be made as a plain directory); remembered by the thread (realpath walks every
    component of the path with a system call, and a tree's files share their directories)."""
    known = _checked_directories.__dict__.setdefault("known", {})
    key = (os.fspath(directory), os.fspath(base))
    if key in known:
        return True
    if not is_within(directory, base) and directory.exists():
        return False
    if len(known) >= DIRECTORIES_KEPT:
        known.clear()
    known[key] = None
    return True


def relative_part(path: Path, root: Path) -> str:
    """path below root, as Path.relative_to answers, by string where the walk's own join
    shows it (relative_to parses both paths again on every file)."""
    text, prefix = os.fspath(path), os.fspath(root).rstrip(os.sep) + os.sep
    return text[len(prefix):] if text.startswith(prefix) else os.fspath(path.relative_to(root))


def temp_path(directory: Path, tag: str = "") -> Path:
    """A fresh temporary file name in directory (the walk recognises the prefix); tag names
    the run (its journal key), so that its --resume knows the leftovers as its own."""
    return directory / f"{TEMP_PREFIX}{tag + '-' if tag else ''}{os.urandom(8).hex()}"


def run_tag(opts: Options) -> str:
    """The tag of a journalled run's temporary files (see temp_path)."""
    return opts.journal.key if opts.journal is not None else ""


def open_temp(directory: Path, tag: str = "") -> tuple[int, Path]:
    """A new, exclusively created temporary file in directory (made if missing): (fd, path)."""
    # In the target's own directory because os.replace within one filesystem is atomic: a
    # crash leaves either the old file or the new one, never a partial file.
    for _ in range(100):
        tmp = temp_path(directory, tag)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue
        except FileNotFoundError:
            directory.mkdir(parents=True, exist_ok=True)
    raise FileExistsError(f"no free temporary file name in {directory}")


@dataclasses.dataclass(frozen=True)
class Staged:
    """A file written whole under a temporary name beside its target, waiting for its
    batch's commit (Committer): made durable, journalled, then renamed over the target."""

    tmp: Path
    target: Path
    inode: int  # the temporary file's, which the rename keeps (the journal records it)
    nbytes: int
    source: Path | None = None  # the journal's name for it (a SAR's input file)
    backup: Path | None = None  # a hard link to the original, which must be durable first


def stage_atomic(target: Path, produce: Callable[[BinaryIO], None], *,
                 like: Path | None = None, tag: str = "", writable: bool = False,
                 keep_owner: bool = False, source: Path | None = None,
                 backup: Path | None = None) -> Staged:
    """produce() writes a temporary file beside target, with like's mode and times, and its
    owner with keep_owner (writable: plus owner write, for a new file in an output tree the
    user will work on; a source on read-only media has none); a Committer renames it over
    target later."""
    fd, tmp = open_temp(target.parent, tag)
    try:
        with open(fd, "wb", buffering=0) as out:  # unbuffered: see buffered_reader
            produce(out)
            st = os.fstat(fd)
        if like is not None:
            shutil.copystat(like, tmp)  # permissions and timestamps of the original
            if writable:
                os.chmod(tmp, stat.S_IMODE(os.stat(tmp).st_mode) | stat.S_IWUSR)
            owner = os.stat(like) if keep_owner else None
            if owner is not None and (owner.st_uid, owner.st_gid) != (os.geteuid(),
                                                                      os.getegid()):
                with contextlib.suppress(OSError):  # keep the owner where we may
                    os.chown(tmp, owner.st_uid, owner.st_gid)
        else:
            os.chmod(tmp, 0o644)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Staged(tmp, target, st.st_ino, st.st_size, source, backup)


def discard(staged: Staged | None) -> None:
    """Remove a staged file that will not be committed (and its original's backup link,
    which would share the live file's inode)."""
    if staged is not None:
        staged.tmp.unlink(missing_ok=True)
        if staged.backup is not None:
            staged.backup.unlink(missing_ok=True)


def write_atomic(target: Path, produce: Callable[[BinaryIO], None], *, fsync: bool,
                 like: Path | None = None, tag: str = "", writable: bool = False) -> None:
    """Write one file now, outside any batch: staged, flushed if fsync, renamed over target
    (the manifest, a summary, a backup copied across filesystems)."""
    staged = stage_atomic(target, produce, like=like, tag=tag, writable=writable)
    try:
        if fsync:
            fdatasync_path(staged.tmp)
        commit(lambda: os.replace(staged.tmp, target))
    except BaseException:
        discard(staged)
        raise


def fdatasync_path(path: Path) -> None:
    """A file's data (and what reading it back needs) on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    """A directory's entries on disk (the renames and links in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def libc_syncfs() -> Callable[[int], int] | None:
    """syncfs(2) (Linux), which Python's os module lacks; None where there is none."""
    try:
        import ctypes
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    syncfs.argtypes, syncfs.restype = [ctypes.c_int], ctypes.c_int
    return syncfs


def sync_filesystem_of(directory: Path) -> None:
    """Everything written to directory's filesystem on disk: one syncfs for a whole batch."""
    import ctypes
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if libc_syncfs()(fd) != 0:  # type: ignore[misc]
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), str(directory))
    finally:
        os.close(fd)


COMMIT_FILES, COMMIT_BYTES, COMMIT_SECONDS = 256, 256 << 20, 0.25  # whichever comes first
FLUSH_THREADS = 16  # fdatasync at once where there is no syncfs: the device merges them


class Committer:
    """The main thread's half of every writing mode (group commit).

    Results wait here in their order; those with a staged file are committed by the batch
    (COMMIT_FILES files, COMMIT_BYTES bytes or COMMIT_SECONDS, whichever first): made
    durable together (one syncfs per filesystem; fdatasync of each from FLUSH_THREADS where
    there is no syncfs), journalled and the journal flushed, renamed, the directories
    flushed; only then reported. A crash at any moment leaves each target old or new and
    whole, and the journal lists only files whose new version was on disk. Without fsync,
    the same minus the flushes.
    """

    def __init__(self, fsync: bool, journal: Journal | None = None,
                 claim: Callable[[FileResult], str] | None = None):
        self.fsync, self.journal = fsync, journal
        self.claim = claim  # why a staged file may not take its target ('' if it may)
        if fsync:
            # before the pool starts: importing ctypes stops the world on 3.13t, which would
            # wait for a worker stuck in a catastrophic regular expression forever
            libc_syncfs()
        self.waiting: list[FileResult] = []
        self.pending = self.nbytes = 0
        self.since = 0.0
        self.staged_files = self.staged_bytes = 0  # over the run, for batch_files

    def add(self, result: FileResult) -> list[FileResult]:
        """Take one result; return those ready to report, in order."""
        self.waiting.append(result)
        if result.staged is None:
            return self.flush() if not self.pending else []
        if not self.pending:
            self.since = time.monotonic()
        self.pending += 1
        self.nbytes += result.staged.nbytes
        self.staged_files += 1
        self.staged_bytes += result.staged.nbytes
        if self.pending >= COMMIT_FILES or self.nbytes >= COMMIT_BYTES or \
                time.monotonic() - self.since >= COMMIT_SECONDS:
            return self.flush()
        return []

    def batch_files(self) -> int:
        """How many files a batch holds at the run's mean size so far (0 before the first):
        what the workers may stage ahead while one is committed (run_ordered's ahead)."""
        if not self.staged_files:
            return 0
        mean = max(1, self.staged_bytes // self.staged_files)
        return min(COMMIT_FILES, COMMIT_BYTES // mean)

    def flush(self) -> list[FileResult]:
        """Commit the waiting batch; return its results (a file that failed: an error)."""
        batch, self.waiting, self.pending, self.nbytes = self.waiting, [], 0, 0
        staged = [r.staged for r in batch if r.staged is not None]
        if not staged:
            return batch
        problem = self.make_durable(staged)
        if problem is None and self.journal is not None:
            problem = self.journal.record_all(staged, self.fsync)
        done, directories = [], {}
        for r in batch:
            s = r.staged
            taken = self.claim(r) if self.claim is not None and s is not None else ""
            if taken:
                discard(s)
                done.append(FileResult(r.path, Status.ERROR, nbytes=r.nbytes, seconds=r.seconds,
                                       error_type="Duplicate", message=taken))
                continue
            try:
                if s is not None:
                    if problem is not None:
                        raise OSError(problem)
                    os.replace(s.tmp, s.target)
                    directories[s.target.parent] = None
                done.append(r)
            except OSError as exc:
                discard(s)
                done.append(FileResult(r.path, Status.ERROR, nbytes=r.nbytes, seconds=r.seconds,
                                       error_type="OSError",
                                       message=f"{one_line(str(exc))}; left as it was"))
        if self.fsync:
            for directory in directories:
                try:
                    fsync_directory(directory)
                except OSError as exc:
                    log.warning("%s: the renames may not be on disk yet: %s", directory, exc)
        return done

    def make_durable(self, staged: list[Staged]) -> str | None:
        """Every staged file (and the backup links) on disk: None, or why not."""
        if not self.fsync:
            return None
        try:
            if libc_syncfs() is not None:
                devices = {}
                for directory in dict.fromkeys(s.tmp.parent for s in staged):
                    devices.setdefault(os.stat(directory).st_dev, directory)
                for directory in devices.values():
                    sync_filesystem_of(directory)
            else:
                with ThreadPoolExecutor(FLUSH_THREADS, thread_name_prefix="flush") as pool:
                    list(pool.map(fdatasync_path, [s.tmp for s in staged]))
                for directory in dict.fromkeys(s.backup.parent for s in staged if s.backup):
                    fsync_directory(directory)
        except OSError as exc:
            return f"could not flush the batch to disk ({exc})"
        return None

    def abandon(self) -> None:
        """Remove what was staged and not committed (the run failed before the end)."""
        for r in self.waiting:
            discard(r.staged)
        self.waiting = []


def committed(results: Iterable[FileResult], committer: Committer) -> Iterator[FileResult]:
    """The results, in order, each once its file is committed (see Committer)."""
    try:
        for result in results:
            yield from committer.add(result)
        yield from committer.flush()
    finally:
        committer.abandon()


def write_dataset(ds: Dataset, out: BinaryIO) -> None:
    """Full rewrite by pydicom, keeping the file's own encoding (the fallback path)."""
    buffer = io.BytesIO()  # in memory, then one write: out is unbuffered
    ds.save_as(buffer, enforce_file_format=False)
    write_all(out, [buffer.getbuffer()])


def write_all(out: BinaryIO, chunks: Iterable[bytes | memoryview]) -> None:
    """Write every byte of chunks to an unbuffered file (see write_all_fd)."""
    write_all_fd(out.fileno(), *chunks)


def write_all_fd(fd: int, *chunks: bytes | memoryview) -> None:
    """Write every byte of chunks to fd: one writev, and again for whatever a short write
    left over (a raw write may take less than it is given)."""
    views = [memoryview(c) for c in chunks if len(c)]
    while views:
        n = os.writev(fd, views[:1024])  # IOV_MAX
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if views:
            views[0] = views[0][n:]


def write_bytes_atomic(data: bytes | list[bytes], target: Path, *, fsync: bool) -> None:
    """Write bytes (or a list of chunks) to target atomically, now."""
    def produce(out: BinaryIO) -> None:
        write_all(out, [data] if isinstance(data, bytes) else data)
    write_atomic(target, produce, fsync=fsync)


def copy_of(source: Path) -> Callable[[BinaryIO], None]:
    """A producer (see stage_atomic) writing source's bytes, by kernel copy."""
    def produce(out: BinaryIO) -> None:
        with read_fd(source) as src:
            copy_range(src, out.fileno(), 0, os.fstat(src).st_size)
    return produce


def stage_copy(source: Path, target: Path, *, tag: str = "", writable: bool = False
               ) -> Staged:
    """A copy of source (data, mode, times) staged for target."""
    return stage_atomic(target, copy_of(source), like=source, tag=tag, writable=writable)


def copy_range(src: int, dst: int, start: int, end: int) -> None:
    """Copy bytes [start, end) of src to the current end of dst (copy_file_range/reflink)."""
    offset = start
    kernel_copy = getattr(os, "copy_file_range", None)  # Linux only
    while offset < end:
        try:
            n = kernel_copy(src, dst, end - offset, offset) if kernel_copy else 0
        except OSError:
            n = 0
        if n == 0:  # not supported here: plain reads and writes
            os.lseek(src, offset, os.SEEK_SET)
            chunk = os.read(src, min(1 << 20, end - offset))
            if not chunk:
                raise TruncatedFileError("the file shrank while it was being copied")
            n = os.write(dst, chunk)
        offset += n


@dataclasses.dataclass(frozen=True)
class Patch:
    """Replace size bytes at offset of the original file with data."""

    offset: int
    size: int
    data: bytes


def splice_patches(path: Path, ds: Dataset, planned: list[Planned]) -> list[Patch] | None:
    """The byte patches that turn the file into its modified version, or None.

    Each changed value and its length field, plus every enclosing defined-length item and
    sequence and every group length on the way up. None when a full rewrite is needed.
    """
    implicit, little = ds.original_encoding
    meta = getattr(ds, "file_meta", None)
    if implicit is None or (meta is not None and meta.get("TransferSyntaxUID")
                            == pydicom.uid.DeflatedExplicitVRLittleEndian):
        return None
    patches: dict[int, Patch] = {}
    growth: collections.Counter[tuple[int, str]] = collections.Counter()
    with read_fd(path) as fd:
        for p in planned:
            if p.value_offset is None:
                return None
            in_meta = p.owner is meta
            order = "<" if in_meta or little else ">"  # the file meta is always little endian
            explicit_vr = None if implicit and not in_meta else p.owner.get_item(p.tag).VR
            size = 2 if explicit_vr is not None and explicit_vr not in LONG_LENGTH_VRS else 4
            fmt = order + ("H" if size == 2 else "I")
            field = p.value_offset - size
            (old_len,) = struct.unpack(fmt, os.pread(fd, size, field))
            if old_len == 0xFFFFFFFF or len(p.encoded) > (0xFFFF if size == 2 else 0xFFFFFFFE):
                return None
            patches[field] = Patch(field, size, struct.pack(fmt, len(p.encoded)))
            patches[p.value_offset] = Patch(p.value_offset, old_len, p.encoded)
            for offset in p.length_fields:
                growth[(offset, order)] += len(p.encoded) - old_len
        for (offset, order), delta in growth.items():
            (old,) = struct.unpack(order + "I", os.pread(fd, 4, offset))
            if not 0 <= old + delta < 0xFFFFFFFF:
                return None
            patches[offset] = Patch(offset, 4, struct.pack(order + "I", old + delta))
    ordered = sorted(patches.values(), key=lambda x: x.offset)
    if any(a.offset + a.size > b.offset for a, b in itertools.pairwise(ordered)):
        return None  # overlapping patches: something is odd, let pydicom rewrite
    return ordered


def write_spliced(source: Path, out: BinaryIO, patches: list[Patch]) -> None:
    """Write source with patches applied: patched head from memory, tail by kernel copy."""
    with read_fd(source) as src:
        size = os.fstat(src).st_size
        last = patches[-1].offset + patches[-1].size
        head = read_rest(src, last)
        if len(head) < last:
            raise TruncatedFileError("the file shrank while it was being processed")
        pos, parts = 0, []
        for patch in patches:
            parts += [head[pos:patch.offset], patch.data]
            pos = patch.offset + patch.size
        write_all(out, parts)
        copy_range(src, out.fileno(), pos, size)


def stage_in_place(cand: Candidate, opts: Options, produce: Callable[[BinaryIO], None]
                   ) -> Staged:
    """Back up the original (unless --no-backup), then stage its replacement."""
    if cand.path.is_symlink():
        raise PermissionError("refusing to replace a symlink in place")
    tree = cand.path.parent if cand.root == cand.path else cand.root
    if opts.follow_symlinks and not Path(os.path.realpath(cand.path.parent)).is_relative_to(
            os.path.realpath(tree)):  # reached through a symlinked directory
        raise PermissionError("refusing to replace in place a file outside the tree "
                              "(reached through a symlinked directory)")
    linked = None
    if opts.backup is not None:
        backup = mirrored(cand, opts.backup, opts)
        linked = backup if backup_original(cand.path, backup, fsync=opts.fsync,
                                           tag=run_tag(opts)) else None
    try:
        return stage_atomic(cand.path, produce, like=cand.path, tag=run_tag(opts),
                            keep_owner=True, source=cand.path, backup=linked)
    except BaseException:
        if linked is not None:  # a link left behind would share the live file's inode
            linked.unlink(missing_ok=True)
        raise


def backup_original(source: Path, target: Path, *, fsync: bool, tag: str = "") -> bool:
    """Keep the original in the backup tree; True if as a hard link, False if copied.

    A link costs no copy, and is safe because the original inode is never written to, only
    replaced by rename: once replaced, the link alone holds the original bytes (and mode,
    owner and times). Across filesystems, or over an existing backup, the file is copied.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        write_atomic(target, copy_of(source), fsync=fsync, like=source, tag=tag)
        return False
    return True


# ════════════════════════════════════════════════════════════════════════════════════════
# Journal: what a writing run completed, so --resume never applies a change twice
# ════════════════════════════════════════════════════════════════════════════════════════


JOURNAL_DONE = "# complete"


@dataclasses.dataclass(frozen=True)
class JournalView:
    """A journalled run's key (it names the run's temporary files) and what its interrupted
    predecessor completed, read-only: the workers' view of the journal."""

    key: str
    done: Mapping[str, int]  # source -> inode of its new version

    def completed(self, source: Path, target: Path) -> bool:
        """True when the interrupted run replaced target with this file's new version."""
        inode = self.done.get(str(source))
        try:
            return inode is not None and os.stat(target).st_ino == inode
        except OSError:
            return False


class Journal:
    """An append-only list of '["source", inode]' lines (JSON), one per file replaced.

    A batch's lines are written (and flushed, with fsync) after its files are on disk and
    just before their renames, with the inode of each temporary file, which the rename
    keeps: on resume a file counts as done only when its inode still matches, so a crash
    between the line and the rename leaves that file to be processed again.
    """

    def __init__(self, path: Path, done: dict[str, int]):
        self.path, self.done = path, done
        self.key = path.stem.removeprefix("dicom_sar-")  # names the run's temporary files
        # Workers append single short lines with O_APPEND: each write() lands whole.
        self.fd = os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)

    @staticmethod
    def location(opts: Options) -> Path:
        """The journal of a run is keyed by everything that decides what it writes."""
        key = json.dumps([opts.mode, [os.path.realpath(p) for p in opts.paths],
                          [s.label() for s in opts.specs], opts.glob,
                          opts.pattern.pattern if opts.pattern else None, opts.replacement,
                          opts.deep, opts.all_strings, opts.inplace,
                          os.path.realpath(opts.output) if opts.output else None,
                          *([opts.shard, opts.files_from] if opts.shard or opts.files_from
                            else []),
                          *([opts.deid.fingerprint, opts.deid.options, opts.deid.keep_private,
                             opts.deid.allow_burned_in] if opts.deid is not None else [])])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return opts.log_dir / f"dicom_sar-{digest}.journal"

    @staticmethod
    def read(path: Path) -> tuple[dict[str, int], bool]:
        """(source -> inode, finished?) of an existing journal."""
        done: dict[str, int] = {}
        finished = False
        if path.exists():
            for line in path.read_bytes().split(b"\n"):
                if line == JOURNAL_DONE.encode():
                    finished = True
                elif line.startswith(b"["):
                    try:
                        source, inode = json.loads(line)
                    except ValueError:  # a line torn by a crash: that file is done again
                        continue
                    done[source] = inode
                    finished = False
        return done, finished

    @property
    def view(self) -> JournalView:
        """What the run's tasks may know of the journal: its key and the files done."""
        return JournalView(self.key, types.MappingProxyType(self.done))

    def record_all(self, staged: list[Staged], fsync: bool) -> str | None:
        """Note, just before their renames, that each staged file (by inode) becomes its
        source's new version, flushed with fsync: None, or why it could not."""
        # JSON escapes what a file name may hold and a line may not (newlines, U+2028, bytes
        # that are not UTF-8, kept by Python as lone surrogates): one ASCII line per file,
        # read back to the same name
        lines = "".join(json.dumps([str(s.source), s.inode]) + "\n"
                        for s in staged if s.source is not None).encode("ascii")
        try:
            if lines:
                write_all_fd(self.fd, lines)
                if fsync:
                    os.fdatasync(self.fd)
        except OSError as exc:
            return f"could not write the journal {self.path} ({exc})"
        return None

    def finish(self) -> None:
        """Mark the run complete."""
        write_all_fd(self.fd, (JOURNAL_DONE + "\n").encode())
        os.close(self.fd)


def open_journal(opts: Options) -> Journal:
    """The journal for a writing SAR run; refuse to rerun over an unfinished one silently."""
    path = Journal.location(opts)
    done, finished = Journal.read(path)
    unfinished = path.exists() and not finished
    if opts.resume and path.exists() and finished:
        raise UsageError(f"the run with these options finished (journal {path}): nothing to "
                         "resume; without --resume it would apply the change again")
    if unfinished and not (opts.resume or opts.restart):
        raise UsageError(f"an earlier run with these options did not finish ({len(done)} files "
                         f"done, journal {path}); rerun with --resume to skip them, "
                         "or --restart to start over")
    if not opts.resume or not unfinished:
        done = {}
        path.unlink(missing_ok=True)
    journal = Journal(path, done)
    os.write(journal.fd, f"# run {datetime.now(UTC).isoformat()}\n".encode())
    return journal


class Litter:
    """The temporary files an interrupted run with these options left (their names carry
    its journal key): the run that resumes it removes them, and nobody else's."""

    def __init__(self, key: str):
        self.prefix = f"{TEMP_PREFIX}{key}-"
        self.seen: list[Path] = []

    def claims(self, result: FileResult) -> bool:
        """True for a leftover of ours met by the walk (removed at the end, not reported)."""
        if result.status == Status.SKIPPED and result.path.name.startswith(self.prefix):
            self.seen.append(result.path)
            return True
        return False

    def remove(self, trees: Iterable[Path | None]) -> int:
        """Once the pool is done (no file of this run is in flight): remove the leftovers
        the walk met, and those in the trees it does not walk (output, backup)."""
        found = list(self.seen)
        for tree in filter(None, trees):
            for directory, _, files in os.walk(tree):
                found += [Path(directory, f) for f in files if f.startswith(self.prefix)]
        removed = 0
        for path in found:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        if removed:
            log.info("removed %d temporary files left by the interrupted run", removed)
            print(f"removed {removed} temporary files left by the interrupted run",
                  file=sys.stderr)
        return removed


# ════════════════════════════════════════════════════════════════════════════════════════
# Report: counters, logs, progress bar, summary and exit status — main thread only; and
# over_the_walk(), the pipeline of the walking modes (discover, pool, commit, report)
# ════════════════════════════════════════════════════════════════════════════════════════


@dataclasses.dataclass
class Stats:
    """Counters fed only by results, in the main thread."""

    seen: int = 0
    dicom: int = 0
    not_dicom: int = 0
    skipped: int = 0
    processed: int = 0
    errors: int = 0
    modified: int = 0
    written: int = 0  # generated files (a new file is not a modified one)
    unchanged: int = 0
    rejected: int = 0
    elements_changed: int = 0
    nbytes: int = 0
    busy_seconds: float = 0.0
    litter_removed: int | None = None  # a resuming SAR: its predecessor's temporary files
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, r: FileResult) -> None:
        """Count one result."""
        self.busy_seconds += r.seconds
        if r.status == Status.SKIPPED:  # leftover temporary files, symlinks: not files of the tree
            self.skipped += 1
            return
        self.seen += 1
        if r.status == Status.NOT_DICOM:
            self.not_dicom += 1
            return
        if r.status == Status.ERROR:
            self.errors += 1
            return
        self.dicom += 1
        self.processed += 1
        self.nbytes += r.nbytes
        if r.status == Status.MODIFIED:
            self.modified += 1
            self.elements_changed += len(r.changes)
        elif r.status == Status.WRITTEN:
            self.written += 1
        elif r.status == Status.UNCHANGED:
            self.unchanged += 1
        elif r.status == Status.REJECTED:
            self.rejected += 1

    def summary(self, opts: Options) -> dict[str, Any]:
        """The end-of-run numbers as a dict (also the --summary-json content)."""
        total = time.perf_counter() - self.started
        done = max(1, self.processed + self.errors)
        data: dict[str, Any] = {
            "mode": opts.mode, "files_seen": self.seen, "dicom_files": self.dicom,
            "skipped_not_dicom": self.not_dicom, "skipped_other": self.skipped,
            "processed": self.processed, "errors": self.errors,
            "avg_ms_per_file": round(1000 * self.busy_seconds / done, 3),
            "total_seconds": round(total, 3),
            "files_per_second": round(self.processed / total, 1) if total > 0 else 0.0,
            "mb_per_second": round(self.nbytes / 1e6 / total, 2) if total > 0 else 0.0,
            "workers": opts.workers, "free_threaded": gil_disabled(),
            "dry_run": opts.dry_run}
        if opts.shard:
            data["shard"] = f"{opts.shard[0]}/{opts.shard[1]}"
        if opts.mode in ("sar", "deid"):
            data |= {"modified" if not opts.dry_run else "would_modify": self.modified,
                     "elements_changed": self.elements_changed,
                     "rejected" if not opts.dry_run else "would_reject": self.rejected,
                     "unchanged": self.unchanged}
            if self.litter_removed is not None:
                data["temporary_files_removed"] = self.litter_removed
        if opts.mode == "deid_audit":
            data["with_identifying_data"] = self.rejected
        if opts.mode == "generate":
            data |= {"files_written": self.written, "deliberately_absent": self.skipped}
        return data


RED, BOLD = "31", "1"


def paint(text: str, code: str, *, first_line_only: bool = False) -> str:
    """ANSI colour only when stderr is a terminal and NO_COLOR is unset (no-color.org)."""
    if not sys.stderr.isatty() or os.environ.get("NO_COLOR"):
        return text
    head, sep, rest = text.partition("\n") if first_line_only else (text, "", "")
    return f"\033[{code}m{head}\033[0m{sep}{rest}"


def render_summary(data: dict[str, Any]) -> str:
    """A compact, aligned table of the summary, sizes and times in human units (the JSON
    keeps the raw numbers under the same keys)."""
    rows = []
    for key, value in data.items():
        label, show = HUMAN.get(key, (key.replace("_", " "), None))
        if show is not None:
            rows.append((label, show(value)))
        else:
            rows.append((label, ("yes" if value else "no") if isinstance(value, bool) else value))
    width = max(len(label) for label, _ in rows)
    return "summary\n" + "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)


def human_size(n: float) -> str:
    """2.34 GB (decimal units, as disks and networks count)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.2f} {unit}"
        n /= 1000
    return ""


def human_time(seconds: float) -> str:
    """0.42 s, 2 min 15 s, 1 h 02 min."""
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


HUMAN: dict[str, tuple[str, Callable[[Any], str]]] = {  # summary key: console label, format
    "total_seconds": ("total time", human_time),
    "total_time_ms": ("total time", lambda ms: human_time(ms / 1000)),
    "total_bytes": ("total size", human_size),
    "mb_per_second": ("throughput", lambda v: f"{v:.1f} MB/s"),
    "throughput_mbps": ("throughput", lambda v: f"{v:.1f} MB/s"),
    "avg_ms_per_file": ("avg per file", lambda v: f"{v:.2f} ms"),
    "average_transfer_time_ms": ("avg per file", lambda v: f"{v:.2f} ms"),
    "files_per_second": ("files per second", lambda v: f"{v:,.1f}"),
}


def setup_logging(opts: Options) -> list[Path]:
    """dicom_sar.log (INFO/DEBUG) and errors.log in the log dir, mode 0600; libraries quiet."""
    opts.log_dir.mkdir(parents=True, exist_ok=True)
    names = [LOG_NAME, ERROR_LOG_NAME]
    if opts.shard:  # dicom_sar.shard-3-of-8.log: shards share a log directory
        names = [n.replace(".log", f".{shard_tag(opts.shard)}.log") for n in names]
    paths = [opts.log_dir / n for n in names]
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    for logger, path in zip((log, errlog), paths, strict=True):
        for old in list(logger.handlers):
            logger.removeHandler(old)
            old.close()
        logger.addHandler(log_handler(path, fmt))
        logger.propagate = False
    log.setLevel(logging.DEBUG if opts.verbose else logging.INFO)
    errlog.setLevel(logging.INFO)
    for name in ("pydicom", "pynetdicom"):
        logging.getLogger(name).setLevel(logging.DEBUG if opts.verbose else logging.WARNING)
    return paths


def log_handler(path: Path, fmt: logging.Formatter) -> logging.FileHandler:
    """A log file of ours, created mode 0600, UTF-8. A file name that is not UTF-8 goes in as
    its own bytes, as on stdout (strict encoding dropped the line with a 'Logging error')."""
    os.close(os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600))
    handler = logging.FileHandler(path, encoding="utf-8", errors="surrogateescape")
    handler.setFormatter(fmt)
    return handler


# One bar style for every mode: files as words, or bytes, with the total once it is known
OPEN_FILES = "{desc}{n:,} files [{elapsed}, {rate_fmt}]"
KNOWN_FILES = ("{desc}{percentage:3.0f}%|{bar}| {n:,}/{total:,} files "
               "[{elapsed}<{remaining}, {rate_fmt}]")
KNOWN_BYTES = ("{desc}{percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B "
               "[{elapsed}<{remaining}, {rate_fmt}]")


class NullBar:
    """What stands for the bar when none is shown (a pipe, a log, -q): tqdm is not loaded."""

    n, total = 0, None

    def update(self, n: int = 1) -> None:
        """Nothing to show."""

    clear = close = refresh = update
    learn_total = update


class Bar:
    """A tqdm bar on stderr (a terminal only), open-ended until it learns its total."""

    def __init__(self, total: int | None, desc: str, in_bytes: bool):
        from tqdm import tqdm

        fmt = KNOWN_BYTES if in_bytes else KNOWN_FILES if total is not None else OPEN_FILES
        self.tqdm = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                         leave=False, bar_format=fmt, unit="B" if in_bytes else " files",
                         unit_scale=in_bytes, unit_divisor=1000)
        self.update, self.clear, self.refresh = (self.tqdm.update, self.tqdm.clear,
                                                 self.tqdm.refresh)

    @property
    def n(self) -> int:
        return self.tqdm.n

    @property
    def total(self) -> int | None:
        return self.tqdm.total

    def learn_total(self, total: int) -> None:
        """The walk's count is in: n/total, the percentage and the time left from now on."""
        self.tqdm.total = max(total, self.tqdm.n)
        self.tqdm.bar_format = KNOWN_FILES
        self.tqdm.refresh()

    def close(self) -> None:
        """The last frame reads total/total (the walk may have raced a change), then goes."""
        if self.tqdm.total is not None and self.tqdm.n != self.tqdm.total:
            self.tqdm.total = self.tqdm.n
        self.tqdm.refresh()
        self.tqdm.close()


def progress_bar(opts: Options, total: int | None = None, desc: str = "",
                 in_bytes: bool = False) -> Bar | NullBar:
    """The run's bar, or nothing when stderr is not a terminal (or --no-progress, -q)."""
    return Bar(total, desc, in_bytes) if opts.progress else NullBar()


def countable(opts: Options) -> bool:
    """Whether a counting walk can run ahead (a bar is shown; stdin is read once only)."""
    return opts.progress and opts.files_from != "-"


class WalkCount:
    """A second, cheap walk of the same tree in a thread of its own, counting what the real
    walk will yield, so the bar learns its total while the real walk streams. It holds two
    numbers (never paths); only the main thread reads them."""

    def __init__(self, opts: Options, excluded: list[Path]):
        self.count = 0
        self.finished = threading.Event()  # set once count is final
        self.thread = threading.Thread(target=self.run, args=(opts, excluded), daemon=True,
                                       name=f"{PROG}-count")
        self.thread.start()

    @property
    def done(self) -> bool:
        """Whether the count is final."""
        return self.finished.is_set()

    def run(self, opts: Options, excluded: list[Path]) -> None:
        for count, _ in enumerate(discover(opts, excluded), start=1):
            self.count = count
        self.finished.set()


def render_count(counter: collections.Counter[tuple[str, str]], out: Callable[[str], None]) -> None:
    """Print a --count histogram like 'sort | uniq -c | sort -rn'."""
    for (label, value), n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])):
        out(f"{n:7d} {label} {value if value else '(absent)'}")


class Reporter:
    """Consumes results in the main thread: output, logs, counters and progress."""

    def __init__(self, opts: Options, out: Callable[[str], None], total: int | None = None,
                 count: WalkCount | None = None):
        self.opts, self.out = opts, out
        self.stats = Stats()
        self.counter: collections.Counter[tuple[str, str]] = collections.Counter()
        self.bar = progress_bar(opts, total)
        self.count = count if total is None else None
        self.last_status = time.monotonic()

    def handle(self, r: FileResult) -> None:
        """Account for one finished file."""
        self.stats.add(r)
        self.bar.update(1)
        if self.count is not None and self.count.done:
            self.bar.learn_total(self.count.count)
            self.count = None
        if r.status == Status.NOT_DICOM:
            log.debug("skipped (not DICOM): %s", r.path)
        elif r.status == Status.SKIPPED:
            log.info("skipped: %s: %s", r.path, r.message)
        elif r.status == Status.ERROR:
            self.error(r.path, r.error_type or "Error", r.message)
        elif r.status == Status.REJECTED:
            for why in r.rejections:
                self.error(r.path, "Rejected", why)
        for line in r.lines:
            self.out(line)
        for item in r.values:
            self.counter[item] += 1
        if r.changes:
            self._changes(r)
        if not self.opts.progress and time.monotonic() - self.last_status > 5:
            self.last_status = time.monotonic()
            log.info("progress: %d files, %d errors", self.stats.seen, self.stats.errors)

    def _changes(self, r: FileResult) -> None:
        if self.opts.dry_run:
            for c in r.changes:
                self.out(f"{r.path}  {c.label}  " + (f"{c.old!r} -> {c.new!r}" if not c.action
                                                     else self.action_of(c)))
            for why in r.rejections:
                self.out(f"{r.path}  REJECTED  {why}")
        if r.status == Status.MODIFIED and not self.opts.dry_run:
            tags = ", ".join(c.label for c in r.changes)
            log.info("modified: %s: %s", r.path, tags)
            if self.opts.verbose:
                for c in r.changes:
                    log.debug("  %s %r -> %r", c.label, c.old, c.new)

    def action_of(self, c: Change) -> str:
        """A --deid change in a preview: what happened to the tag; values only for --verbose."""
        if self.opts.verbose and (c.old or c.new):
            return f"{c.action}  {c.old!r} -> {c.new!r}"
        return c.action

    def error(self, path: Path, kind: str, message: str) -> None:
        """One line in errors.log and on stderr, the file named in the run's log."""
        line = f"{path}: {kind}: {message}"
        errlog.error(line)
        log.warning("error: %s: %s", path, kind)
        self.bar.clear()
        print(f"{paint('error:', RED)} {line}", file=sys.stderr)

    def close_bar(self) -> None:
        """The walk is over: its count is due any moment, for the last frame."""
        if self.count is not None:
            self.count.thread.join(timeout=1.0)
            if self.count.done:
                self.bar.learn_total(self.count.count)
            self.count = None
        self.bar.close()
        self.bar = NullBar()

    def next_phase(self, total: int, desc: str, in_bytes: bool = False) -> Bar | NullBar:
        """A second pass after the walk's (--send's transfer): a bar of its own, the errors
        reported as the walk's are; the caller updates and closes it."""
        self.close_bar()
        self.bar = progress_bar(self.opts, total, desc=desc, in_bytes=in_bytes)
        return self.bar

    def finish(self) -> dict[str, Any]:
        """Close the bar, print --count output and the summary; return the summary."""
        self.close_bar()
        if self.opts.count:
            render_count(self.counter, self.out)
        data = self.stats.summary(self.opts)
        log.info("summary: %s", json.dumps(data))
        if self.opts.summary_json:  # before the terminal, whose reader may be gone
            write_summary(data, self.opts.summary_json)
        if not self.opts.quiet:
            print(paint(render_summary(data), BOLD, first_line_only=True), file=sys.stderr)
        return data


def write_summary(data: Mapping[str, Any], path: Path) -> None:
    """A --summary-json file: the summary's raw numbers, indented, written atomically."""
    write_bytes_atomic((json.dumps(data, indent=2) + "\n").encode(), path, fsync=False)


def exit_status(stats: Stats) -> int:
    """0 when every DICOM file was handled, 1 when any failed or was rejected."""
    return EXIT_FAILURES if stats.errors or stats.rejected else EXIT_OK

def over_the_walk(opts: Options, task: Callable[[Candidate, Options], FileResult],
                  out: Callable[[str], None], stop: StopSignal, log_paths: list[Path],
                  journal: Journal | None = None,
                  also: Callable[[FileResult], None] | None = None,
                  claim: Callable[[FileResult], str] | None = None) -> Reporter:
    """Discover, run task on the pool, commit what it staged (with journal: a writing run)
    and report each file in walk order (and hand it to also); the reporter is returned
    unfinished."""
    excluded = excluded_locations(opts, log_paths)
    reporter = Reporter(opts, out, count=WalkCount(opts, excluded) if countable(opts) else None)
    litter = Litter(journal.key) if journal is not None and (opts.resume or opts.restart) \
        else None
    committer = Committer(journal is not None and opts.fsync, journal, claim)
    results = run_ordered(discover(opts, excluded), lambda c: task(c, opts), opts.workers,
                          stop.event, opts.time_limit,
                          ahead=committer.batch_files if journal is not None else None)
    for result in committed(results, committer):
        if litter is None or not litter.claims(result):
            reporter.handle(result)
            if also is not None:
                also(result)
    if litter is not None:
        reporter.stats.litter_removed = litter.remove([opts.output, opts.backup])
    if stop.signum:
        log.warning("stopped by %s; files in flight were finished", stop.cause())
        if journal is not None:
            print(f"stopped by {stop.cause()}: in-flight files finished; rerun with --resume "
                  "to continue", file=sys.stderr)
        elif stop.signum != signal.SIGPIPE:  # after `| head` the reader asked for no more
            print(f"stopped by {stop.cause()}: in-flight files finished", file=sys.stderr)
    return reporter


# ════════════════════════════════════════════════════════════════════════════════════════
# Mode --dump: per-file lines like dcmdump's (DCMTK 3.6), JSON, or values for --count; the
# renderer also serves the --sar preview
# ════════════════════════════════════════════════════════════════════════════════════════


VALUE_WIDTH, LINE_WIDTH = 40, 70  # DCMTK's DCM_OptPrintValueLength / DCM_OptPrintLineLength
_BINARY_FORMATS = {"US": ("H", "{}"), "SS": ("h", "{}"), "UL": ("L", "{}"), "SL": ("l", "{}"),
                   "UV": ("Q", "{}"), "SV": ("q", "{}"), "FL": ("f", "{:.9g}"),
                   "FD": ("d", "{:.17g}"), "OF": ("f", "{:.9g}"), "OD": ("d", "{:.17g}"),
                   "OL": ("L", "{}"), "OV": ("Q", "{}")}
_DCMTK_TS_NAMES = {  # DCMTK names the four uncompressed transfer syntaxes differently
    "1.2.840.10008.1.2": "LittleEndianImplicit", "1.2.840.10008.1.2.1": "LittleEndianExplicit",
    "1.2.840.10008.1.2.2": "BigEndianExplicit",
    "1.2.840.10008.1.2.1.99": "DeflatedLittleEndianExplicit"}


def dump_line(tag: int, vr: str, info: str, length: int, vm: int, level: int,
              name: str | None = None) -> str:
    """One dcmdump line: tag, VR, value (padded to 40), then '# length, vm name'."""
    shown = len(info.encode("utf-8", "surrogateescape"))
    pad = " " * max(0, VALUE_WIDTH - shown)
    ln = "u/l" if length == 0xFFFFFFFF else f"{length:3d}"
    return (f"{'  ' * level}({tag >> 16:04x},{tag & 0xFFFF:04x}) {vr} {info}{pad} # {ln},"
            f"{vm:2d} {name or keyword_of(tag)}")


def shorten_bytes(text: str, limit: int) -> str:
    """Cut text to limit UTF-8 bytes, as DCMTK does (it counts bytes, not characters)."""
    raw = text.encode("utf-8", "surrogateescape")
    return raw[:limit].decode("utf-8", "surrogateescape")


def render_value(raw: RawDataElement, vr: str, encodings: list[str]) -> tuple[str, int]:
    """The printed value of a non-sequence element and its VM, as dcmdump prints them."""
    value = raw.value if isinstance(raw.value, bytes) else b""
    if not value:  # dcmdump counts an empty binary value as one value, an empty string as none
        return "(no value available)", 0 if vr in STRING_VRS or vr in ("AT", "SQ") or \
            (vr in _BINARY_FORMATS and not vr.startswith("O")) else 1
    if vr in STRING_VRS:
        # as dcmdump: trailing spaces are padding, a trailing NUL is shown (outside UIDs)
        text = decode_text(value, vr, encodings, padding=b" ")
        if not text:
            return "(no value available)", 0
        vm = 1 if vr in SINGLE_VALUE_VRS else text.count("\\") + 1
        if vr == "UI" and text in UID_DICTIONARY:
            return "=" + (_DCMTK_TS_NAMES.get(text) or UID_DICTIONARY[text][4]), vm
        if len(text.encode("utf-8", "surrogateescape")) + 2 > LINE_WIDTH:
            return "[" + shorten_bytes(text, LINE_WIDTH - 4) + "...", vm
        return f"[{text}]", vm
    order = "<" if raw.is_little_endian else ">"
    if vr in ("OB", "UN") or (vr not in _BINARY_FORMATS and vr not in ("OW", "AT")):
        return _hex_values(value, 1, order), 1
    if vr == "OW":
        return _hex_values(value, 2, order), 1
    if vr == "AT":
        count = len(value) // 4
        words = struct.unpack(f"{order}{count * 2}H", value[: count * 4])
        items = [f"({words[i]:04x},{words[i + 1]:04x})" for i in range(0, len(words), 2)]
        return _joined(items, count), count
    code, fmt = _BINARY_FORMATS[vr]
    size = struct.calcsize("<" + code)
    count = len(value) // size
    numbers = struct.unpack(f"{order}{count}{code}", value[: count * size])
    shown = _joined([fmt.format(n) for n in numbers], count)
    return shown, (1 if vr.startswith("O") else count)


def _hex_values(value: bytes, width: int, order: str) -> str:
    count = len(value) // width
    show = count
    if count * (2 * width + 1) - 1 > LINE_WIDTH:
        show = (LINE_WIDTH - 3 + 1) // (2 * width + 1)
    if width == 1:
        items = [f"{b:02x}" for b in value[:show]]
    else:
        items = [f"{w:04x}" for w in struct.unpack(f"{order}{show}H", value[: show * 2])]
    return "\\".join(items) + ("..." if show < count else "")


def _joined(items: list[str], count: int) -> str:
    out, printed = [], 0
    for i, item in enumerate(items):
        piece = item if i == 0 else "\\" + item
        new = printed + len(piece)
        if new <= LINE_WIDTH and (i + 1 == count or new + 3 <= LINE_WIDTH):
            out.append(piece)
            printed = new
        else:
            out.append("...")
            break
    return "".join(out)


def element_lines(ds: Dataset, tag: int, level: int, layout: Layout) -> list[str]:
    """dcmdump lines of one element of ds: one line, or a sequence with its items."""
    raw = ds.get_item(tag)
    vr = element_vr(raw, ds)
    length = getattr(raw, "length", 0) if isinstance(raw, RawDataElement) else 0
    if vr == "SQ" or (isinstance(raw, DataElement) and raw.VR == "SQ"):
        return sequence_lines(ds, tag, level, layout)
    if length == 0xFFFFFFFF and isinstance(raw, RawDataElement):
        return pixel_sequence_lines(raw, vr, level)
    if not isinstance(raw, RawDataElement):
        raw = raw_of(ds[tag], ds)
    info, vm = render_value(raw, vr, charset_of(ds))
    return [dump_line(tag, vr, info, printed_length(raw, vr, charset_of(ds)), vm, level,
                      keyword_of(tag, creator_of(ds, tag)))]


def printed_length(raw: RawDataElement, vr: str, encodings: list[str]) -> int:
    """The length dcmdump +U8 reports: the length in the file, padding included, unless it
    converts the value (one with bytes outside ASCII) to UTF-8 (without its trailing spaces,
    padded even)."""
    if vr not in TEXT_VRS or not raw.value or (raw.value.isascii() and b"\x1b" not in raw.value) \
            or encodings in (["UTF8"], [DEFAULT_ENCODING]):
        return raw.length
    text = decode_text(raw.value, vr, encodings, padding=b" ")
    size = len(text.encode("utf-8", "surrogateescape"))
    return size + size % 2


def raw_of(elem: DataElement, ds: Dataset) -> RawDataElement:
    """Encode a converted element back to raw bytes (for printing after a change)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_data_element(fp, elem, charset_of(ds))
    value = fp.getvalue()[8:]
    return RawDataElement(BaseTag(elem.tag), elem.VR, len(value), value, 0, False, True)


def sequence_lines(ds: Dataset, tag: int, level: int, layout: Layout) -> list[str]:
    """A sequence, its items and delimiters, as dcmdump shows them."""
    seq = layout.sequence(ds, tag)
    items = seq.value or []
    length = layout.sequence_length(seq)
    undefined = length == 0xFFFFFFFF or getattr(seq, "is_undefined_length", False)
    kind = "undefined" if undefined else "explicit"
    lines = [dump_line(tag, "SQ", f"(Sequence with {kind} length #={len(items)})",
                       0xFFFFFFFF if undefined else length, 1, level)]
    for item in items:
        item_undefined = getattr(item, "is_undefined_length_sequence_item", False)
        kind = "undefined" if item_undefined else "explicit"
        length = 0xFFFFFFFF if item_undefined else \
            layout.item_length(item) or item_length(item)
        lines.append(dump_line(0xFFFEE000, "na", f"(Item with {kind} length #={len(item)})",
                               length, 1, level + 1, "Item"))
        for sub in item.keys():
            lines.extend(element_lines(item, sub, level + 2, layout))
        end = "(ItemDelimitationItem)" if item_undefined else \
            "(ItemDelimitationItem for re-encoding)"
        lines.append(dump_line(0xFFFEE00D, "na", end, 0, 0, level + 1, "ItemDelimitationItem"))
    end = "(SequenceDelimitationItem)" if undefined else "(SequenceDelimitationItem for re-encod.)"
    lines.append(dump_line(0xFFFEE0DD, "na", end, 0, 0, level, "SequenceDelimitationItem"))
    return lines


def pixel_sequence_lines(raw: RawDataElement, vr: str, level: int) -> list[str]:
    """Encapsulated pixel data: one 'pi' line per fragment (the offset table first)."""
    order = "<" if raw.is_little_endian else ">"
    fragments = list(generate_fragments(raw.value or b"", endianness=order))
    lines = [dump_line(raw.tag, vr, f"(PixelSequence #={len(fragments)})", 0xFFFFFFFF, 1, level)]
    for fragment in fragments:
        info = _hex_values(fragment, 1, order) if fragment else "(no value available)"
        lines.append(dump_line(0xFFFEE000, "pi", info, len(fragment), 1, level + 1, "Item"))
    lines.append(dump_line(0xFFFEE0DD, "na", "(SequenceDelimitationItem)", 0, 0, level,
                           "SequenceDelimitationItem"))
    return lines


def fast_tagged_lines(path: str | Path, specs: tuple[TagSpec, ...]) -> tuple[list[str] | None, int]:
    """dcmdump +P lines by raw scan: (lines, size); lines None for not-DICOM files.

    Raises RawScanError when the file should go the pydicom way.
    """
    scan, size = raw_scan(path, table(s.leaf.tag for s in specs))
    if scan is None:
        return None, size
    lines = []
    for spec in specs:
        for tag, raw, vr, encodings in scan.hits:
            if tag == spec.leaf.tag:
                info, vm = render_value(raw, vr, encodings)
                lines.append(dump_line(tag, vr, info, printed_length(raw, vr, encodings), vm, 0))
    return lines, size


def dump_options(ns: argparse.Namespace, specs: tuple[TagSpec, ...]) -> dict[str, Any]:
    """The dump-specific part of Options: the output form, and whether the raw scanner
    alone can answer (a plain text tag dump)."""
    if ns.count and not specs:
        raise UsageError("--count needs --tag (e.g. --count --tag PatientID)")
    if ns.count and ns.format == "json":
        raise UsageError("--count and --format json do not go together; pick one")
    return dict(fmt=ns.format, with_filename=ns.with_filename, count=ns.count,
                fast=bool(specs) and ns.format == "text" and not ns.count
                and not wants_pixels(specs) and fast_specs_ok(specs))

def wants_pixels(specs: tuple[TagSpec, ...]) -> bool:
    """A tag dump stops before pixel data; a full dump shows its first values, like dcmdump."""
    return not specs or any(s.steps[0].tag >= 0x7FE00010 for s in specs)


def dump_task(cand: Candidate, opts: Options) -> FileResult:
    """Read one file's header and render what --dump was asked for."""
    if opts.fast:  # a plain text tag dump: the raw scanner may answer
        try:
            lines, size = fast_tagged_lines(cand.file, opts.specs)
        except RAW_FALLBACK:
            lines = None  # pydicom decides, and reports what is wrong with the file
        else:
            if lines is None:
                return FileResult(cand.path, Status.NOT_DICOM, nbytes=size)
            return dumped(cand, size, lines, opts)
    load_pydicom()  # the pydicom path (a raw dump's worker may be the first to take it)
    ds, size, kind = whole(cand.file, read_dataset(cand.file,
                                                   header_only=not wants_pixels(opts.specs)))
    if ds is None:
        return FileResult(cand.path, Status.NOT_DICOM, nbytes=size)
    if opts.count:
        return FileResult(cand.path, Status.OK, nbytes=size, values=tuple(count_values(ds, opts)))
    if opts.fmt == "json":
        return FileResult(cand.path, Status.OK, nbytes=size,
                          lines=(json_line(cand.path, ds, opts),))
    return dumped(cand, size, tagged_lines(ds, opts.specs) if opts.specs
                  else full_dump_lines(ds, kind), opts)


def dumped(cand: Candidate, size: int, lines: list[str], opts: Options) -> FileResult:
    """A dump result, each line prefixed with its path under --with-filename."""
    if opts.with_filename:
        lines = [f"{cand.path}: {line}" for line in lines]
    return FileResult(cand.path, Status.OK, nbytes=size, lines=tuple(lines))


def tagged_lines(ds: Dataset, specs: Iterable[TagSpec]) -> list[str]:
    """Like dcmdump +P: per spec, every instance at every depth, unindented, file order."""
    lines, layout = [], Layout()
    for spec in specs:
        for _, container in all_datasets_of(ds):
            for owner, tag in find_elements(container, spec, deep=spec.plain, layout=layout):
                lines.extend(element_lines(owner, tag, 0, layout))
    return lines


def full_dump_lines(ds: Dataset, kind: str | None) -> list[str]:
    """The whole header like dcmdump: file meta, then the dataset, nested items indented."""
    # dcmdump reads every file as a file format: a file without file meta shows an empty one
    layout = Layout()
    lines = ["", "# Dicom-File-Format", "", "# Dicom-Meta-Information-Header",
             "# Used TransferSyntax: " + ("Little Endian Explicit" if getattr(
                 ds, "file_meta", None) else "Unknown Transfer Syntax")]
    for part, container in all_datasets_of(ds):
        if part == "data":
            lines += ["", "# Dicom-Data-Set", f"# Used TransferSyntax: {transfer_syntax_name(ds)}"]
        for tag in container.keys():
            lines.extend(element_lines(container, tag, 0, layout))
    return lines


def transfer_syntax_name(ds: Dataset) -> str:
    """The dataset's transfer syntax, named like DCMTK's 'Used TransferSyntax' line."""
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is not None:
        return uid.name
    implicit = ds.original_encoding[0]
    return "Little Endian Implicit" if implicit else "Little Endian Explicit"


def json_line(path: Path, ds: Dataset, opts: Options, bulk_limit: int = 1024) -> str:
    """One DICOM JSON (PS3.18 Annex F) object for the file: the file meta and the dataset,
    or what --tag names (sequence paths as the items they go through). pydicom decides what
    is bulk data: a value over bulk_limit bytes becomes a BulkDataURI naming file and tag."""
    meta = getattr(ds, "file_meta", None) or Dataset()
    if opts.specs:
        selected = Dataset()
        for spec in opts.specs:
            container = meta if spec.steps[0].tag >> 16 == 0x0002 else ds
            merge_into(selected, picked(container, spec.steps))
    else:
        selected = Dataset()
        for container in (meta, ds):
            for elem in container:
                selected.add(elem)
    selected.set_original_encoding(*ds.original_encoding, ds.original_character_set)
    uri = Path(os.path.abspath(path)).as_uri()
    return json.dumps({"path": str(path), "dataset": selected.to_json_dict(
        bulk_limit, lambda elem: f"{uri}#{elem.tag:08X}")}, ensure_ascii=False)


def picked(ds: Dataset, steps: tuple[Step, ...]) -> Dataset:
    """A copy of the part of ds a tag path goes through: the element it names, inside the
    items (all, or the one chosen) of the sequences on the way."""
    out = Dataset()
    tag = resolve_step(ds, steps[0])
    if tag is None or tag not in ds:
        return out
    if len(steps) == 1:
        out.add(ds[tag])
        return out
    if not is_sequence(ds, tag):
        return out
    items = ds[tag].value or []
    chosen = items if steps[0].item is None else items[steps[0].item: steps[0].item + 1]
    out.add(DataElement(tag, "SQ", pydicom.Sequence(picked(item, steps[1:]) for item in chosen)))
    return out


def merge_into(target: Dataset, part: Dataset) -> None:
    """Add part's elements to target; sequences both hold merge item by item."""
    for elem in part:
        if elem.tag in target and elem.VR == "SQ" and target[elem.tag].VR == "SQ":
            mine = target[elem.tag].value
            for i, item in enumerate(elem.value):
                if i < len(mine):
                    merge_into(mine[i], item)
                else:
                    mine.append(item)
        else:
            target.add(elem)


def count_values(ds: Dataset, opts: Options) -> Iterator[tuple[str, str]]:
    """(spec label, value) for every selected element; (label, '') when a file lacks it."""
    for spec in opts.specs:
        found = False
        for _, container in all_datasets_of(ds):
            for owner, tag in find_elements(container, spec, deep=spec.plain):
                found = True
                info, _ = render_value_of(owner, tag)
                yield spec_label(spec), info
        if not found:
            yield spec_label(spec), ""


def render_value_of(ds: Dataset, tag: int) -> tuple[str, int]:
    """The dcmdump-style printed value of ds[tag] (sequences summarised)."""
    raw = ds.get_item(tag)
    vr = element_vr(raw, ds)
    if vr == "SQ":
        return f"(Sequence #={len(ds[tag].value or [])})", 1
    if not isinstance(raw, RawDataElement):
        raw = raw_of(ds[tag], ds)
    return render_value(raw, vr, charset_of(ds))


def spec_label(spec: TagSpec) -> str:
    """'(0010,0020) PatientID' for a plain tag, the DCMTK path otherwise."""
    if spec.plain and spec.leaf.creator is None:
        return f"{spec.label()} {keyword_of(spec.leaf.tag)}"
    return spec.label()


def run_dump(opts: Options, out: Callable[[str], None], stop: StopSignal,
             log_paths: list[Path]) -> int:
    """Dump every file of the walk, in walk order; nothing is written but the logs."""
    reporter = over_the_walk(opts, dump_task, out, stop, log_paths)
    reporter.finish()
    return stop.exit_status() or exit_status(reporter.stats)


# ════════════════════════════════════════════════════════════════════════════════════════
# Mode --sar: plan every change in a file, validate all of it, then write it or nothing
# ════════════════════════════════════════════════════════════════════════════════════════


def sar_options(ns: argparse.Namespace, specs: tuple[TagSpec, ...]) -> dict[str, Any]:
    """The SAR-specific part of Options: regex, targets and where writes go."""
    if ns.regex_search is None or ns.regex_replace is None:
        raise UsageError("--sar needs --regex_search PATTERN and --regex_replace REPL")
    try:
        pattern = re.compile(ns.regex_search)
    except re.error as exc:
        raise UsageError(f"--regex_search {ns.regex_search!r}: {exc.msg} at position {exc.pos}; "
                         "fix the pattern (Python re syntax)") from None
    try:
        pattern.sub(ns.regex_replace, "")  # checks backreferences against the pattern's groups
    except (re.error, IndexError) as exc:
        raise UsageError(f"--regex_replace {ns.regex_replace!r}: {exc}; "
                         f"the pattern has {pattern.groups} group(s)") from None
    if not specs and not ns.force:
        raise UsageError("no --tag given: SAR on every string element needs --force "
                         "(or give --tag PatientID)")
    for spec in specs:
        entry = dictionary_entry(spec.leaf.tag) if spec.leaf.creator is None else None
        if entry is not None and not any(vr in STRING_VRS for vr in entry[0].split(" or ")):
            raise UsageError(f"--tag {spec.text}: VR {entry[0]} is not a string VR; "
                             "SAR changes string values only")
    return dict(pattern=pattern, replacement=ns.regex_replace, deep=ns.deep,
                all_strings=not specs, copy_unmodified=ns.copy_unmodified,
                fast=bool(specs) and not ns.deep and fast_specs_ok(specs),
                **write_targets(ns, DEFAULT_OUTPUT))


def write_targets(ns: argparse.Namespace, default_output: str) -> dict[str, Any]:
    """Where a writing mode's files go: an output tree, or in place with a backup tree,
    neither of which may hold the other or the scanned tree."""
    if ns.inplace and ns.output:
        raise UsageError("--inplace and --output exclude each other; pick one")
    output = None if ns.inplace else Path(ns.output or default_output)
    backup = None
    if ns.inplace and not ns.no_backup:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        backup = Path(ns.backup_dir) if ns.backup_dir else Path(DEFAULT_BACKUP) / stamp
    for root in (Path(p) for p in (ns.path or ["."])):
        if backup is not None and root.is_dir() and is_within(backup, root):  # dry run too
            raise UsageError(f"--backup-dir {backup} is inside the scanned tree {root}; "
                             "put backups outside it")
        if output is not None and output_holds(output, root):
            raise UsageError(f"--output {output} holds the scanned {root}: written files could "
                             "replace originals; choose an output directory outside it, or "
                             "--inplace (which keeps a backup)")
    return dict(inplace=ns.inplace, output=output, backup=backup)


@dataclasses.dataclass(frozen=True)
class Change:
    """One element whose value changes (values are shown only where the user asked)."""

    label: str  # "(0010,0020) PatientID"
    old: str
    new: str
    action: str = ""  # --deid: removed, emptied, replaced, shifted, cleaned


@dataclasses.dataclass(frozen=True)
class Planned:
    """A change ready to apply: where, which tag, and the new value(s)."""

    owner: Dataset
    tag: int
    vr: str
    encoded: bytes
    change: Change
    value_offset: int | None  # where the old value starts in the file (None: unknown)
    length_fields: tuple[int, ...]  # the 4-byte lengths that enclose it (Layout.length_fields)


def sar_task(cand: Candidate, opts: Options) -> FileResult:
    """Search/replace one file: plan, validate (all or nothing), then write or preview."""
    target = cand.path if opts.inplace else output_path(cand, opts)
    if opts.journal is not None and opts.journal.completed(cand.path, target):
        return FileResult(cand.path, Status.SKIPPED, message="completed by the interrupted run")
    stamp = file_stamp(cand.path)
    ds, size, _ = sar_header(cand.path, opts)
    if ds is None:
        return FileResult(cand.path, Status.NOT_DICOM, nbytes=size)
    planned, rejections = plan_changes(ds, opts)
    if rejections:
        return FileResult(cand.path, Status.REJECTED, nbytes=size, rejections=tuple(rejections),
                          changes=tuple(p.change for p in planned), error_type="InvalidValue",
                          message=rejections[0])
    if not planned:
        staged = None
        if opts.copy_unmodified and not opts.dry_run and opts.output is not None:
            staged = stage_copy(cand.path, output_path(cand, opts), tag=run_tag(opts),
                                writable=True)
        return FileResult(cand.path, Status.UNCHANGED, nbytes=size, staged=staged)
    changes = tuple(p.change for p in planned)
    if opts.dry_run:
        return FileResult(cand.path, Status.MODIFIED, nbytes=size, changes=changes)
    patches = splice_patches(cand.path, ds, planned)
    if patches is None:  # e.g. deflated: pydicom rewrites the whole file
        ds, size, _ = read_dataset(cand.path, header_only=False)
        planned, _ = plan_changes(ds, opts)
        apply_changes(ds, planned)

    def write(out: BinaryIO) -> None:
        if file_stamp(cand.path) != stamp:
            raise RuntimeError("the file changed while it was being processed; left as it is")
        if patches is not None:
            write_spliced(cand.path, out, patches)
        else:
            write_dataset(ds, out)

    if opts.inplace:
        staged = stage_in_place(cand, opts, write)
    else:
        staged = stage_atomic(target, write, like=cand.path, tag=run_tag(opts), writable=True,
                              source=cand.path)
    return FileResult(cand.path, Status.MODIFIED, nbytes=size, changes=changes, staged=staged)


def sar_header(path: Path, opts: Options) -> tuple[Dataset | None, int, str | None]:
    """The header for planning: by raw scan for plain top-level tags, else by pydicom."""
    if opts.fast:
        return header_with(path, [s.leaf.tag for s in opts.specs])[:3]
    return whole(path, read_dataset(path, header_only=True))


def file_stamp(path: Path) -> tuple[int, int, int]:
    """Size, mtime and inode: enough to notice a file replaced under our feet."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def sar_targets(ds: Dataset, opts: Options, layout: Layout) -> Iterator[tuple[Dataset, int]]:
    """Elements the SAR applies to: the --tag specs, or every string element (--force)."""
    if opts.all_strings:
        yield from _all_string_elements(ds, layout)
        return
    seen: set[tuple[int, int]] = set()
    for spec in opts.specs:
        containers = [ds]
        if spec.leaf.tag >> 16 == 0x0002 and getattr(ds, "file_meta", None) is not None:
            containers = [ds.file_meta]
        for container in containers:
            for owner, tag in find_elements(container, spec, deep=opts.deep, layout=layout):
                if (id(owner), tag) not in seen:
                    seen.add((id(owner), tag))
                    yield owner, tag


def _all_string_elements(ds: Dataset, layout: Layout) -> Iterator[tuple[Dataset, int]]:
    for tag in list(ds.keys()):
        if is_sequence(ds, tag):
            for item in layout.sequence(ds, tag).value or []:
                yield from _all_string_elements(item, layout)
        elif element_vr(ds.get_item(tag), ds) in STRING_VRS:
            yield ds, tag


def plan_changes(ds: Dataset, opts: Options) -> tuple[list[Planned], list[str]]:
    """Compute and validate every change in ds; rejections name tag, VR and the rule."""
    planned, rejections, layout = [], [], Layout()
    meta = getattr(ds, "file_meta", None)
    assert opts.pattern is not None
    for owner, tag in sar_targets(ds, opts, layout):
        raw = owner.get_item(tag)
        vr = element_vr(raw, owner)
        if vr not in STRING_VRS:
            continue
        if not isinstance(raw, RawDataElement):
            raw = raw_of(owner[tag], owner)
        value_offset = layout.value_offset(owner, tag)  # of the element as read, not raw_of's
        encodings = charset_of(owner)
        old_text = decode_text(raw.value or b"", vr, encodings)
        old_values = [old_text] if vr in SINGLE_VALUE_VRS else old_text.split("\\")
        new_values = [opts.pattern.sub(opts.replacement, v) for v in old_values]
        if new_values == old_values or not old_text:
            continue
        label = element_label(tag)
        new_text = "\\".join(new_values)
        change = Change(label, old_text, new_text)
        encoded, problem = encode_new_values(vr, new_values, encodings)
        if problem:
            shown = f" (new value {new_text!r})" if opts.verbose else ""
            rejections.append(f"{label} VR {vr}: {problem}{shown}")
        planned.append(Planned(owner, tag, vr, encoded, change, value_offset,
                               layout.length_fields(owner, tag >> 16, meta)))
        if tag == 0x00080018 and owner is ds and meta is not None and 0x00020003 in meta:
            # dcmodify keeps MediaStorageSOPInstanceUID equal to SOPInstanceUID; so do we
            old = meta[0x00020003]
            planned.append(Planned(meta, 0x00020003, "UI", encoded, Change(
                "(0002,0003) MediaStorageSOPInstanceUID", str(old.value), new_text),
                layout.value_offset(meta, 0x00020003), layout.length_fields(meta, 0x0002, meta)))
    return planned, rejections


def encode_new_values(vr: str, values: list[str], encodings: list[str]) -> tuple[bytes, str]:
    """Validate with pydicom's VR rules, then encode exactly; (bytes, '') or (b'', problem).

    A value is accepted only if it decodes back to itself: no silent '?' substitution.
    """
    for value in values:
        try:
            pydicom.valuerep.validate_value(vr, value, pydicom.config.RAISE)
        except ValueError as exc:
            return b"", without_value(str(exc), value)
    text = values[0] if vr in SINGLE_VALUE_VRS else "\\".join(values)
    if vr not in TEXT_VRS:
        if not text.isascii():
            return b"", f"VR {vr} allows ASCII characters only"
        encoded = text.encode("ascii")
    else:
        try:
            encoded = b"\\".join(pydicom.charset.encode_string(v, encodings) for v in
                                  ([text] if vr in SINGLE_VALUE_VRS else values))
        except (UnicodeError, ValueError, KeyError):
            encoded = b""
        if (not encoded and text) or outside_repertoire(encoded, encodings) \
                or decode_text(encoded, vr, encodings) != text.rstrip(" "):
            return b"", f"not encodable in the file's character set ({', '.join(encodings)})"
    if len(encoded) % 2:
        encoded += b"\0" if vr == "UI" else b" "
    return encoded, ""


_ESCAPE_OR_TEXT = re.compile(rb"\x1b[\x20-\x2f]+[\x40-\x7e]|[^\x1b]+")


def outside_repertoire(encoded: bytes, encodings: list[str]) -> bool:
    """True when a byte >= 0x80 sits where the default repertoire (ASCII) is in force.

    pydicom encodes the default repertoire leniently as Latin-1; DICOM allows only ASCII there.
    """
    current = encodings[0]
    for chunk in _ESCAPE_OR_TEXT.findall(encoded):
        if chunk.startswith(b"\x1b"):
            current = pydicom.charset.CODES_TO_ENCODINGS.get(chunk, current)
        elif current == pydicom.charset.default_encoding and not chunk.isascii():
            return True
    return False


def without_value(message: str, value: str) -> str:
    """pydicom's validation message, one line, without the value (patient data)."""
    message = message.replace(repr(value), "the new value").replace(value, "<value>")
    message = re.sub(r"\s*Please see <[^>]*> for allowed values for each VR\.?", "", message)
    return " ".join(message.split())


def apply_changes(ds: Dataset, planned: list[Planned]) -> None:
    """Store the encoded values in ds (for the full-rewrite path)."""
    for p in planned:
        p.owner[p.tag] = raw_element(p.tag, p.vr, p.encoded)


def raw_element(tag: int, vr: str, value: bytes) -> RawDataElement:
    """A ready-encoded text element: pydicom writes raw elements byte for byte."""
    return RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)


def run_sar(opts: Options, out: Callable[[str], None], stop: StopSignal,
            log_paths: list[Path]) -> int:
    """Search/replace over the walk."""
    return run_journalled(opts, sar_task, out, stop, log_paths)


def run_journalled(opts: Options, task: Callable[[Candidate, Options], FileResult],
                   out: Callable[[str], None], stop: StopSignal, log_paths: list[Path],
                   also: Callable[[FileResult], None] | None = None,
                   claim: Callable[[FileResult], str] | None = None) -> int:
    """A mode that rewrites files (--sar, --deid) over the walk; a writing run keeps a
    journal, finished only when the walk was (so --resume can take over after a stop)."""
    journal = None if opts.dry_run else open_journal(opts)
    if journal is not None:
        opts = dataclasses.replace(opts, journal=journal.view)
        log_paths = [*log_paths, journal.path]
    try:
        reporter = over_the_walk(opts, task, out, stop, log_paths, journal, also, claim)
    except UsageError:  # the walk's first file (--files-from) told: nothing was done
        if journal is not None:
            journal.finish()
        raise
    if journal is not None and not stop.signum:
        journal.finish()
    data = reporter.finish()
    if opts.dry_run and not opts.quiet:
        print(f"dry run: would modify {data['would_modify']} files, "
              f"would reject {data['would_reject']}", file=sys.stderr)
    return stop.exit_status() or exit_status(reporter.stats)


# ════════════════════════════════════════════════════════════════════════════════════════
# Mode --deid: PS3.15 Annex E (the Application Level Confidentiality Profile) on the SAR's
# engine, keyed and stateless: the same key gives the same pseudonyms, UIDs and date shifts
# on every host, in every run. --deid-audit reports what the profile would still act on.
# ════════════════════════════════════════════════════════════════════════════════════════


# BEGIN GENERATED by tools/deid_table.py: PS3.15 Table E.1-1, do not edit
DEID_EDITION = "2024b"
DEID_OPTIONS = ("retain-safe-private", "retain-uids",
                "retain-device-identity", "retain-institution-identity",
                "retain-patient-characteristics", "retain-long-full-dates",
                "retain-long-modified-dates", "clean-descriptors",
                "clean-structured-content", "clean-graphics")
DEID_TABLE = """\
00001000 X .K........ 00001001 U .K........ 00020003 U .K........
00041511 U .K........ 00080012 X/D .....KC... 00080013 X/Z/D .....KC...
00080014 U .K........ 00080015 X .....KC... 00080017 U .K........
00080018 U .K........ 00080019 U .K........ 00080020 Z .....KC...
00080021 X/D .....KC... 00080022 X/Z .....KC... 00080023 Z/D .....KC...
00080024 X .....KC... 00080025 X .....KC... 0008002a X/Z/D .....KC...
00080030 Z .....KC... 00080031 X/D .....KC... 00080032 X/Z .....KC...
00080033 Z/D .....KC... 00080034 X .....KC... 00080035 X .....KC...
00080050 Z .......... 00080054 X ..C....... 00080055 X ..C.......
00080058 U .K........ 00080080 X/Z/D ...K...... 00080081 X ...K......
00080082 X/Z/D ...K...... 00080090 Z .......... 00080092 X ..........
00080094 X .......... 00080096 X .......... 0008009c Z ..........
0008009d X .......... 00080106 D .....KC... 00080107 D .....KC...
00080201 X .....KC... 00081000 X ..C....... 00081010 X/Z/D ..K.......
00081030 X .......C.. 0008103e X .......C.. 00081040 X ...K......
00081041 X ...K...... 00081048 X .......... 00081049 X ..........
00081050 X .......... 00081052 X .......... 00081060 X ..........
00081062 X .......... 00081070 X/Z/D .......... 00081072 X/D ..........
00081080 X .......C.. 00081084 X .......C.. 00081088 X .......C..
00081110 X/Z .K........ 00081111 X/Z/D .K........ 00081120 X .K........
00081140 X/Z/U* .K........ 00081155 U .K........ 00081195 U .K........
00082111 X .......C.. 00082112 X/Z/U* .K........ 00083010 U .K........
00084000 X .......C.. 00100010 Z .......... 00100020 Z/D ..........
00100021 X .......... 00100030 Z .......... 00100032 X ..........
00100040 Z ....K..... 00100050 X .......... 00100101 X ..........
00100102 X .......... 00101000 X .......... 00101001 X ..........
00101002 X .......... 00101005 X .......... 00101010 X ....K.....
00101020 X ....K..... 00101030 X ....K..... 00101040 X ..........
00101050 X .......... 00101060 X .......... 00101080 X ..........
00101081 X .......... 00101090 X .......... 00101100 X ..........
00102000 X .......C.. 00102110 X ....C..C.. 00102150 X ..........
00102152 X .......... 00102154 X .......... 00102155 X ..........
00102160 X ....K..... 00102180 X .......C.. 001021a0 X ....K.....
001021b0 X .......C.. 001021c0 X ....K..... 001021d0 X .....KC...
001021f0 X .......... 00102203 X/Z ....K..... 00102297 X ..........
00102299 X .......... 00104000 X .......C.. 00120010 D ..........
00120020 D .......... 00120021 Z .......... 00120022 X ..........
00120023 X .......... 00120030 Z ...K...... 00120031 Z ...K......
00120032 X .......... 00120040 D .......... 00120041 X ..........
00120042 D .......... 00120043 X .......... 00120050 Z ..........
00120051 X .......C.. 00120055 X .......... 00120060 Z ...K......
00120071 X .......... 00120072 X .......C.. 00120073 X ..........
00120081 D ...K...... 00120082 X .......... 00120086 X .....KC...
00120087 X .....KC... 0014407c X ..K..KC... 0014407e X ..K..KC...
0016002b X .......C.. 0016004b X .......C.. 0016004d X ..........
0016004e X ..K....... 0016004f X ..K....... 00160050 X ..K.......
00160051 X ..K....... 00160070 X .......... 00160071 X ..........
00160072 X .......... 00160073 X .......... 00160074 X ..........
00160075 X .......... 00160076 X .......... 00160077 X ..........
00160078 X .......... 00160079 X .......... 0016007a X ..........
0016007b X .......... 0016007c X .......... 0016007d X ..........
0016007e X .......... 0016007f X .......... 00160080 X ..........
00160081 X .......... 00160082 X .......... 00160083 X ..........
00160084 X .......... 00160085 X .......... 00160086 X ..........
00160087 X .......... 00160088 X .......... 00160089 X ..........
0016008a X .......... 0016008b X .......... 0016008c X ..........
0016008d X .....KC... 0016008e X .......... 00180010 Z/D .......C..
00180027 X .....KC... 00180035 X .....KC... 00181000 X/Z/D ..K.......
00181002 U .KK....... 00181004 X ..K....... 00181005 X ..K.......
00181007 X ..K....... 00181008 X ..K....... 00181009 X ..K.......
0018100a X ..K....... 0018100b U .KK....... 00181012 X .....KC...
00181014 X .....KC... 00181030 X/D .......C.. 00181042 X .....KC...
00181043 X .....KC... 00181072 X .....KC... 00181073 X .....KC...
00181078 X .....KC... 00181079 X .....KC... 001811bb D .......C..
00181200 X ..K..KC... 00181201 X ..K..KC... 00181202 X ..K..KC...
00181203 Z ..K..KC... 00181204 X ..K..KC... 00181205 X ..K..KC...
00181400 X/D .......C.. 00182042 U .K........ 00184000 X .......C..
00185011 X ..K....... 0018700a X/D ..K....... 0018700c X/D ..K..KC...
0018700e X/D ..K..KC... 00189074 D .....KC... 00189151 D .....KC...
00189185 X .......C.. 00189367 D ..K....... 00189369 D .....KC...
0018936a D .....KC... 00189371 D ..K....... 00189373 X ..K.......
0018937b X .......C.. 0018937f X .......C.. 00189424 X .......C..
00189516 X/D .....KC... 00189517 X/D .....KC... 00189623 D .....KC...
00189701 D .....KC... 00189804 D .....KC... 00189919 Z/D .....KC...
00189937 X .......C.. 0018a002 X .....KC... 0018a003 X .......C..
0020000d U .K........ 0020000e U .K........ 00200010 Z ..........
00200027 X .......C.. 00200052 U .K........ 00200200 U .K........
00203401 X ..K....... 00203403 X .....KC... 00203405 X .....KC...
00203406 X .......... 00204000 X .......C.. 00209158 X .......C..
00209161 U .K........ 00209164 U .K........ 00281199 U .K........
00281214 U .K........ 00284000 X .......... 00320012 X ..........
00320032 X .....KC... 00320033 X .....KC... 00320034 X .....KC...
00320035 X .....KC... 00321000 X .....KC... 00321001 X .....KC...
00321010 X .....KC... 00321011 X .....KC... 00321020 X ..K.......
00321021 X ..C....... 00321030 X .......C.. 00321032 X ..........
00321033 X .......... 00321040 X .....KC... 00321041 X .....KC...
00321050 X .....KC... 00321051 X .....KC... 00321060 X/Z .......C..
00321066 X .......C.. 00321067 X .......C.. 00321070 X .......C..
00324000 X .......C.. 00340001 D .......... 00340002 D ..........
00340005 D .......... 00340007 D .....KC... 00380004 X ..........
00380010 X .......... 00380011 X .......... 00380014 X ..........
0038001a X .....KC... 0038001b X .....KC... 0038001c X .....KC...
0038001d X .....KC... 0038001e X .......... 00380020 X .....KC...
00380021 X .....KC... 00380030 X .....KC... 00380032 X .....KC...
00380040 X .......C.. 00380050 X ....C..... 00380060 X ..........
00380061 X .......... 00380062 X .......C.. 00380064 X ..........
00380300 X .......... 00380400 X .......... 00380500 X ....C..C..
00384000 X .......C.. 003a0310 U .K........ 003a0314 D .....KC...
003a0329 X .......C.. 003a032b X .......C.. 00400001 X ..C.......
00400002 X .....KC... 00400003 X .....KC... 00400004 X .....KC...
00400005 X .....KC... 00400006 X .......... 00400007 X .......C..
00400009 X .......... 0040000b X .......... 00400010 X ..K.......
00400011 X ..K....... 00400012 X ....C..... 00400241 X ..C.......
00400242 X ..K....... 00400243 X .......... 00400244 X .....KC...
00400245 X .....KC... 00400250 X .....KC... 00400251 X .....KC...
00400253 X .......... 00400254 X .......C.. 00400275 X .......C..
00400280 X .......C.. 00400310 X .......C.. 0040050a X ..........
00400512 D .......... 00400513 Z .......... 0040051a X .......C..
00400551 D .......... 00400554 U .K........ 00400555 X/Z ........C.
00400562 Z .......... 00400600 X .......C.. 00400602 X .......C..
00400610 Z ........C. 004006fa X .......... 00401001 X ..........
00401002 X .......C.. 00401004 X .......... 00401005 X ..........
0040100a X .......C.. 00401010 X .......... 00401011 X ..........
00401101 D .......... 00401102 X .......... 00401103 X ..........
00401104 X .......... 00401400 X .......C.. 00402001 X .......C..
00402004 X .....KC... 00402005 X .....KC... 00402008 X ..........
00402009 X .......... 00402010 X .......... 00402011 X ..........
00402016 Z .......... 00402017 Z .......... 00402400 X .......C..
00403001 X .......... 00404005 X .....KC... 00404008 X .....KC...
00404010 X .....KC... 00404011 X .....KC... 00404023 U .K........
00404025 X ..K....... 00404027 X ..K....... 00404028 X ..K.......
00404030 X ..K....... 00404034 X .......... 00404035 X ..........
00404036 X .......... 00404037 X .......... 00404050 X .....KC...
00404051 X .....KC... 00404052 X .....KC... 0040a023 X .....KC...
0040a024 X .....KC... 0040a027 D .......... 0040a030 D .....KC...
0040a032 X/D .....KC... 0040a033 X .....KC... 0040a073 D ..........
0040a075 D .......... 0040a078 X .......... 0040a07a X ..........
0040a07c X .......... 0040a082 Z .....KC... 0040a088 Z ..........
0040a110 X .....KC... 0040a112 X .....KC... 0040a120 D .....KC...
0040a121 D .....KC... 0040a122 D .....KC... 0040a123 D ..........
0040a124 U .......... 0040a13a D .....KC... 0040a171 U .K........
0040a172 U .K........ 0040a192 X .....KC... 0040a193 X .....KC...
0040a307 X .......... 0040a352 X .......... 0040a353 X ..........
0040a354 X .......... 0040a358 X .......... 0040a402 U .K........
0040a730 D ........C. 0040db06 X .....KC... 0040db07 X .....KC...
0040db0c U .K........ 0040db0d U .K........ 0040e004 X .....KC...
00420011 D .......... 00440004 X .....KC... 0044000b X .....KC...
00440010 X .....KC... 00440104 D .....KC... 00440105 X .....KC...
0050001b X .......... 00500020 X ..K....... 00500021 X .......C..
00620021 U .K........ 00640003 U .K........ 00686226 D .....KC...
00686270 D .....KC... 006a0003 D .K........ 006a0005 D .......C..
006a0006 X .......C.. 00700001 D .........C 00700082 X .....KC...
00700083 X .....KC... 00700084 Z/D .......... 00700086 X ..........
0070031a U .K........ 00701101 U .K........ 00701102 U .K........
0072000a D .....KC... 0072005e D ..C....... 0072005f D ....K.....
00720061 D .....KC... 00720063 D .....KC... 00720065 D ..........
00720066 D .......C.. 00720068 D .......C.. 0072006a D ..........
0072006b D .....KC... 0072006c D .......C.. 0072006d D ..........
0072006e D .......C.. 00720070 D .......C.. 00720071 D ..........
00741234 X ..C....... 00741236 X ..C....... 00880140 U .K........
00880200 X .......... 00880904 X .......... 00880906 X ..........
00880910 X .......... 00880912 X .......... 01000420 X .....KC...
04000100 U .......... 04000105 D .....KC... 04000115 D ..........
04000310 X .....KC... 04000402 X .......... 04000403 X ..........
04000404 X .......... 04000550 X .......... 04000551 X ..........
04000552 X .......... 04000561 X .......... 04000562 D .....KC...
04000563 D ..K....... 04000564 Z ...K...... 04000565 D .......C..
04000600 X .......... 20300020 X .......... 21000040 X .....KC...
21000050 X .....KC... 21000070 X ..C....... 21000140 D ..C.......
22000002 X/Z .......C.. 22000005 X/Z .......... 30020121 X .......C..
30020123 X .......C.. 30060002 D .......C.. 30060004 X .......C..
30060006 X .......C.. 30060008 Z .....KC... 30060009 Z .....KC...
30060024 U .K........ 30060026 Z .......C.. 30060028 X .......C..
3006002d X .....KC... 3006002e X .....KC... 30060038 X .......C..
3006004d X .......... 3006004e X .......... 30060085 X .......C..
30060088 X .......C.. 300600a6 Z .......... 300600c2 U .K........
30080024 D .....KC... 30080025 D .....KC... 30080054 X/D .....KC...
30080056 X/D .....KC... 30080105 X/Z ..K....... 30080162 D .....KC...
30080164 D .....KC... 30080166 D .....KC... 30080168 D .....KC...
30080250 X/D .....KC... 30080251 X/D .....KC... 300a0002 D .......C..
300a0003 X .......C.. 300a0004 X .......C.. 300a0006 X/D .....KC...
300a0007 X/D .....KC... 300a000b X .......C.. 300a000e X .......C..
300a0013 U .K........ 300a0016 X .......C.. 300a0072 X .......C..
300a0083 U .K........ 300a00b2 X/Z ..K....... 300a00c3 X .......C..
300a00dd X .......C.. 300a0196 X .......C.. 300a01a6 X .......C..
300a01b2 X .......C.. 300a0216 X ..K....... 300a022c D .....KC...
300a022e D .....KC... 300a02eb X .......C.. 300a0608 D .......C..
300a0609 U .K........ 300a0611 Z .......... 300a0615 Z ..........
300a0619 D .......C.. 300a0623 D .......C.. 300a062a D .......C..
300a0650 U .K........ 300a0676 X .......C.. 300a067c D .......C..
300a067d Z .......C.. 300a0700 U .K........ 300a0734 D .......C..
300a0736 D .....KC... 300a073a D .....KC... 300a0741 D .....KC...
300a0742 D .......C.. 300a0760 D .....KC... 300a0783 D .......C..
300a0785 U .K........ 300a078e X .......C.. 300a0792 X .......C..
300a0794 X .......C.. 300a079a X .......C.. 300c0113 X .......C..
300c0127 D ..K..KC... 300e0004 Z .....KC... 300e0005 Z .....KC...
300e0008 X/Z .......... 30100006 U .K........ 3010000b U .K........
3010000f Z .......C.. 30100013 U .K........ 30100015 U .K........
30100017 Z .......C.. 3010001b Z .......... 3010002d D ..K.......
30100031 U .K........ 30100033 D .......C.. 30100034 D .......C..
30100035 D .......C.. 30100036 X .......C.. 30100037 X .......C..
30100038 D .......C.. 3010003b U .K........ 30100043 Z ..K.......
3010004c X/D .....KC... 3010004d X/D .....KC... 30100054 D .......C..
30100056 X/D .......C.. 3010005a Z .......C.. 3010005c Z .......C..
30100061 X .......C.. 3010006e U .K........ 3010006f U .K........
30100077 X/D .......C.. 3010007a Z .......C.. 3010007b Z .......C..
3010007f Z .......C.. 30100081 Z .......C.. 30100085 X .....KC...
40000010 X .......... 40004000 X .......... 40080040 X ..........
40080042 X .......... 40080100 X .....KC... 40080101 X .....KC...
40080102 X .......... 40080108 X .....KC... 40080109 X .....KC...
4008010a X .......... 4008010b X .......C.. 4008010c X ..........
40080111 X .......... 40080112 X .....KC... 40080113 X .....KC...
40080114 X .......... 40080115 X .......C.. 40080118 X ..........
40080119 X .......... 4008011a X .......... 40080200 X ..........
40080202 X .......... 40080300 X .......C.. 40084000 X .......C..
50xxxxxx X .........C 60xx3000 X .........C 60xx4000 X .........C
fffafffa X .......... fffcfffc X .......... odd X C.........
"""
# END GENERATED
# The Basic Profile's combined actions, as applied here: the choice that stays valid whatever
# the attribute's type in the IOD (Z for a type 2 or 3 attribute, D for one that may be type 1)
COMBINED_ACTIONS = {"X/Z": "Z", "X/D": "D", "X/Z/D": "D", "Z/D": "D", "X/Z/U*": "U"}
PARTLY_HONOURED = {  # what an option's C (clean) means here, said at the start of a run
    "clean-descriptors": "descriptions are kept with this file's own identifying values cut "
                         "out of them; a name typed only into free text is not found",
    "clean-structured-content": "content items are kept and de-identified at their depth, "
                                "as the profile acts on every sequence; free text in them is "
                                "removed where the table removes TextValue",
    "clean-graphics": "overlays and curves are kept as they are, not cleaned",
    "retain-device-identity": "AE titles the option cleans are kept with this file's "
                              "identifying values cut out of them",
    "retain-patient-characteristics": "the free-text characteristics it cleans (allergies, "
                                      "special needs, ...) are kept with this file's "
                                      "identifying values cut out of them",
}
# Files whose pixels often show text burned in (PS3.15 E.1.1 and its guidance on
# ultrasound, secondary capture and photographs); refused unless --allow-burned-in when
# BurnedInAnnotation is YES, or absent in one of these classes
BURNED_IN_CLASSES = table(UID_BY_KEYWORD[k] for k in (
    "UltrasoundImageStorage", "UltrasoundMultiFrameImageStorage",
    "UltrasoundImageStorageRetired", "UltrasoundMultiFrameImageStorageRetired",
    "SecondaryCaptureImageStorage", "MultiFrameSingleBitSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
    "MultiFrameTrueColorSecondaryCaptureImageStorage", "VLEndoscopicImageStorage",
    "VideoEndoscopicImageStorage", "VLMicroscopicImageStorage", "VideoMicroscopicImageStorage",
    "VLPhotographicImageStorage", "VideoPhotographicImageStorage",
    "OphthalmicPhotography8BitImageStorage", "OphthalmicPhotography16BitImageStorage",
    "EncapsulatedPDFStorage", "EncapsulatedCDAStorage"))
# Elements whose replacement keeps files linked: keyed dummies, not emptied (PatientID and
# PatientName get the patient's pseudonym)
LINKING_KEYWORDS = ("AccessionNumber", "StudyID")
MAPPED_KEYWORDS = ("PatientID", "AccessionNumber", "StudyInstanceUID")  # --mapping's rows
DUMMIES = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y",
           "DS": "0", "IS": "0", "UR": "urn:dicom-sar:removed"}
BINARY_VRS = table(vr for vr in VALID_VRS if vr not in STRING_VRS and vr != "SQ")
DATE_SHIFT_DAYS = (365, 3650)  # a patient's dates move back by a keyed offset in this range
KEY_BYTES, MIN_KEY_BYTES = 32, 16
MIN_IDENTIFYING = 4  # shorter removed values are not searched for (they occur by chance)
CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")  # not text (ESC is: ISO 2022)
FILE_META_REMOVED = (0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102)
DEID_CODES = {  # CID 7050: the profile's and each option's keyword in pydicom's codes.DCM
    "basic": "BasicApplicationConfidentialityProfile",
    "retain-safe-private": "RetainSafePrivateOption", "retain-uids": "RetainUidsOption",
    "retain-device-identity": "RetainDeviceIdentityOption",
    "retain-institution-identity": "RetainInstitutionIdentityOption",
    "retain-patient-characteristics": "RetainPatientCharacteristicsOption",
    "retain-long-full-dates": "RetainLongitudinalTemporalInformationFullDatesOption",
    "retain-long-modified-dates": "RetainLongitudinalTemporalInformationModifiedDatesOption",
    "clean-descriptors": "CleanDescriptorsOption",
    "clean-structured-content": "CleanStructuredContentOption",
    "clean-graphics": "CleanGraphicsOption"}
MARKED_BY = PROG + " "  # how DeidentificationMethod's first value starts in our output


@dataclasses.dataclass(frozen=True)
class Profile:
    """Table E.1-1 resolved for the chosen options: one action (X Z D K C U) per tag."""

    by_tag: Mapping[int, str]
    curves: str  # (50xx,xxxx)
    overlay_data: str  # (60xx,3000)
    overlay_comments: str  # (60xx,4000)
    private: str

    def action(self, tag: int) -> str:
        """What the profile does to a public element (K for one the table does not list)."""
        action = self.by_tag.get(tag)
        if action is not None:
            return action
        group = tag >> 16
        if group & 0xFF01 == 0x5000:
            return self.curves
        if group & 0xFF01 == 0x6000 and tag & 0xFFFF in (0x3000, 0x4000):
            return self.overlay_data if tag & 0xFFFF == 0x3000 else self.overlay_comments
        return "K"


def deid_profile(options: tuple[str, ...]) -> Profile:
    """The profile of the Basic column with options' K and C over it (K, retain, wins over C)."""
    chosen = [DEID_OPTIONS.index(o) for o in options]
    resolved: dict[str, str] = {}
    cells = DEID_TABLE.split()
    for row, basic, columns in zip(cells[::3], cells[1::3], cells[2::3], strict=True):
        overrides = {columns[i] for i in chosen} - {"."}
        action = "K" if "K" in overrides else "C" if "C" in overrides else basic
        resolved[row] = COMBINED_ACTIONS.get(action, action)
    patterns = {row: resolved.pop(row) for row in ("50xxxxxx", "60xx3000", "60xx4000", "odd")}
    return Profile({int(row, 16): action for row, action in resolved.items()},
                   patterns["50xxxxxx"], patterns["60xx3000"], patterns["60xx4000"],
                   patterns["odd"])


@dataclasses.dataclass(frozen=True)
class DeidOptions:
    """--deid's and --deid-audit's options; the key is never shown (repr=False)."""

    key: bytes = dataclasses.field(repr=False)
    fingerprint: str  # names the key in the journal's key and the logs, reveals nothing
    options: tuple[str, ...]
    keep_private: tuple[str, ...]
    allow_burned_in: bool = False
    mapping: Path | None = None
    new_key: Path | None = None  # --new-key: make a key there, then exit
    key_exposed: bool = False  # the key file is readable by others

    @functools.cached_property
    def profile(self) -> Profile:
        """The table resolved for these options, once (every element asks)."""
        return deid_profile(self.options)


def deid_options(ns: argparse.Namespace, mode: str) -> DeidOptions:
    """Check --key, --deid-option and --keep-private; read the key (never shown)."""
    options = tuple(dict.fromkeys(ns.deid_option or ()))
    for name in options:
        if name not in DEID_OPTIONS:
            raise UsageError(f"--deid-option {name}: unknown; choose from "
                             + ", ".join(DEID_OPTIONS))
    if "retain-safe-private" in options:
        raise UsageError("--deid-option retain-safe-private is not supported: its list of safe "
                         "private attributes (PS3.15 Table E.3.10-1) is not carried here; "
                         "keep what you need with --keep-private CREATOR")
    if {"retain-long-full-dates", "retain-long-modified-dates"} <= set(options):
        raise UsageError("--deid-option retain-long-full-dates and retain-long-modified-dates "
                         "exclude each other: keep the dates, or shift them")
    keep = tuple(dict.fromkeys(c.strip() for c in ns.keep_private or ()))
    if mode == "deid_audit":
        return DeidOptions(b"", "", options, keep)
    if ns.new_key:
        return DeidOptions(b"", "", options, keep, new_key=Path(ns.new_key))
    if not ns.key:
        raise UsageError("--deid needs --key FILE (the secret that keys pseudonyms, UIDs and "
                         "date shifts); make one with: dicom_sar --deid --new-key FILE")
    key = read_key(Path(ns.key))
    exposed = bool(os.stat(ns.key).st_mode & 0o077)
    fingerprint = hmac.new(key, b"dicom_sar key fingerprint", hashlib.sha256).hexdigest()[:12]
    return DeidOptions(key, fingerprint, options, keep, ns.allow_burned_in,
                       Path(ns.mapping) if ns.mapping else None, key_exposed=exposed)


def read_key(path: Path) -> bytes:
    """The key file's bytes, at least MIN_KEY_BYTES of them."""
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--key {path}: cannot read it ({exc.strerror}); make a key with: "
                         "dicom_sar --deid --new-key FILE") from None
    if len(key) < MIN_KEY_BYTES:
        raise UsageError(f"--key {path}: {len(key)} bytes, too short (at least {MIN_KEY_BYTES}; "
                         f"--new-key makes one of {KEY_BYTES} random bytes)")
    return key


def make_key(path: Path) -> None:
    """KEY_BYTES random bytes in a new file of mode 0600 (never over an existing one)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise UsageError(f"--new-key {path}: the file exists; a key is never overwritten "
                         "(the pseudonyms made with it would be lost)") from None
    except OSError as exc:
        raise UsageError(f"--new-key {path}: {exc.strerror}") from None
    try:
        write_all_fd(fd, os.urandom(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)


class Keyed:
    """The keyed functions of one key: pseudonyms, dummies, UIDs and date shifts, the same on
    every host and in every run (HMAC-SHA256)."""

    def __init__(self, key: bytes):
        self.key = key

    def digest(self, kind: str, text: str) -> bytes:
        """HMAC-SHA256 of kind and text, kept apart so that no two uses share a value."""
        data = (kind + "\0" + text if kind else text).encode("utf-8", "surrogateescape")
        return hmac.new(self.key, data, hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """2.25. and the first 16 bytes of HMAC-SHA256(key, uid) as a decimal number."""
        return "2.25." + str(int.from_bytes(self.digest("", uid)[:16], "big"))

    def token(self, kind: str, text: str) -> str:
        """16 characters of A-Z and 2-7: valid in every text VR (CS and SH included)."""
        return base64.b32encode(self.digest(kind, text)).decode("ascii")[:16]

    def patient(self, issuer: str, patient_id: str) -> str:
        """The pseudonym of a patient: PatientID and PatientName both become it."""
        return self.token("patient", issuer + "\0" + patient_id)

    def date_shift(self, issuer: str, patient_id: str) -> int:
        """Days one patient's dates move back, between DATE_SHIFT_DAYS."""
        low, high = DATE_SHIFT_DAYS
        value = int.from_bytes(self.digest("date-shift", issuer + "\0" + patient_id)[:8], "big")
        return low + value % (high - low + 1)


def text_of(ds: Dataset, tag: int, default: str = "") -> str:
    """A top-level text element's value as one string ('' if absent)."""
    elem = ds.get(tag)
    if elem is None or elem.value is None or elem.VR == "SQ":
        return default
    value = elem.value
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return "\\".join(map(str, value))
    return str(value)


def raw_parts(ds: Dataset, tag: int, vr: str) -> list[bytes]:
    """The encoded values of a text element as stored (for the search in the output)."""
    raw = ds.get_item(tag)
    value = raw.value if isinstance(raw, RawDataElement) else None
    if value is None:
        elem = ds[tag]
        if elem.value is None or vr in BINARY_VRS:
            return []
        try:
            value = b"\\".join(
                pydicom.charset.encode_string(str(v), charset_of(ds))
                for v in (elem.value if elem.VM > 1 else [elem.value]))
        except (UnicodeError, ValueError, LookupError):
            return []
    if not isinstance(value, bytes) or (vr in BINARY_VRS and vr != "UN"):
        return []
    parts = [value] if vr in SINGLE_VALUE_VRS else value.split(b"\\")
    return [p for p in (p.strip(b" \0") for p in parts)
            if len(p) >= MIN_IDENTIFYING and not CONTROL_BYTES.search(p)]


@dataclasses.dataclass
class Scrub:
    """One file's de-identification in progress (a worker's own): what it changed, the
    original values it took out (to search the output for), and the --mapping rows."""

    opts: DeidOptions
    keyed: Keyed
    issuer: str
    patient_id: str
    changes: list[Change] = dataclasses.field(default_factory=list)
    identifying: dict[bytes, int] = dataclasses.field(default_factory=dict)  # value: its tag
    to_clean: list[tuple[Dataset, int]] = dataclasses.field(default_factory=list)
    mapping: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def note(self, ds: Dataset, tag: int, action: str, old: str = "", new: str = "") -> None:
        """Record one change (tag and action; values only for --verbose previews)."""
        self.changes.append(Change(element_label(tag), old, new, action))

    def dataset(self, ds: Dataset) -> None:
        """Apply the profile to every element of ds, sequence items at any depth included."""
        for tag in list(ds.keys()):
            self.element(ds, tag)

    def element(self, ds: Dataset, tag: int) -> None:
        """Apply the profile to one element (and its items)."""
        group = tag >> 16
        if tag & 0xFFFF == 0:  # group lengths (retired): wrong once anything is removed
            del ds[tag]
            return
        if group % 2:
            self.private(ds, tag)
            return
        vr = element_vr(ds.get_item(tag), ds)
        if vr == "UN" or dictionary_entry(tag) is None:
            self.remove(ds, tag, vr, "removed (unknown or UN)")
            return
        action = self.opts.profile.action(tag)
        if vr == "SQ":
            self.sequence(ds, tag, action)
        elif action == "X":
            self.remove(ds, tag, vr, "removed")
        elif action in "ZDU" or (action == "C" and vr in ("DA", "DT")):
            self.replace(ds, tag, vr, action)
        elif action == "C" and vr not in BINARY_VRS and vr != "TM":  # times of day stay
            self.to_clean.append((ds, tag))

    def private(self, ds: Dataset, tag: int) -> None:
        """Keep the blocks of --keep-private creators (their items de-identified); drop the rest."""
        element = tag & 0xFFFF
        if 0x10 <= element <= 0xFF:
            kept = text_of(ds, tag).strip() in self.opts.keep_private
        else:
            kept = element > 0xFF and creator_of(ds, tag) in self.opts.keep_private
        if not kept:
            self.remove(ds, tag, element_vr(ds.get_item(tag), ds), "removed (private)")
        elif is_sequence(ds, tag):
            for item in ds[tag].value or []:
                self.dataset(item)

    def remove(self, ds: Dataset, tag: int, vr: str, why: str) -> None:
        """X: the element goes, and every value in it is searched for in the output."""
        self.collect(ds, tag, vr)
        del ds[tag]
        self.note(ds, tag, why)

    def collect(self, ds: Dataset, tag: int, vr: str) -> None:
        """Remember the element's original values (items' too) as identifying."""
        if vr == "SQ" or is_sequence(ds, tag):
            for item in ds[tag].value or []:
                for inner in list(item.keys()):
                    self.collect(item, inner, element_vr(item.get_item(inner), item))
        elif vr not in BINARY_VRS or vr == "UN":
            self.identifying.update(dict.fromkeys(raw_parts(ds, tag, vr), tag))

    def sequence(self, ds: Dataset, tag: int, action: str) -> None:
        """X removes a sequence, Z empties it; D, U, C and K keep its items, de-identified."""
        if action == "X":
            self.remove(ds, tag, "SQ", "removed")
        elif action == "Z":
            if ds[tag].value:
                self.collect(ds, tag, "SQ")
                ds[tag].value = []
                self.note(ds, tag, "emptied")
        else:
            for item in ds[tag].value or []:
                self.dataset(item)

    def replace(self, ds: Dataset, tag: int, vr: str, action: str) -> None:
        """Z (emptied, or a keyed dummy where files must stay linked), D, U, or C for a date."""
        parts = raw_parts(ds, tag, vr)  # before text_of, which decodes the raw element
        old = text_of(ds, tag)
        if not old.strip("\\ \0"):
            return
        new = self.new_value(ds, tag, vr, action, old)
        if new == old:
            return
        self.identifying.update(dict.fromkeys(parts, tag))
        new = set_value(ds, tag, vr, new)
        what = {"Z": "replaced" if new else "emptied", "D": "replaced", "U": "replaced",
                "C": "shifted" if new else "emptied"}[action]
        self.note(ds, tag, what, old, new)

    def new_value(self, ds: Dataset, tag: int, vr: str, action: str, old: str) -> str:
        """The value an element gets."""
        keyword = keyword_of(tag)
        if keyword in ("PatientID", "PatientName") and action != "C":
            return self.keyed.patient(*self.patient_of(ds))
        if vr == "UI":
            return "\\".join(self.keyed.uid(u.strip("\0 ")) for u in old.split("\\"))
        if action == "C":
            return "\\".join(shift_date(v, vr, self.shift) for v in old.split("\\"))
        if action == "Z" and keyword not in LINKING_KEYWORDS:
            return ""
        if vr in DUMMIES:
            return DUMMIES[vr]
        return self.keyed.token("value", old)

    def patient_of(self, ds: Dataset) -> tuple[str, str]:
        """The patient an item names (IssuerOfPatientID, PatientID), else the file's."""
        if 0x00100020 in ds:
            return text_of(ds, 0x00100021), text_of(ds, 0x00100020)
        return self.issuer, self.patient_id

    @functools.cached_property
    def shift(self) -> int:
        """This file's patient's date shift in days."""
        return self.keyed.date_shift(self.issuer, self.patient_id)

    def clean(self) -> None:
        """C for text: the element stays with this file's identifying values cut out."""
        found = sorted({p.decode("latin-1") for p in self.identifying}, key=len, reverse=True)
        for ds, tag in self.to_clean:
            old = text_of(ds, tag)
            new = old
            for value in found:
                new = re.sub(re.escape(value), "", new, flags=re.IGNORECASE)
            if new != old:
                new = set_value(ds, tag, element_vr(ds.get_item(tag), ds), new)
                self.note(ds, tag, "cleaned", old, new)


def set_value(ds: Dataset, tag: int, vr: str, value: str) -> str:
    """Give an element a new value (emptied if its VR refuses it: a shifted date that kept an
    invalid tail, whose error would quote it); the value it got."""
    try:
        ds[tag] = DataElement(tag, vr, value.split("\\") if "\\" in value and vr not in
                              SINGLE_VALUE_VRS else value)
    except ValueError:
        ds[tag] = DataElement(tag, vr, "")
        return ""
    return value


DT_AFTER_DATE = re.compile(r"(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?([+-]\d{4})?")  # PS3.5 6.2


def shift_date(value: str, vr: str, days: int) -> str:
    """A DA or DT value moved back by days (the time of day kept); '' if it is no date, or
    if what follows a DT's date is no time (it would be carried over as it is)."""
    value = value.strip()
    if len(value) != 8 and (vr != "DT" or not DT_AFTER_DATE.fullmatch(value[8:])):
        return ""
    try:
        day = datetime.strptime(value[:8], "%Y%m%d")
        moved = (day - timedelta(days=days)).strftime("%Y%m%d")
    except (ValueError, OverflowError):
        return ""
    return moved + value[8:] if vr == "DT" else moved


def identity_removed(ds: Dataset) -> bool:
    """Whether the file says it was de-identified (PatientIdentityRemoved YES), by anyone."""
    return text_of(ds, 0x00120062).upper() == "YES"


def marked_by_us(ds: Dataset) -> bool:
    """Whether our own de-identification wrote this file (a second pass would shift twice)."""
    return identity_removed(ds) and any(
        v.startswith(MARKED_BY) for v in text_of(ds, 0x00120063).split("\\"))


def burned_in(ds: Dataset) -> str:
    """Why the pixels may show identifying text ('' when nothing says so)."""
    annotation = text_of(ds, 0x00280301).strip().upper()
    if annotation == "YES":
        return "BurnedInAnnotation is YES"
    sop_class = text_of(ds, 0x00080016).strip("\0 ")
    if not annotation and sop_class in BURNED_IN_CLASSES:
        return (f"no BurnedInAnnotation in a {UID_DICTIONARY[sop_class][0]}, whose pixels "
                "often show text")
    return ""


def mark(ds: Dataset, opts: DeidOptions) -> None:
    """PatientIdentityRemoved, DeidentificationMethod(+CodeSequence) and whether the dates
    were kept, shifted or removed."""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [f"{MARKED_BY}{__version__}", f"PS3.15 E.1-1 {DEID_EDITION}",
                                 "Basic Profile", *opts.options]
    items = [code_item(*deid_codes()[name]) for name in ("basic", *opts.options)]
    ds.DeidentificationMethodCodeSequence = items
    ds.LongitudinalTemporalInformationModified = (
        "MODIFIED" if "retain-long-modified-dates" in opts.options else
        "UNMODIFIED" if "retain-long-full-dates" in opts.options else "REMOVED")


@functools.cache
def deid_codes() -> dict[str, tuple[str, str, str]]:
    """CID 7050 from pydicom's codes: profile or option -> (value, scheme, meaning). Called
    before the pool starts: importing in a worker would stop the others on 3.13t."""
    from pydicom.sr.codedict import codes
    return {name: (code.value, code.scheme_designator, code.meaning)
            for name, code in ((n, getattr(codes.DCM, k)) for n, k in DEID_CODES.items())}


def deid_dataset(ds: Dataset, opts: DeidOptions) -> Scrub:
    """De-identify ds (file meta included) in place; the Scrub tells what it did."""
    scrub = Scrub(opts, Keyed(opts.key), text_of(ds, 0x00100021), text_of(ds, 0x00100020))
    top = {k: text_of(ds, tag_for_keyword(k)) for k in MAPPED_KEYWORDS}
    scrub.dataset(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        for tag in FILE_META_REMOVED:
            if tag in meta and (tag >> 8 & 0xFF == 1 or
                                "retain-device-identity" not in opts.options):
                scrub.remove(meta, tag, element_vr(meta.get_item(tag), meta), "removed")
        if 0x00020003 in meta and opts.profile.action(0x00020003) == "U":
            scrub.replace(meta, 0x00020003, "UI", "U")
    scrub.clean()
    mark(ds, opts)
    for keyword, old in top.items():
        new = text_of(ds, tag_for_keyword(keyword))
        if old and new != old:
            scrub.mapping.append((keyword, old, new))
    return scrub


def leftovers(ds: Dataset, opts: DeidOptions, *, marked: bool) -> list[str]:
    """What the profile would still act on in ds, at any depth: elements it removes, private
    elements of creators not kept, unknown or UN ones; in a file not marked de-identified,
    also every element it would replace or empty that holds a value."""
    found: list[str] = []
    stack = [container for _, container in all_datasets_of(ds)][::-1]  # the meta first
    while stack:
        current = stack.pop()
        for tag in list(current.keys()):
            why = leftover(current, tag, opts, marked)
            if why:
                name = keyword_of(tag, creator_of(current, tag))
                found.append(f"{element_label(tag, name)}: {why}")
            elif is_sequence(current, tag):
                stack.extend(current[tag].value or [])
    return found


def leftover(ds: Dataset, tag: int, opts: DeidOptions, marked: bool) -> str:
    """Why the profile would still act on one element ('' if it would not)."""
    group, element = tag >> 16, tag & 0xFFFF
    if element == 0:  # group lengths say nothing of anyone
        return ""
    if group % 2:
        creator = text_of(ds, tag).strip() if 0x10 <= element <= 0xFF else creator_of(ds, tag)
        return "" if creator in opts.keep_private else "private element"
    sequence = is_sequence(ds, tag)
    if not sequence and (dictionary_entry(tag) is None or
                         element_vr(ds.get_item(tag), ds) == "UN"):
        return "unknown or UN element"
    action = opts.profile.action(tag)
    if action == "X":
        return "the profile removes it"
    if marked or action == "K" or (sequence and action != "Z"):
        return ""
    held = bool(ds[tag].value) if sequence else bool(text_of(ds, tag).strip("\\ \0"))
    return "the profile would replace or empty it" if held else ""


def checked_output(data: bytes, scrub: Scrub, opts: DeidOptions) -> str:
    """Read the output back from its bytes: '' when nothing the profile removes is left and
    no identifying value of the original occurs in it, else why not (no values named)."""
    out = pydicom.dcmread(io.BytesIO(data), force=True)
    problems = leftovers(out, opts, marked=True)
    if problems:
        return (f"{len(problems)} elements the profile removes are still there, first "
                + problems[0])
    wanted = list(scrub.identifying)
    searched = searched_bytes(data, out)
    found = value_in(wanted, searched)
    if found:  # unless an element of the output holds that very value (a model name)
        kept = {v.strip(" \0") for _, value in all_text_values(out)
                for v in value.split("\\")}
        found = value_in([v for v in wanted if v.decode("latin-1") not in kept], searched)
        if found:
            tag = scrub.identifying[found]
            return (f"the original value of {element_label(tag)} is still in the output (in "
                    "an element the profile keeps, or one it does not know)")
    return ""


def value_in(values: list[bytes], data: bytes) -> bytes:
    """The first of values found in data where it stands alone or in text, not inside a
    longer number or word (a weight of 70.5 inside a slice location of -170.50); b'' if none."""
    if not values:
        return b""
    found = re.compile(rb"(?<![A-Za-z0-9.])(" + b"|".join(map(re.escape, values))
                       + rb")(?![A-Za-z0-9.])").search(data)
    return found[1] if found else b""


def searched_bytes(data: bytes, out: Dataset) -> bytes:
    """The output's bytes as the search sees them: inflated if deflated, and without the
    pixel data (gated by the burned-in rule, not by this search: noise matches by chance)."""
    import zlib
    meta = getattr(out, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") == DEFLATED and data[128:132] == b"DICM":
        end = 144 + struct.unpack("<L", data[140:144])[0]
        return data[:end] + zlib.decompressobj(-zlib.MAX_WBITS).decompress(data[end:])
    pixels = out.get_item(0x7FE00010)
    start = getattr(pixels, "value_tell", None)
    if start is None or not isinstance(pixels.value, bytes):
        return data
    return data[:start] + data[start + len(pixels.value):]


def all_text_values(ds: Dataset) -> Iterator[tuple[int, str]]:
    """Every text element's value at any depth, file meta included."""
    stack = [container for _, container in all_datasets_of(ds)]
    while stack:
        current = stack.pop()
        for tag in list(current.keys()):
            if is_sequence(current, tag):
                stack.extend(current[tag].value or [])
            elif element_vr(current.get_item(tag), current) not in BINARY_VRS:
                yield tag, text_of(current, tag)


def deid_target(cand: Candidate, ds: Dataset, opts: Options) -> Path:
    """Where a de-identified file goes: OUTPUT/study/series/SOP by its new UIDs, whose
    names hold nothing of the original (the input's names often are its UIDs)."""
    assert opts.output is not None and opts.deid is not None
    parts = [text_of(ds, tag).strip("\0 ") for tag in (0x0020000D, 0x0020000E, 0x00080018)]
    if not parts[2]:
        meta = getattr(ds, "file_meta", None)
        parts[2] = text_of(meta, 0x00020003).strip("\0 ") if meta is not None else ""
    safe = [p if re.fullmatch(r"[0-9]+(\.[0-9]+)*", p or "") else "" for p in parts]
    if not safe[2]:
        safe = ["unnamed", "", Keyed(opts.deid.key).token("path", os.fspath(cand.path))]
    target = opts.output.joinpath(*[p for p in safe if p])
    if not leads_nowhere_else(target.parent, opts.output):
        raise PermissionError(f"refusing to write outside {opts.output}: {target}")
    return target


def deid_task(cand: Candidate, opts: Options) -> FileResult:
    """De-identify one file: read all of it, apply the profile, check the bytes it would
    write, then stage them (or preview)."""
    assert opts.deid is not None
    stamp = file_stamp(cand.path)
    ds, size, pixels_at = header_and_pixels(cand.path)
    if ds is None:
        return FileResult(cand.path, Status.NOT_DICOM, nbytes=size)
    if marked_by_us(ds):
        return FileResult(cand.path, Status.SKIPPED, nbytes=size,
                          message=f"already de-identified by {PROG}: left as it is")
    why = "" if opts.deid.allow_burned_in else burned_in(ds)
    if why:
        return refused(cand, size, f"{why}: pixels are not cleaned (--allow-burned-in to "
                       "de-identify the header anyway)")
    scrub = deid_dataset(ds, opts.deid)
    data = encoded_as_read(ds)
    problem = checked_output(data, scrub, opts.deid)
    if problem:
        return refused(cand, size, problem, tuple(scrub.changes))
    changes = tuple(scrub.changes)
    target = cand.path if opts.inplace else deid_target(cand, ds, opts)
    if opts.journal is not None and opts.journal.completed(cand.path, target):
        return FileResult(cand.path, Status.SKIPPED, message="completed by the interrupted run")
    if opts.dry_run:
        return FileResult(cand.path, Status.MODIFIED, nbytes=size, changes=changes)

    def write(out: BinaryIO) -> None:
        if file_stamp(cand.path) != stamp:
            raise RuntimeError("the file changed while it was being processed; left as it is")
        write_all(out, [data])
        if pixels_at is not None:
            with read_fd(cand.path) as src:
                copy_range(src, out.fileno(), pixels_at, size)

    if opts.inplace:
        staged = stage_in_place(cand, opts, write)
    else:
        staged = stage_atomic(target, write, like=cand.path, tag=run_tag(opts), writable=True,
                              source=cand.path)
    return FileResult(cand.path, Status.MODIFIED, nbytes=size, changes=changes, staged=staged,
                      record=tuple(scrub.mapping))


def header_and_pixels(path: Path) -> tuple[Dataset | None, int, int | None]:
    """(dataset, size, where the pixel data starts): the header alone when the pixel data
    ends the file (its bytes are then copied as they are, never decoded or held), else the
    whole dataset (None); checked to read to its end either way."""
    with buffered_reader(path) as fp:
        size = os.fstat(fp.fileno()).st_size
        head = fp.read(4096 + 132)
        kind = sniff_dicom(head[:132], size)
        if kind is None:
            return None, size, None
        if kind != "part10" or DEFLATED_UID not in head:
            fp.seek(0)
            ds = pydicom.dcmread(fp, force=True, stop_before_pixels=True)
            start = fp.tell()  # pydicom stops at the pixel data element's first byte
            check_complete(ds, fp, size)
            if start < size and pixels_end(fp, start, ds, size) == size:
                checked_whole(path)
                return ds, size, start
    ds, size, _ = whole(path, read_dataset(path, header_only=False))
    return ds, size, None


def pixels_end(fp: BinaryIO, start: int, ds: Dataset, size: int) -> int:
    """Where the pixel data element at start ends (-1 if that is no pixel data element)."""
    pixels = pixel_element_at(fp, start, ds)
    if pixels is None or pixels[2] is None:
        return -1
    _, header, length = pixels
    if length == 0xFFFFFFFF:  # encapsulated: the file must end with its delimiter
        order = "<" if ds.original_encoding[1] is not False else ">"
        return size if ends_with_delimiter(fp, size, order) else -1
    return start + header + length


def encoded_as_read(ds: Dataset) -> bytes:
    """The file's bytes in its own transfer syntax, one newer than pydicom's list included
    (JPEG XL): its encoding is then the one the file was read in."""
    buffer = io.BytesIO()
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax and not pydicom.uid.UID(syntax).is_transfer_syntax and \
            None not in ds.original_encoding:
        implicit, little = ds.original_encoding
        pydicom.dcmwrite(buffer, ds, implicit_vr=implicit, little_endian=little,
                         force_encoding=True)
    else:
        ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def refused(cand: Candidate, size: int, why: str, changes: tuple[Change, ...] = ()
            ) -> FileResult:
    """A file --deid will not write, and why (nothing is written for it)."""
    return FileResult(cand.path, Status.REJECTED, nbytes=size, rejections=(why,),
                      changes=changes, error_type="Refused", message=why)


def audit_task(cand: Candidate, opts: Options) -> FileResult:
    """--deid-audit of one file: a line per element the profile would still act on."""
    assert opts.deid is not None
    ds, size, _ = whole(cand.path, read_dataset(cand.path, header_only=True))
    if ds is None:
        return FileResult(cand.path, Status.NOT_DICOM, nbytes=size)
    found = leftovers(ds, opts.deid, marked=identity_removed(ds))
    if not found:
        return FileResult(cand.path, Status.OK, nbytes=size)
    return FileResult(cand.path, Status.REJECTED, nbytes=size,
                      lines=tuple(f"{cand.path}  {line}" for line in found),
                      rejections=(f"{len(found)} elements the Basic Profile would act on",))


class MappingFile:
    """--mapping: original -> pseudonym rows (TSV, mode 0600), appended as files commit; the
    only place where original values are written. Shards write one each: `sort -u` merges."""

    def __init__(self, path: Path):
        self.path, self.seen = path, set()
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.fchmod(self.fd, 0o600)

    def add(self, result: FileResult) -> None:
        """The rows of one committed file not written before."""
        if result.status != Status.MODIFIED or not result.record:
            return
        rows = [row for row in result.record if row not in self.seen]
        self.seen.update(rows)
        if rows:
            write_all_fd(self.fd, "".join("\t".join(r) + "\n" for r in rows).encode(
                "utf-8", "surrogateescape"))

    def close(self) -> None:
        """Flush the rows to disk and close."""
        os.fsync(self.fd)
        os.close(self.fd)


class TargetClaims:
    """The main thread's record of which input took each output name: two files of one
    instance (the same SOP Instance UID) would go to one name, and the second would
    silently replace the first."""

    def __init__(self) -> None:
        self.taken: dict[str, tuple[Path, Path]] = {}  # SOP name: (input, output)

    def claim(self, result: FileResult) -> str:
        """'' when the result's SOP Instance UID is new to the run (or its own), else why it
        is not written (by name: two copies may differ in their study or series UIDs)."""
        assert result.staged is not None
        first, written = self.taken.setdefault(result.staged.target.name,
                                               (result.path, result.staged.target))
        if first == result.path:
            return ""
        return f"the same SOP Instance UID as {first}, already written to {written}; not written"


def mapping_path(opts: Options) -> Path | None:
    """--mapping's file; a shard's has its shard in its name (one per shard, mergeable)."""
    assert opts.deid is not None
    path = opts.deid.mapping
    if path is None or opts.shard is None:
        return path
    return path.with_name(f"{path.stem}.{shard_tag(opts.shard)}{path.suffix}")


def announce_deid(opts: Options) -> None:
    """Say, before any file, what the options cannot fully do and whether the key is exposed."""
    assert opts.deid is not None
    notes = [f"--deid-option {o}: {PARTLY_HONOURED[o]}" for o in opts.deid.options
             if o in PARTLY_HONOURED]
    if opts.deid.key_exposed:
        notes.append("the key file is readable by others: chmod 600 it (whoever reads it can "
                     "link pseudonyms to patients)")
    for note in notes:
        log.warning("%s", note)
        if not opts.quiet:
            print(f"{PROG}: warning: {note}", file=sys.stderr)


def run_deid(opts: Options, out: Callable[[str], None], stop: StopSignal,
             log_paths: list[Path]) -> int:
    """De-identify over the walk, journalled as --sar is; or make a key (--new-key)."""
    assert opts.deid is not None
    if opts.deid.new_key is not None:
        make_key(opts.deid.new_key)
        print(f"wrote a new key to {opts.deid.new_key} ({KEY_BYTES} random bytes, mode 0600); "
              "keep it as you keep the originals: whoever holds it can link pseudonyms to "
              "patients", file=sys.stderr)
        return EXIT_OK
    log.info("de-identifying with key %s; options: %s", opts.deid.fingerprint,
             ", ".join(opts.deid.options) or "Basic Profile only")
    deid_codes()  # pydicom's code tables and the profile, made before the pool starts
    log.debug("profile: %d tags with an action", len(opts.deid.profile.by_tag))
    announce_deid(opts)
    mapping = None
    path = mapping_path(opts)
    if path is not None and not opts.dry_run:
        mapping = MappingFile(path)
        log_paths = [*log_paths, path]
    try:
        return run_journalled(opts, deid_task, out, stop, log_paths,
                              mapping.add if mapping is not None else None,
                              None if opts.inplace else TargetClaims().claim)
    finally:
        if mapping is not None:
            mapping.close()


def run_audit(opts: Options, out: Callable[[str], None], stop: StopSignal,
              log_paths: list[Path]) -> int:
    """Report each file's elements the profile would still act on; exit 1 if any."""
    reporter = over_the_walk(opts, audit_task, out, stop, log_paths)
    reporter.finish()
    return stop.exit_status() or exit_status(reporter.stats)


# ════════════════════════════════════════════════════════════════════════════════════════
# Mode --generate: plan patients/studies/series/instances in the main thread (seeded, so
# the same seed gives the same bytes), then encode and write each instance on the pool
# ════════════════════════════════════════════════════════════════════════════════════════


FAULTS = {
    "bits_mismatch": "BitsStored/HighBit contradict BitsAllocated",
    "corrupted_pixel": "pixel data shorter than Rows x Columns x bytes",
    "large_dimensions": "Rows/Columns of 65535 that the pixel data cannot back",
    "missing_dicom": "declared in the manifest, deliberately not written",
    "missing_required_tag": "no Rows/Columns",
    "no_pixel_data": "no PixelData element",
    "null_byte_tag": "a NUL inside SeriesDescription",
    "overly_large_numeric": "IS/DS values out of range",
    "private_tag": "private creator blocks with private elements",
    "studyuid_mismatch": "StudyInstanceUID differs from the rest of its study",
    "pid_mismatch": "PatientID differs from the rest of its study",
    "unsupported_modality": "Modality OT on a mammography image",
    "unsupported_sop": "a Grayscale Softcopy Presentation State instead of an image",
    "duplicate_sop": "same SOPInstanceUID as the image before it",
    "invalid_date": "StudyDate 20231345",
    "raw_not_for_presentation": "MG For Processing, PresentationIntentType FOR PROCESSING",
    "encapsulated_pdf": "an Encapsulated PDF instead of an image",
}
ENCODING_PRESETS = {
    "charset_latin1": "names in ISO_IR 100 (Latin-1)",
    "charset_utf8": "names in ISO_IR 192 (UTF-8)",
    "charset_japanese": "names in ISO 2022 IR 87 (Japanese, escape sequences)",
    "implicit_vr": "Implicit VR Little Endian",
    "big_endian": "Explicit VR Big Endian (retired, still found in archives)",
    "deflated": "Deflated Explicit VR Little Endian",
    "no_preamble": "bare dataset: no preamble, no file meta",
    "compressed": "RLE Lossless encapsulated pixel data",
    "long_values": "values exactly at their VR's maximum length",
    "nested_sequences": "PatientID also inside OtherPatientIDsSequence",
    "phi_everywhere": "a unique marker in every identifying text element of PS3.15's table, "
                      "in items at depths 1-3, a private block, a UN element and an overlay "
                      "comment; the manifest lists them (to test --deid)",
}
BROKEN_PRESETS = {
    "truncated": "a DICOM file cut off inside its pixel data",
    "not_dicom": "a text file without extension among the DICOM files",
    "zero_byte": "an empty file",
}
STUDY_PRESETS = {
    "default": "one patient, current 4-view screening mammography (MG)",
    "large_scale_shallow": "a normal current study plus one internal prior per fault",
    "external_prior": "a current study plus a prior from another institution",
    "multi_patient": "N patients x M studies (default 3 x 2) for volume tests",
    "ct": "a CT volume, 512x512x16 bit (default 16 slices)",
    "mr": "an MR series, 256x256x16 bit (default 16 slices)",
}


def scenario_catalogue() -> dict[str, str]:
    """Every --scenario name with its one-line description."""
    names = dict(STUDY_PRESETS)
    for fault, what in FAULTS.items():
        names[f"cu_{fault}"] = f"current study, last image: {what}"
        names[f"pr_{fault}"] = f"internal prior, last image: {what}"
    return names | ENCODING_PRESETS | BROKEN_PRESETS


MG_VIEWS = (("RCC", "R", "CC"), ("LCC", "L", "CC"), ("RMLO", "R", "MLO"), ("LMLO", "L", "MLO"))
VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
DEFAULT_SIZES = {"MG": (128, 128), "CT": (512, 512), "MR": (256, 256)}
SOP_CLASSES = {"MG": "DigitalMammographyXRayImageStorageForPresentation",
               "CT": "CTImageStorage", "MR": "MRImageStorage"}


def sop_class(keyword: str) -> str:
    """A SOP class UID by pydicom's keyword."""
    return UID_BY_KEYWORD[keyword]


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """What --generate was asked for (validated in options)."""

    scenarios: tuple[str, ...]
    seed: int
    patients: int | None
    studies: int | None
    series: int | None
    instances: int | None
    modality: str | None
    size: tuple[int, int] | None
    layout: str
    config: dict[str, Any] | None
    config_name: str = ""


@dataclasses.dataclass(frozen=True)
class Patient:
    """A synthetic patient."""

    patient_id: str
    name: str
    birth_date: str
    issuer: str


@dataclasses.dataclass(frozen=True)
class Study:
    """A synthetic study; role is current, internal_prior or external_prior."""

    uid: str
    date: str
    time: str
    accession: str
    study_id: str
    description: str
    role: str
    institution: str


@dataclasses.dataclass(frozen=True)
class InstancePlan:
    """One file to write (or deliberately not write), with what ingestion should do."""

    scenario: str
    patient: Patient
    study: Study
    series_uid: str
    series_number: int
    modality: str
    sop_uid: str
    number: int
    view: tuple[str, str, str] | None
    size: tuple[int, int]
    fault: str | None
    encoding: str | None
    expect: Expect
    relpath: str
    tags: tuple[tuple[int, Any], ...] = ()


class Planner:
    """Deterministic source of UIDs, IDs, names and dates for one seed."""

    def __init__(self, request: GenerateRequest):
        self.req = request
        self.rng = random.Random(request.seed)
        self.counter = 0

    def uid(self, *parts: object) -> str:
        """A UID derived from the seed and parts (same inputs, same UID)."""
        return pydicom.uid.generate_uid(entropy_srcs=[str(self.req.seed), *map(str, parts)])

    def patient(self, scenario: str, index: int) -> Patient:
        """A patient aged 50-75 with an ID unique in this run."""
        self.counter += 1
        year = 2025 - self.rng.randint(50, 75)
        family = self.rng.choice(["SMITH", "JONES", "GARCIA", "MILLER", "DAVIS", "MARTIN"])
        given = self.rng.choice(["ANNA", "MARIA", "LINDA", "SUSAN", "KAREN", "HELEN"])
        return Patient(f"PAT{self.req.seed % 10000:04d}{self.counter:05d}", f"{family}^{given}",
                       f"{year}{self.rng.randint(1, 12):02d}{self.rng.randint(1, 28):02d}",
                       "GENHOSP")

    def study(self, patient: Patient, role: str, years_back: int, key: object) -> Study:
        """A study of a patient; priors are older, external priors from elsewhere."""
        year = 2025 - years_back
        external = role == "external_prior"
        accession = f"{'EXT' if external else 'ACC'}{self.rng.randint(0, 10**9):09d}"[:16]
        return Study(self.uid("study", patient.patient_id, key),
                     f"{year}{self.rng.randint(1, 12):02d}{self.rng.randint(1, 28):02d}",
                     f"{self.rng.randint(7, 18):02d}{self.rng.randint(0, 59):02d}00",
                     accession, f"S{self.rng.randint(0, 99999):05d}",
                     "Screening mammography", role,
                     "OTHER IMAGING CENTER" if external else "GENERAL HOSPITAL")


def parse_size(text: str) -> tuple[int, int]:
    """'64x64' -> (64, 64)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or not 1 <= int(m[1]) <= 65535 or not 1 <= int(m[2]) <= 65535:
        raise UsageError(f"--size {text!r}: use ROWSxCOLS, e.g. 64x64")
    return int(m[1]), int(m[2])


def generate_plan_from_args(ns: argparse.Namespace) -> GenerateRequest:
    """Validate the --generate options (and the --config file) into a request."""
    known = scenario_catalogue()
    for name in ns.scenario or ():
        if name not in known:
            guess = difflib.get_close_matches(name, list(known), n=1)
            hint = f"did you mean {guess[0]}?" if guess else "see --list-scenarios"
            raise UsageError(f"--scenario {name}: unknown scenario; {hint}")
    for flag in ("patients", "studies", "series", "instances"):
        value = getattr(ns, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be at least 1")
    config = load_config(Path(ns.config)) if ns.config else None
    scenarios = tuple(ns.scenario or (() if config else ("default",)))
    return GenerateRequest(scenarios, ns.seed, ns.patients, ns.studies, ns.series,
                           ns.instances, ns.modality, parse_size(ns.size) if ns.size else None,
                           ns.layout, config, ns.config or "")


def plan_generation(req: GenerateRequest) -> list[InstancePlan]:
    """Expand scenarios (and the config) into the instances to write, in a fixed order."""
    planner = Planner(req)
    plans: list[InstancePlan] = []
    for index, name in enumerate(req.scenarios):
        plans.extend(plan_scenario(planner, name, index))
    if req.config is not None:
        plans.extend(plan_config(planner, req.config))
    return plans


def plan_scenario(planner: Planner, name: str, index: int) -> list[InstancePlan]:
    """The instances of one named scenario."""
    req = planner.req
    if name in ("ct", "mr"):
        return plan_volume(planner, name, name.upper())
    patients = req.patients or (3 if name == "multi_patient" else 1)
    studies = req.studies or (2 if name == "multi_patient" else 1)
    plans: list[InstancePlan] = []
    for p in range(patients):
        patient = planner.patient(name, p)
        for s in range(studies):
            role = "current" if s == 0 else "internal_prior"
            study = planner.study(patient, role, s * 2, (name, index, s))
            plans += plan_study(planner, name, patient, study, req.modality or "MG",
                                encoding=name if name in ENCODING_PRESETS else None)
        if name.startswith(("cu_", "pr_")):
            fault = name[3:]
            prior = planner.study(patient, "internal_prior", 3, (name, index, "prior"))
            plans += plan_study(planner, name, patient, prior, "MG")
            target = plans[-1] if name.startswith("pr_") else \
                [x for x in plans if x.study.role == "current"][-1]
            plans = [apply_fault_plan(planner, x, fault, plans) if x is target else x
                     for x in plans]
        elif name == "large_scale_shallow":
            for years, fault in enumerate(FAULTS, start=1):
                prior = planner.study(patient, "internal_prior", years, (name, fault))
                study_plans = plan_study(planner, name, patient, prior, "MG")
                study_plans[-1] = apply_fault_plan(planner, study_plans[-1], fault, study_plans)
                plans += study_plans
        elif name == "external_prior":
            ext = planner.study(patient, "external_prior", 4, (name, "external"))
            plans += plan_study(planner, name, dataclasses.replace(
                patient, issuer="OTHERHOSP", patient_id="X" + patient.patient_id), ext, "MG")
        elif name in BROKEN_PRESETS:
            plans[-1] = dataclasses.replace(plans[-1], fault=name, expect=Expect.REJECT)
    return plans


def plan_study(planner: Planner, scenario: str, patient: Patient, study: Study,
               modality: str, encoding: str | None = None) -> list[InstancePlan]:
    """One series of a study: MG cycles the four views, CT/MR are slices."""
    req = planner.req
    count = req.instances or (4 if modality == "MG" else 16)
    plans = []
    for series_index in range(req.series or 1):
        series_uid = planner.uid("series", study.uid, series_index)
        for n in range(count):
            view = MG_VIEWS[n % 4] if modality == "MG" else None
            sop_uid = planner.uid("sop", series_uid, n)
            plans.append(InstancePlan(
                scenario, patient, study, series_uid, series_index + 1, modality, sop_uid,
                n + 1, view, req.size or DEFAULT_SIZES[modality], None, encoding, Expect.ACCEPT,
                instance_relpath(req.layout, patient, study.uid, series_uid, sop_uid)))
    return plans


def plan_volume(planner: Planner, name: str, modality: str) -> list[InstancePlan]:
    """CT/MR presets: patients x studies of one volume each."""
    req = planner.req
    plans: list[InstancePlan] = []
    for p in range(req.patients or 1):
        patient = planner.patient(name, p)
        for s in range(req.studies or 1):
            study = planner.study(patient, "current" if s == 0 else "internal_prior", s,
                                  (name, p, s))
            study = dataclasses.replace(study, description=f"{modality} volume")
            plans += plan_study(planner, name, patient, study, modality)
    return plans


def instance_relpath(layout: str, patient: Patient, study_uid: str, series_uid: str,
                     sop_uid: str) -> str:
    """Where an instance goes: PatientID/Study/Series/SOP, or flat SOP; each a single path
    component, whatever the values hold (a PatientID may be '../..' or '/etc')."""
    parts = [sop_uid] if layout == "flat" else [patient.patient_id, study_uid, series_uid,
                                                 sop_uid]
    return "/".join(path_component(part) for part in parts)


def path_component(value: str) -> str:
    """value as one file name: no separator, NUL or '..' can take it out of its directory."""
    name = re.sub(r"[/\\\x00]", "_", value)
    return "_" + name if name in ("", ".", "..") else name


def inside(output: Path, relpath: str) -> Path:
    """output / relpath, refusing a relative path that could lead out of output."""
    parts = Path(relpath).parts
    if not parts or Path(relpath).is_absolute() or ".." in parts:
        raise PermissionError(f"refusing to write outside {output}: {relpath!r}")
    return output / relpath


def apply_fault_plan(planner: Planner, plan: InstancePlan, fault: str,
                     siblings: list[InstancePlan]) -> InstancePlan:
    """Mark an instance with its fault; faults that change identity change the plan too."""
    plan = dataclasses.replace(plan, fault=fault,
                               expect=Expect.ABSENT if fault == "missing_dicom" else Expect.REJECT)
    if fault == "duplicate_sop":
        before = [x for x in siblings if x.study is plan.study and x.number == plan.number - 1]
        if before:
            plan = dataclasses.replace(plan, sop_uid=before[0].sop_uid,
                                       relpath=plan.relpath + "_duplicate")
    elif fault == "studyuid_mismatch":
        plan = dataclasses.replace(plan, study=dataclasses.replace(
            plan.study, uid=planner.uid("mismatch", plan.study.uid)))
    elif fault == "pid_mismatch":
        plan = dataclasses.replace(plan, patient=dataclasses.replace(
            plan.patient, patient_id=plan.patient.patient_id + "X"))
    return plan


# ── power customize: the user's JSON config shape ─────────────────────────────────────────


def load_config(path: Path) -> dict[str, Any]:
    """Read and validate a --config file; errors name the JSON path (exit 2)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--config {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--config {path}: malformed JSON at line {exc.lineno} column "
                         f"{exc.colno}: {exc.msg}") from None
    return check_config(config, path)


def check_config(config: Any, path: Path | str) -> dict[str, Any]:
    """Validate a config object (from a file, or from the --ui page); errors name the JSON
    path of the problem (exit 2)."""
    if not isinstance(config, dict):
        raise UsageError(f"--config {path}: the top level must be an object")
    allowed = {"outputDir", "seed", "patient", "current_study", "internal_priors",
               "external_priors"}
    for key in config:
        if key not in allowed:
            raise UsageError(f"--config {path}: {key}: unknown key; expected one of "
                             f"{', '.join(sorted(allowed))}")
    patient = config.get("patient", {})
    if not isinstance(patient, dict):
        raise UsageError(f"--config {path}: patient: must be an object")
    for key, value in patient.items():
        if key not in PATIENT_KEYS:
            raise UsageError(f"--config {path}: patient.{key}: unknown key; expected one of "
                             f"{', '.join(PATIENT_KEYS)}")
        config_tag_value(key, value, f"patient.{key}", path, deliberate=False)
    if "current_study" in config:
        check_study_config(config["current_study"], "current_study", path)
    for group in ("internal_priors", "external_priors"):
        entries = config.get(group, [])
        if not isinstance(entries, list):
            raise UsageError(f"--config {path}: {group}: must be a list of studies")
        for i, entry in enumerate(entries):
            check_study_config(entry, f"{group}[{i}]", path)
    return config


PATIENT_KEYS = ("PatientID", "PatientName", "PatientBirthDate")


def check_study_config(study: Any, where: str, path: Path | str) -> None:
    """Validate one study object of the config, naming the JSON path of any problem."""
    if not isinstance(study, dict):
        raise UsageError(f"--config {path}: {where}: must be an object")
    for key in study:
        if key not in {"cancerous", "count", "description", "images", "date"}:
            raise UsageError(f"--config {path}: {where}.{key}: unknown key")
    count = study.get("count", 4)
    if not isinstance(count, int) or count < 0:
        raise UsageError(f"--config {path}: {where}.count: must be a whole number >= 0")
    for key, keyword in (("description", "StudyDescription"), ("date", "StudyDate")):
        if key in study:
            config_tag_value(keyword, study[key], f"{where}.{key}", path, deliberate=False)
    for i, image in enumerate(study.get("images", [])):
        here = f"{where}.images[{i}]"
        if not isinstance(image, dict) or not isinstance(image.get("tags", {}), dict):
            raise UsageError(f"--config {path}: {here}: must be an object with \"tags\"")
        fault = image.get("fault")
        if fault is not None and fault not in FAULTS:
            raise UsageError(f"--config {path}: {here}.fault: unknown fault {fault!r}")
        for key, value in image.get("tags", {}).items():
            config_tag_value(key, value, f"{here}.tags.{key}", path, deliberate=bool(fault))


def config_tag_value(key: str, value: Any, where: str, path: Path | str, *,
                     deliberate: bool) -> tuple[int, str]:
    """Resolve a config tag (keyword or hex) and check its value against the VR."""
    try:
        specs = parse_tag_specs(key)
    except UsageError as exc:
        raise UsageError(f"--config {path}: {where}: {str(exc).split(': ', 1)[-1]}") from None
    if len(specs) != 1 or not specs[0].plain or specs[0].leaf.creator:
        raise UsageError(f"--config {path}: {where}: name one public tag")
    tag = specs[0].leaf.tag
    try:
        vr = pydicom.datadict.dictionary_VR(tag)
    except KeyError:
        raise UsageError(f"--config {path}: {where}: tag not in the DICOM dictionary") from None
    if vr == "SQ":
        raise UsageError(f"--config {path}: {where}: sequences cannot be set from the config")
    if not deliberate:
        values = value if isinstance(value, list) else [value]
        for v in values:
            try:
                pydicom.valuerep.validate_value(vr.split(" or ")[0], v, pydicom.config.RAISE)
            except ValueError as exc:
                raise UsageError(f"--config {path}: {where}: invalid for VR {vr}: {exc} "
                                 "(mark the image with \"fault\" to write it anyway)") from None
    return tag, vr


def plan_config(planner: Planner, config: dict[str, Any]) -> list[InstancePlan]:
    """Instances for the config's current study, internal and external priors."""
    patient = planner.patient("config", 0)
    overrides = config.get("patient", {})
    patient = dataclasses.replace(
        patient, patient_id=str(overrides.get("PatientID", patient.patient_id)),
        name=str(overrides.get("PatientName", patient.name)),
        birth_date=str(overrides.get("PatientBirthDate", patient.birth_date)))
    studies = []
    if "current_study" in config:
        studies.append(("current", config["current_study"], 0))
    studies += [("internal_prior", s, i + 1) for i, s in enumerate(config.get("internal_priors",
                                                                              []))]
    studies += [("external_prior", s, i + 2) for i, s in enumerate(config.get("external_priors",
                                                                              []))]
    plans: list[InstancePlan] = []
    for role, cfg, years in studies:
        study = planner.study(patient, role, years, ("config", role, years))
        description = cfg.get("description", study.description)
        if cfg.get("cancerous"):
            description += " - cancerous"
        study = dataclasses.replace(study, description=description,
                                    date=str(cfg.get("date", study.date)))
        who = patient if role != "external_prior" else dataclasses.replace(
            patient, issuer="OTHERHOSP")
        images = cfg.get("images", [])
        count = max(len(images), cfg.get("count", 4))
        req = dataclasses.replace(planner.req, instances=count, series=1)
        sub = Planner(req)
        sub.rng = planner.rng
        study_plans = plan_study(sub, "config", who, study, "MG")
        for i, image in enumerate(images):
            tags = tuple((config_tag_value(k, v, "", Path(""), deliberate=True)[0], v)
                         for k, v in image.get("tags", {}).items())
            fault = image.get("fault")
            plan = dataclasses.replace(study_plans[i], tags=tags)
            study_plans[i] = apply_fault_plan(planner, plan, fault, study_plans) \
                if fault else plan
        plans += study_plans
    return plans


# ── building datasets ─────────────────────────────────────────────────────────────────────


def pixel_bytes(rows: int, cols: int, seed: int, order: str = "<") -> bytes:
    """A cheap deterministic 16-bit pattern (no numpy): diagonal ramps, phase set by seed."""
    return bytes(pixel_window(rows, cols, seed, order))


def pixel_window(rows: int, cols: int, seed: int, order: str = "<") -> memoryview:
    """pixel_bytes without the copy: every image is a window onto one taller ramp image kept
    per thread, so the slices of a volume differ (systems that spot duplicate pixel data
    see no duplicates)."""
    width = cols * 2
    tall = ramp_image(rows + 255, cols, order)
    start = (seed % 256) * width
    return memoryview(tall)[start:start + rows * width]


_thread_ramps = threading.local()  # each worker keeps its own last ramp image


def ramp_image(rows: int, cols: int, order: str) -> bytes:
    """rows x cols samples of ((row + column) * 16) mod 4096, for this thread."""
    key = (rows, cols, order)
    if getattr(_thread_ramps, "key", None) != key:
        period = struct.pack(f"{order}256H", *((i * 16) & 0x0FFF for i in range(256)))
        line = (period * (cols // 256 + 2))[: 2 * (cols + 256)]  # the ramp repeats every 256
        _thread_ramps.key = key
        _thread_ramps.image = b"".join(line[(r % 256) * 2:(r % 256) * 2 + cols * 2]
                                       for r in range(rows))
    return _thread_ramps.image


def rle_encode_16bit(pixels: bytes, order: str = "<") -> bytes:
    """RLE Lossless (PS3.5 Annex G) frame for 16-bit samples, literal runs only."""
    high = pixels[1::2] if order == "<" else pixels[0::2]
    low = pixels[0::2] if order == "<" else pixels[1::2]
    segments = []
    for plane in (high, low):
        out = bytearray()
        for i in range(0, len(plane), 128):
            chunk = plane[i:i + 128]
            out += bytes([len(chunk) - 1]) + chunk
        if len(out) % 2:
            out += b"\x00"
        segments.append(bytes(out))
    header = struct.pack("<16L", 2, 64, 64 + len(segments[0]), *([0] * 13))
    return header + b"".join(segments)


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def build_instance(plan: InstancePlan, seed: int) -> Dataset:
    """The dataset of one planned instance, before its fault and encoding are applied."""
    if plan.fault == "unsupported_sop":
        ds = base_dataset(plan, "GrayscaleSoftcopyPresentationStateStorage")
        add_presentation_state(ds, plan)
    elif plan.fault == "encapsulated_pdf":
        ds = base_dataset(plan, "EncapsulatedPDFStorage")
        add_encapsulated_pdf(ds)
    else:
        ds = base_dataset(plan, SOP_CLASSES[plan.modality])
        add_image(ds, plan)
        {"MG": add_mammography, "CT": add_ct, "MR": add_mr}[plan.modality](ds, plan)
    for elem in instance_elements(plan, seed):
        ds[elem.tag] = elem
    return ds


VOLUME_THICKNESS = {"CT": 1.0, "MR": 3.0}


def varying_values(plan: InstancePlan) -> list[tuple[str, str, Any]]:
    """(keyword, VR, value) of the text elements that differ between the images of one
    series; with its pixel data, they are all that does (see series_template)."""
    values: list[tuple[str, str, Any]] = [("SOPInstanceUID", "UI", plan.sop_uid),
                                          ("InstanceNumber", "IS", plan.number)]
    if plan.modality in VOLUME_THICKNESS and not has_no_image(plan):
        z = round(-VOLUME_THICKNESS[plan.modality] * plan.number, 2)
        values += [("ImagePositionPatient", "DS", [-180, -180, z]), ("SliceLocation", "DS", z)]
    return values


def has_no_image(plan: InstancePlan) -> bool:
    """The faults whose instance carries no pixel data."""
    return plan.fault in ("unsupported_sop", "encapsulated_pdf")


def instance_pixels(plan: InstancePlan, seed: int) -> memoryview:
    """One image's pixel data: a window onto this thread's ramp (see pixel_window)."""
    rows, cols = plan.size
    return pixel_window(rows, cols, seed + plan.number)


def instance_elements(plan: InstancePlan, seed: int) -> Dataset:
    """The elements that differ between the images of one series, as pydicom elements."""
    ds = Dataset()  # add_new with the VR: cheaper than attribute access, called per image
    for keyword, vr, value in varying_values(plan):
        ds.add_new(keyword, vr, value)
    if not has_no_image(plan):
        ds.add_new("PixelData", "OW", bytes(instance_pixels(plan, seed)))
    return ds


def base_dataset(plan: InstancePlan, sop_keyword: str) -> Dataset:
    """Patient, study, series, equipment and SOP common modules."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class(sop_keyword)
    meta.MediaStorageSOPInstanceUID = plan.sop_uid
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"DICOM_SAR_{__version__}"[:16]
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\x00" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = plan.study.date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = plan.study.time
    ds.AccessionNumber = plan.study.accession
    ds.Modality = plan.modality
    ds.Manufacturer = "DICOM_SAR"
    ds.InstitutionName = plan.study.institution
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = plan.study.description
    ds.SeriesDescription = f"{plan.modality} series {plan.series_number}"
    ds.ManufacturerModelName = "SYNTHETIC"
    ds.PatientName = plan.patient.name
    ds.PatientID = plan.patient.patient_id
    ds.IssuerOfPatientID = plan.patient.issuer
    ds.PatientBirthDate = plan.patient.birth_date
    ds.PatientSex = "F" if plan.modality == "MG" else "O"
    age = int(plan.study.date[:4]) - int(plan.patient.birth_date[:4])
    ds.PatientAge = f"{max(0, min(age, 999)):03d}Y"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = __version__
    ds.StudyInstanceUID = plan.study.uid
    ds.SeriesInstanceUID = plan.series_uid
    ds.StudyID = plan.study.study_id
    ds.SeriesNumber = plan.series_number
    return ds


def add_image(ds: Dataset, plan: InstancePlan) -> None:
    """Image pixel module: 16-bit MONOCHROME2 (the pixels come with instance_elements)."""
    rows, cols = plan.size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0


def add_mammography(ds: Dataset, plan: InstancePlan) -> None:
    """DX/MG modules for a For Presentation mammogram of one view."""
    code, lat, view = plan.view or MG_VIEWS[0]
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = lat
    ds.PatientOrientation = ["P", "L"] if lat == "R" else ["A", "R"]
    ds.BodyPartExamined = "BREAST"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.OrganExposed = "BREAST"
    ds.BurnedInAnnotation = "NO"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [0.1, 0.1]
    ds.DistanceSourceToDetector = 660
    ds.DistanceSourceToPatient = 600
    ds.EstimatedRadiographicMagnificationFactor = 1.1
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.AcquisitionContextSequence = pydicom.Sequence()
    ds.AnatomicRegionSequence = pydicom.Sequence([code_item("76752008", "SCT", "Breast")])
    view_code, meaning = VIEW_CODES[view]
    item = code_item(view_code, "SCT", meaning)
    item.ViewModifierCodeSequence = pydicom.Sequence()
    ds.ViewCodeSequence = pydicom.Sequence([item])
    ds.SeriesDescription = f"Screening {code}"


def add_ct(ds: Dataset, plan: InstancePlan) -> None:
    """CT image, image plane and frame of reference modules for one axial slice."""
    add_plane(ds, plan)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.KVP = 120
    ds.AcquisitionNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.WindowCenter, ds.WindowWidth = 40, 400


def add_mr(ds: Dataset, plan: InstancePlan) -> None:
    """MR image, image plane and frame of reference modules for one slice."""
    add_plane(ds, plan)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.ScanningSequence, ds.SequenceVariant = "SE", "NONE"
    ds.ScanOptions, ds.MRAcquisitionType = "", "2D"
    ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 500, 15, 1
    ds.MagneticFieldStrength = 1.5
    ds.ImagingFrequency = 63.87
    ds.AcquisitionNumber = 1
    ds.BodyPartExamined = "HEAD"


def add_plane(ds: Dataset, plan: InstancePlan) -> None:
    """Image plane and frame of reference of an axial stack (positions are per instance)."""
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid(entropy_srcs=[plan.series_uid, "for"])
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = VOLUME_THICKNESS[plan.modality]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]


def add_presentation_state(ds: Dataset, plan: InstancePlan) -> None:
    """A minimal Grayscale Softcopy Presentation State (the unsupported_sop fault)."""
    ds.Modality = "PR"
    ds.ContentLabel, ds.ContentDescription = "SYNTHETIC", "unsupported_sop fault"
    ds.ContentCreatorName = ""
    ds.PresentationCreationDate, ds.PresentationCreationTime = plan.study.date, plan.study.time
    ds.PresentationLUTShape = "IDENTITY"


def add_encapsulated_pdf(ds: Dataset) -> None:
    """An Encapsulated PDF document (the encapsulated_pdf fault)."""
    pdf = (b"%PDF-1.1\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
           b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")
    ds.Modality = "DOC"
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = "synthetic report"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")
    ds.ConceptNameCodeSequence = pydicom.Sequence()


def apply_fault(ds: Dataset, plan: InstancePlan) -> None:
    """Make the dataset carry exactly its fault (invalid values written as raw bytes)."""
    fault = plan.fault
    if fault == "bits_mismatch":
        ds.BitsStored, ds.HighBit = ds.BitsAllocated + 4, ds.BitsAllocated - 5
    elif fault == "corrupted_pixel":
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    elif fault == "large_dimensions":
        ds.Rows = ds.Columns = 65535
    elif fault == "missing_required_tag":
        del ds.Rows, ds.Columns
    elif fault == "no_pixel_data":
        del ds.PixelData
    elif fault == "null_byte_tag":
        ds[0x0008103E] = raw_element(0x0008103E, "LO", b"Screening\x00Mammo ")
    elif fault == "overly_large_numeric":
        ds[0x00200013] = raw_element(0x00200013, "IS", b"999999999999")
        ds[0x00101030] = raw_element(0x00101030, "DS", b"9.9e999 ")
    elif fault == "private_tag":
        block = ds.private_block(0x0009, "DICOM_SAR TEST", create=True)
        block.add_new(0x01, "LO", "private value")
        block.add_new(0x02, "US", 42)
        other = ds.private_block(0x0019, "DICOM_SAR OTHER", create=True)
        other.add_new(0x10, "SH", "SECOND")
    elif fault == "unsupported_modality":
        ds.Modality = "OT"
    elif fault == "invalid_date":
        ds[0x00080020] = raw_element(0x00080020, "DA", b"20231345")
    elif fault == "raw_not_for_presentation":
        ds.PresentationIntentType = "FOR PROCESSING"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class(
            "DigitalMammographyXRayImageStorageForProcessing")
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        for name in ("WindowCenter", "WindowWidth", "PresentationLUTShape"):
            delattr(ds, name)


CHARSET_NAMES = {
    "charset_latin1": ("ISO_IR 100", "MÜLLER^JÜRGEN"),
    "charset_utf8": ("ISO_IR 192", "ØSTER^ZOË=王^小東"),
    "charset_japanese": (["", "ISO 2022 IR 87"], "YAMADA^TAROU=山田^太郎=やまだ^たろう"),
}
ENCODING_SYNTAX = {
    "implicit_vr": IMPLICIT_LE,
    "big_endian": EXPLICIT_BE,
    "deflated": DEFLATED,
    "compressed": UID_BY_KEYWORD["RLELossless"],
}


def apply_encoding(ds: Dataset, plan: InstancePlan) -> None:
    """Encoding presets: character sets, transfer syntaxes, long and nested values."""
    enc = plan.encoding
    if enc in CHARSET_NAMES:
        ds.SpecificCharacterSet, ds.PatientName = CHARSET_NAMES[enc]
    elif enc in ENCODING_SYNTAX:
        ds.file_meta.TransferSyntaxUID = ENCODING_SYNTAX[enc]
        if enc == "big_endian" and "PixelData" in ds:
            ds.PixelData = pixel_bytes(ds.Rows, ds.Columns, plan.number, ">")
        if enc == "compressed" and "PixelData" in ds:
            frame = rle_encode_16bit(ds.PixelData)
            ds.PixelData = pydicom.encaps.encapsulate([frame])
            ds["PixelData"].VR = "OB"
            ds.LossyImageCompression = "00"
    elif enc == "no_preamble":
        ds.preamble = None
    elif enc == "long_values":
        ds.PatientID = (plan.patient.patient_id + "L" * 64)[:64]
        ds.StudyID = "S" * 16
        ds.AccessionNumber = (plan.study.accession + "9" * 16)[:16]
        ds.InstitutionName = "I" * 64
        ds.StationName = "W" * 16
        ds.PatientName = "F" * 30 + "^" + "G" * 33
    elif enc == "nested_sequences":
        item = Dataset()
        item.PatientID = plan.patient.patient_id
        item.IssuerOfPatientID = "OTHERHOSP"
        item.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = pydicom.Sequence([item])
    elif enc == "phi_everywhere":
        plant_phi(ds, plan)


PHI_TEXT_VRS = ("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT")
PHI_NESTED = ("depth1", "depth2", "depth3", "depth3b", "other_id", "other_issuer", "private",
              "un", "overlay")


def phi_places() -> list[int]:
    """The current text elements of Table E.1-1 (every one the profile acts on)."""
    tags = []
    for row in DEID_TABLE.split()[::3]:
        entry = DICOM_DICTIONARY.get(int(row, 16)) if re.fullmatch(r"[0-9a-f]{8}", row) else None
        if entry and entry[0] in PHI_TEXT_VRS and not entry[3] and row[:4] not in ("0000", "0002"):
            tags.append(int(row, 16))
    return tags


def phi_markers(plan: InstancePlan) -> dict[str, str]:
    """Where each marker goes (a tag in hex, or a PHI_NESTED place) -> the marker, unique to
    the instance and the place."""
    places = [f"{tag:08x}" for tag in phi_places()] + list(PHI_NESTED)
    return {place: "PHI" + hashlib.sha256(f"{plan.sop_uid}/{place}".encode()).hexdigest()[
        :10].upper() for place in places}


def plant_phi(ds: Dataset, plan: InstancePlan) -> None:
    """The phi_everywhere preset: its markers in every place phi_markers names."""
    markers = phi_markers(plan)
    for tag in phi_places():
        ds.add_new(tag, DICOM_DICTIONARY[tag][0], markers[f"{tag:08x}"])
    sop = plan.sop_uid

    def referenced(extra: dict[str, str], inner: list[Dataset] | None = None) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, sop
        for keyword, value in extra.items():
            setattr(item, keyword, value)
        if inner is not None:
            item.SourceImageSequence = pydicom.Sequence(inner)
        return item

    depth3 = referenced({"PatientName": markers["depth3"],
                         "ReferringPhysicianName": markers["depth3b"]})
    depth2 = referenced({"InstitutionName": markers["depth2"]}, [depth3])
    region = code_item("T-D3000", "SRT", "Chest")
    region.OperatorsName = markers["depth1"]
    region.ReferencedImageSequence = pydicom.Sequence([depth2])
    ds.AnatomicRegionSequence = pydicom.Sequence([region])
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = markers["other_id"], markers["other_issuer"]
    ds.OtherPatientIDsSequence = pydicom.Sequence([other])
    ds.private_block(0x0029, "PHI TEST", create=True).add_new(0x10, "LO", markers["private"])
    ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True).add_new(
        0x10, "OB", b"SV10\x04\x03\x02\x01")
    ds.add_new(0x0018FFF0, "UN", markers["un"].encode() + b" ")  # a tag no dictionary knows
    ds.add_new(0x60004000, "LT", markers["overlay"])


def encode_instance(plan: InstancePlan, seed: int) -> bytes:
    """The bytes of one planned file (broken presets are cut or replaced here)."""
    if plan.fault == "not_dicom":
        return b"This is not a DICOM file; it has no extension, like its neighbours.\n"
    if plan.fault == "zero_byte":
        return b""
    ds = build_instance(plan, seed)
    for tag, value in plan.tags:
        vr = pydicom.datadict.dictionary_VR(tag).split(" or ")[0]
        if plan.fault and isinstance(value, str):
            encoded = value.encode("latin-1", "replace")
            ds[tag] = raw_element(tag, vr, encoded + (b" " if len(encoded) % 2 else b""))
        else:
            ds[tag] = DataElement(tag, vr, value)
    if plan.fault:
        apply_fault(ds, plan)
    if plan.encoding:
        apply_encoding(ds, plan)
    data = encode_dataset(ds, plan)
    if plan.fault == "truncated":
        return data[: len(data) - max(2, (ds.Rows * ds.Columns) // 3) - 1]
    return data


def encode_dataset(ds: Dataset, plan: InstancePlan) -> bytes:
    """pydicom's encoding of a built dataset (no file meta for the no_preamble preset)."""
    fp = DicomBytesIO()
    if plan.encoding == "no_preamble":
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        pydicom.dcmwrite(fp, ds, implicit_vr=False, little_endian=True)
    else:
        pydicom.dcmwrite(fp, ds, enforce_file_format=True)
    return fp.getvalue()


@dataclasses.dataclass(frozen=True)
class SeriesTemplate:
    """A series' encoded bytes, cut around the elements that differ per instance.

    pieces holds bytes (shared by every instance) and tags (encoded per instance); the file
    meta group length is the one value that is recomputed.
    """

    head: bytes  # preamble and DICM
    meta_static: tuple[bytes, bytes]  # meta elements before and after (0002,0003)
    pieces: tuple[bytes | BaseTag, ...]
    pixel_length: int  # PixelData's header is in pieces; only its value is per instance


PIXEL_TAG = 0x7FE00010
_thread_templates = threading.local()  # each worker keeps its own few templates


def encode_element(elem: DataElement) -> bytes:
    """One element in explicit VR little endian, encoded by pydicom."""
    return encode_elements([elem])[0]


def encode_elements(elems: list[DataElement]) -> list[bytes]:
    """Each element in explicit VR little endian, encoded by pydicom into one buffer."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    marks = [0]
    for elem in elems:
        write_data_element(fp, elem)
        marks.append(fp.tell())
    data = fp.getvalue()
    return [data[a:b] for a, b in itertools.pairwise(marks)]


def templated(plan: InstancePlan) -> bool:
    """Plain volume images, the bulk of large runs, are encoded from a series template."""
    return (plan.modality in VOLUME_THICKNESS and plan.fault is None and plan.encoding is None
            and not plan.tags)


def series_template(plan: InstancePlan, seed: int) -> SeriesTemplate | None:
    """Cut plan's full encoding into a template; None if reassembly would not be identical."""
    ds = build_instance(plan, seed)
    full = encode_dataset(ds, plan)
    varying = set(instance_elements(plan, seed).keys())
    pydicom.dataset.validate_file_meta(ds.file_meta)  # adds what dcmwrite adds
    tags = [e.tag for e in ds.file_meta if e.tag != 0x00020000]
    meta = [encode_element(ds.file_meta[t]) for t in tags]
    at = tags.index(0x00020003)
    pieces: list[bytes | BaseTag] = []
    run: list[bytes] = []
    for elem in ds:
        encoded = encode_element(elem)
        if elem.tag == PIXEL_TAG:  # a fixed length per series: keep the header
            run.append(encoded[: len(encoded) - len(elem.value)])
        if elem.tag in varying:
            pieces += [b"".join(run), elem.tag]
            run = []
        else:
            run.append(encoded)
    pieces.append(b"".join(run))
    template = SeriesTemplate(full[:132], (b"".join(meta[:at]), b"".join(meta[at + 1:])),
                              tuple(pieces), len(ds.PixelData))
    return template if b"".join(from_template(template, plan, seed) or ()) == full else None


def from_template(template: SeriesTemplate, plan: InstancePlan, seed: int
                  ) -> list[bytes | memoryview] | None:
    """The chunks of one instance's file from its series template (None if it cannot be)."""
    pixels = instance_pixels(plan, seed)
    if len(pixels) != template.pixel_length:
        return None
    encoded = {(tag := tag_for_keyword(k)): encoded_text(tag, vr, v)
               for k, vr, v in varying_values(plan)}
    sop = encoded_text(0x00020003, "UI", plan.sop_uid)
    before, after = template.meta_static
    length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(before) + len(sop) + len(after))
    return [template.head, length, before, sop, after, *(
        p if isinstance(p, bytes) else pixels if p == PIXEL_TAG else encoded[p]
        for p in template.pieces)]


def encoded_text(tag: int, vr: str, value: Any) -> bytes:
    """A UI, IS or DS element in explicit VR little endian without pydicom's writer (which
    costs most of an image's CPU): the value as pydicom's value types print it, padded to
    even length as PS3.5 6.2 has it. tests/test_generate.py proves it pydicom's bytes."""
    if vr == "UI":
        text, pad = value, b"\x00"
    elif vr == "IS":
        text, pad = str(pydicom.valuerep.IS(value)), b" "
    else:  # DS
        text = "\\".join(str(pydicom.valuerep.DSfloat(v))
                         for v in (value if isinstance(value, list) else [value]))
        pad = b" "
    data = text.encode("ascii")
    if len(data) % 2:
        data += pad
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(data)) + data


def instance_chunks(plan: InstancePlan, seed: int) -> list[bytes | memoryview]:
    """The bytes of one planned file, from a per-thread series template where possible."""
    if not templated(plan):
        return [encode_instance(plan, seed)]
    key = dataclasses.replace(plan, sop_uid="", number=0, relpath="")
    cache = _thread_templates.__dict__.setdefault("cache", {})
    if key not in cache:
        if len(cache) >= 8:
            cache.clear()
        cache[key] = series_template(plan, seed)
    chunks = cache[key] and from_template(cache[key], plan, seed)
    return chunks or [encode_instance(plan, seed)]


def generate_task(plan: InstancePlan, output: Path, seed: int) -> FileResult:
    """Encode and write one planned instance atomically."""
    target = inside(output, plan.relpath)
    if plan.expect == Expect.ABSENT:
        return FileResult(target, Status.SKIPPED, message="missing_dicom: deliberately not written")
    chunks = instance_chunks(plan, seed)
    staged = stage_atomic(target, lambda out: write_all(out, chunks))
    return FileResult(target, Status.WRITTEN, nbytes=staged.nbytes, staged=staged)


def manifest_entry(plan: InstancePlan) -> dict[str, Any]:
    """One instance in manifest.json."""
    return {"path": plan.relpath, "scenario": plan.scenario, "expect": plan.expect,
            "fault": plan.fault, "encoding": plan.encoding, "modality": plan.modality,
            "patient_id": plan.patient.patient_id, "patient_name": plan.patient.name,
            "issuer_of_patient_id": plan.patient.issuer, "study_uid": plan.study.uid,
            "study_role": plan.study.role, "study_date": plan.study.date,
            "accession": plan.study.accession, "series_uid": plan.series_uid,
            "sop_uid": plan.sop_uid, "instance_number": plan.number,
            "view": plan.view[0] if plan.view else None,
            **({"markers": sorted(phi_markers(plan).values())}
               if plan.encoding == "phi_everywhere" else {})}


def write_manifest(output: Path, req: GenerateRequest, plans: list[InstancePlan]) -> Path:
    """manifest.json: every instance, its fault and what ingestion should do; plus a tree."""
    entries = [manifest_entry(p) for p in plans]
    patients: dict[str, Any] = {}
    for e in entries:
        patient = patients.setdefault(e["patient_id"], {"patient_id": e["patient_id"],
                                                        "studies": {}})
        study = patient["studies"].setdefault(e["study_uid"], {
            "study_uid": e["study_uid"], "role": e["study_role"], "accession": e["accession"],
            "date": e["study_date"], "series": {}})
        study["series"].setdefault(e["series_uid"], []).append(e["sop_uid"])
    # "generator" stays the first key: check_generate_output knows our trees by it
    manifest = {"generator": f"{PROG} {__version__}", "seed": req.seed,
                "scenarios": list(req.scenarios), "config": req.config_name or None,
                "layout": req.layout, "instances": entries,
                "patients": [{"patient_id": p["patient_id"], "studies": [
                    {**{k: v for k, v in s.items() if k != "series"},
                     "series": [{"series_uid": uid, "sop_uids": sops}
                                for uid, sops in s["series"].items()]}
                    for s in p["studies"].values()]} for p in patients.values()]}
    path = output / "manifest.json"

    def produce(out: BinaryIO) -> None:
        # streamed: json.dumps of 100,000 instances peaked at ~750 MB of short-lived strings
        text = io.TextIOWrapper(io.BufferedWriter(out), encoding="utf-8")
        json.dump(manifest, text, indent=1)
        text.write("\n")
        text.detach().detach()  # flushed, and out is left to write_atomic to close
    write_atomic(path, produce, fsync=False)
    return path


def check_generate_output(output: Path) -> None:
    """Refuse an output directory holding anything but an earlier --generate's tree (ours
    when its manifest.json says so): synthetic patients must not mix into real data, and
    someone else's manifest.json must not be replaced."""
    try:
        if not any(output.iterdir()):
            return
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise UsageError(f"--output {output} is a file; give a directory") from None
    try:
        with (output / "manifest.json").open("rb") as manifest:
            ours = f'"generator": "{PROG} '.encode() in manifest.read(256)  # its first key
    except OSError:
        ours = False
    if not ours:
        raise UsageError(f"--output {output} already holds files that --generate did not write; "
                         "choose a new or empty directory")


def plan_line(p: InstancePlan) -> str:
    """One planned file, as a dry run (and the --ui preview) shows it."""
    return (f"{p.scenario}  {p.patient.patient_id}  {p.study.role}  {p.modality}  "
            f"#{p.number}  {p.fault or '-'}  {p.expect}  {p.relpath}")


def run_generate(opts: Options, out: Callable[[str], None], stop: StopSignal,
                 watch: Callable[[int, int], None] | None = None) -> int:
    """Plan, then encode and write on the pool in plan order; manifest last. watch(1, files)
    hears of each file (the --ui page's progress)."""
    req: GenerateRequest = opts.generate
    output = opts.output or Path((req.config or {}).get("outputDir") or DEFAULT_GENERATED)
    check_generate_output(output)
    plans = plan_generation(req)
    if opts.dry_run:
        for p in plans:
            out(plan_line(p))
        print(f"dry run: would write {sum(p.expect != Expect.ABSENT for p in plans)} files "
              f"to {output}", file=sys.stderr)
        return stop.exit_status() or EXIT_OK
    reporter = Reporter(opts, out, total=len(plans))
    cands = (Candidate(Path(p.relpath), output) for p in plans)
    by_path = {p.relpath: p for p in plans}
    committer = Committer(opts.fsync)
    results = run_ordered(cands, lambda c: generate_task(by_path[str(c.path)], output, req.seed),
                          opts.workers, stop.event, opts.time_limit, ahead=committer.batch_files)
    for result in committed(results, committer):
        reporter.handle(result)
        if watch is not None:
            watch(1, len(plans))
    path = write_manifest(output, req, plans)
    log.info("generated %d planned instances into %s; manifest %s", len(plans), output, path)
    reporter.finish()
    return stop.exit_status() or exit_status(reporter.stats)


# ════════════════════════════════════════════════════════════════════════════════════════
# Mode --send: index headers on the pool, group by study, then one association per study
# per worker (each with its own AE), files streamed as their encoded bytes; per-file
# events come back through a queue so the main thread alone drives the progress bar and
# the logs
# ════════════════════════════════════════════════════════════════════════════════════════


AE_REPERTOIRE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # no backslash, no controls
UNCOMPRESSED = (EXPLICIT_LE, IMPLICIT_LE)
MAX_CONTEXTS = 128


@dataclasses.dataclass(frozen=True, kw_only=True)
class Peer:
    """What every destination has, DIMSE (SendTarget) or DICOMweb (WebTarget): how
    patiently to talk to it, what else the mode does, and TLS."""

    retries: int = 3
    verify: bool = False  # --send --verify
    echo_only: bool = False
    settle_timeout: float = 60.0
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_verify: bool = True
    context: Any = None  # the run's one ssl.SSLContext (see tls_context)

    @staticmethod
    def common(ns: argparse.Namespace) -> dict[str, Any]:
        """The Peer fields from the command line."""
        return {"retries": max(0, ns.retries), "verify": ns.verify, "echo_only": ns.echo,
                "settle_timeout": ns.settle_timeout, "tls_ca": ns.tls_ca,
                "tls_cert": ns.tls_cert, "tls_key": ns.tls_key,
                "tls_verify": not ns.tls_no_verify}


@dataclasses.dataclass(frozen=True)
class SendTarget(Peer):
    """A DIMSE destination: where to send, as whom, and its timeouts."""

    host: str
    port: int
    called: str
    calling: str
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    max_pdu: int
    tls: bool = False

    @property
    def where(self) -> str:
        """The destination as the summary names it."""
        return f"{self.host}:{self.port}"

    def describe(self) -> str:
        """The destination as the session log names it."""
        return f"{self.calling} -> {self.called}@{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Indexed:
    """One file's identity for sending (from a file read to its end)."""

    path: Path
    study: str
    sop_class: str
    sop_instance: str
    syntax: str
    size: int
    part10: bool  # preamble + file meta that names the dataset's own UIDs: streamed as it is
    note: str = ""  # what the index found worth a warning (file meta against the dataset)
    series: str = ""


@dataclasses.dataclass(frozen=True)
class Sent:
    """What became of one file: sent, warning (counted as sent), failed or not sent (stopped)."""

    path: Path
    study: str
    outcome: Outcome
    status: int | None
    reason: str
    size: int
    seconds: float
    sop_instance: str = ""
    converted: str = ""  # "from -> to" when the file went out in another transfer syntax
    series: str = ""
    tls: str = ""  # the TLS protocol of the association it went over ("" for plain TCP)

    @staticmethod
    def of(f: Indexed, outcome: Outcome, reason: str, status: int | None = None,
           seconds: float = 0.0, converted: str = "") -> Sent:
        """The outcome for an indexed file."""
        return Sent(f.path, f.study, outcome, status, reason, f.size, seconds, f.sop_instance,
                    converted, f.series)

    @property
    def delivered(self) -> bool:
        """The receiver answered success or warning: the file counts as sent."""
        return self.outcome in (Outcome.SENT, Outcome.WARNING)


def valid_ae(title: str, flag: str) -> str:
    """An AE title of 1-16 characters of the AE repertoire, or a usage error."""
    if not AE_REPERTOIRE.match(title) or not title.strip():
        raise UsageError(f"{flag} {title!r}: an AE title is 1-16 printable characters "
                         "without backslash, e.g. STORESCP")
    return title.strip()


# argparse dests that belong to one kind of destination only
DIMSE_ONLY = ("host", "port", "ae_title", "calling_ae", "acse_timeout", "dimse_timeout",
              "max_pdu")
WEB_ONLY = ("token_file", "user", "allow_plain_http")


def tls_asked(ns: argparse.Namespace) -> bool:
    """The command line asks for TLS (--tls, or an option that implies it)."""
    return bool(ns.tls or ns.tls_ca or ns.tls_cert or ns.tls_no_verify)


def send_options(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> Destination:
    """Validate the destination (DIMSE, or DICOMweb by --url) and its timeouts."""
    if bool(ns.tls_cert) != bool(ns.tls_key):
        raise UsageError("--tls-cert and --tls-key go together (a certificate and its key)")
    if ns.url:
        return web_options(ns, parser)
    web_only = given_options(parser, ns, WEB_ONLY)
    if web_only:
        raise UsageError(f"{', '.join(web_only.values())} go with a DICOMweb destination "
                         "(--url)")
    if not ns.host or ns.port is None:
        raise UsageError("the receiver needs -H/--host and -p/--port (and -a/--ae-title), "
                         "e.g. -H 127.0.0.1 -p 11112 -a STORESCP (or --url for DICOMweb)")
    if not 1 <= ns.port <= 65535:
        raise UsageError(f"--port {ns.port}: use 1-65535")
    return SendTarget(ns.host, ns.port, valid_ae(ns.ae_title, "--ae-title"),
                      valid_ae(ns.calling_ae, "--calling-ae"), ns.acse_timeout,
                      ns.dimse_timeout, ns.network_timeout, ns.max_pdu, tls_asked(ns),
                      **Peer.common(ns))


class TLSSetupError(DicomSarError):
    """The TLS context cannot be built (a missing or unreadable CA, certificate or key)."""


def tls_context(target: Destination) -> Any:
    """The one ssl.SSLContext of a run (None without TLS): TLS 1.2 or later and the standard
    library's defaults (BCP 195) but its strict X.509 checks, the system's trust store unless
    --tls-ca names a CA."""
    if not target.tls:
        return None
    import ssl

    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=target.tls_ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # the chain and the host name are verified; what OpenSSL and DCMTK accept is not
        # refused (3.13's strict RFC 5280 checks fail hospital CAs without keyUsage)
        context.verify_flags &= ~ssl.VERIFY_X509_STRICT
        if target.tls_cert:
            context.load_cert_chain(target.tls_cert, target.tls_key)
    except (OSError, ssl.SSLError) as exc:
        which = (f"--tls-ca {target.tls_ca}, " if target.tls_ca else "") + (
            f"--tls-cert {target.tls_cert} / --tls-key {target.tls_key}"
            if target.tls_cert else "")
        raise TLSSetupError(f"cannot set up TLS from {which.strip(', ')}: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
    if not target.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def with_tls(target: Destination) -> Destination | None:
    """target with the run's TLS context (once per run, before any association); None,
    after saying why, when it cannot be built."""
    if target.context is not None:
        return target
    try:
        target = dataclasses.replace(target, context=tls_context(target))
    except TLSSetupError as exc:
        print(f"{paint('error:', RED)} {exc}; nothing sent", file=sys.stderr)
        errlog.error("TLSSetup: %s", exc)
        return None
    if target.tls and not target.tls_verify:
        log.warning("TLS without certificate verification (--tls-no-verify): anyone on the "
                    "path can pose as the receiver")
        print("warning: --tls-no-verify: the receiver's certificate is not checked (test "
              "setups only)", file=sys.stderr)
    return target


def tls_problem(target: SendTarget) -> str:
    """Why a TLS connection to the destination fails, from a handshake of the ssl module's
    own (pynetdicom only logs it): untrusted certificate, host name, a plain-TCP receiver."""
    import socket
    import ssl

    try:
        with socket.create_connection((target.host, target.port), target.acse_timeout) as raw, \
                target.context.wrap_socket(raw, server_hostname=target.host):
            return ""
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: the receiver's certificate is not accepted: {exc.verify_message}"
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        return (f"TLS handshake with {target.host}:{target.port} failed "
                f"({one_line(str(exc)) or type(exc).__name__}): does the receiver speak TLS "
                "on this port?")
    except OSError:
        return ""


INDEX_TAGS = (0x00080016, 0x00080018, 0x0020000D, 0x0020000E)  # SOP class, instance, study,
# series UIDs


def index_task(cand: Candidate, opts: Options) -> FileResult:
    """Index one file that reads to its end (a broken one is never sent): its study, SOP
    class and instance (the dataset's own, as DCMTK sends them) and transfer syntax."""
    ds, size, kind, odd = header_with(cand.path, INDEX_TAGS)
    if ds is None:
        return FileResult(cand.path, Status.NOT_DICOM, nbytes=size)
    uids = {k: str(ds.get(k) or "").strip() for k in ("SOPClassUID", "SOPInstanceUID",
                                                       "StudyInstanceUID")}
    missing = [k for k, v in uids.items() if not v]
    if missing:
        return FileResult(cand.path, Status.ERROR, nbytes=size, error_type="MissingAttribute",
                          message=f"cannot send without {', '.join(missing)} in the dataset")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        implicit, little = ds.original_encoding
        syntax = pydicom.uid.ImplicitVRLittleEndian if implicit else (
            pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
    disagree = [f"{m} {str(meta.get(m) or '')!r} vs the dataset's {d}"
                for m, d in (("MediaStorageSOPClassUID", "SOPClassUID"),
                             ("MediaStorageSOPInstanceUID", "SOPInstanceUID"))
                if meta is not None and str(meta.get(m) or "").strip() != uids[d]]
    note = ("file meta disagrees with the dataset (" + "; ".join(disagree) +
            "): sending the dataset's UIDs") if disagree else ""
    stream = kind == "part10" and not disagree
    if stream and syntax != DEFLATED and odd:
        # as it is, a receiver waits for the byte that would make it even
        note, stream = (f"element {BaseTag(odd)} has an odd length: sending it re-encoded "
                        "(padded even)"), False
    record = Indexed(cand.path, uids["StudyInstanceUID"], uids["SOPClassUID"],
                     uids["SOPInstanceUID"], str(syntax), size, stream, note,
                     str(ds.get("SeriesInstanceUID") or "").strip())
    return FileResult(cand.path, Status.OK, nbytes=size, record=record)


def association_batches(files: list[Indexed]) -> list[tuple[list[Indexed], list[tuple]]]:
    """Split a study's files so no association needs more than 128 presentation contexts.

    Contexts: one per (SOP class, transfer syntax) found, plus uncompressed fallbacks.
    """
    batches: list[tuple[list[Indexed], list[tuple]]] = []
    files_now: list[Indexed] = []
    contexts: dict[tuple[str, str], None] = {}
    for f in files:
        # deflate goes out inflated, as DCMTK sends it (receivers stall on deflated streams)
        own = {(f.sop_class, f.syntax): None} if f.syntax != DEFLATED else {}
        wanted = own | {(f.sop_class, ts): None for ts in UNCOMPRESSED}
        new = [c for c in wanted if c not in contexts]
        if len(contexts) + len(new) > MAX_CONTEXTS and files_now:
            batches.append((files_now, list(contexts)))
            files_now, contexts, new = [], {}, list(wanted)
        contexts.update(dict.fromkeys(new))
        files_now.append(f)
    if files_now:
        batches.append((files_now, list(contexts)))
    return batches


def new_ae(target: SendTarget, contexts: Iterable[tuple[str, str]]) -> Any:
    """A fresh AE for one association (never shared between threads)."""
    from pynetdicom import AE

    ae = AE(ae_title=target.calling)
    ae.acse_timeout, ae.dimse_timeout = target.acse_timeout, target.dimse_timeout
    ae.network_timeout = target.network_timeout
    ae.maximum_pdu_size = target.max_pdu
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    return ae


def set_nodelay(event: Any) -> None:
    """Nagle's algorithm costs ~40 ms per exchange on loopback: turn it off."""
    import socket

    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def leave_responses_to_the_caller(dimse: Any) -> None:
    """Make pynetdicom's association thread leave the DIMSE queue alone. It polls the queue
    for requests to serve, and its pause handshake with send_c_store/send_c_find can lose a
    race: the poll then takes the response the caller waits for. Our associations propose
    no SCP role, so the peer has no request for that thread to serve."""
    wait_for = dimse.get_msg

    def get_msg(block: bool = False) -> tuple[Any, Any]:
        return wait_for(True) if block else (None, None)

    dimse.get_msg = get_msg


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One try at an association: the association, or why not and whether to try again."""

    assoc: Any
    why: str = ""
    permanent: bool = False  # rejected for good (or TLS refused): retrying cannot help
    connected: bool = True  # False: no TCP connection at all (refused, or no answer)
    tls_version: str = ""  # the negotiated protocol, on a TLS association


def peer_of(target: SendTarget) -> str:
    """The peer as messages name it: called AE, address, and our calling AE."""
    return f"{target.called}@{target.host}:{target.port} (we are AE {target.calling})"


def no_connection(target: SendTarget) -> str:
    """Why nothing can be sent when nobody answers at the destination."""
    return (f"no connection to {target.host}:{target.port} (refused or timed out): check "
            "--host and --port, or whether the receiver runs")


def open_association(target: SendTarget, contexts: list[tuple]) -> Attempt:
    """Request an association with the destination (no exception: a failed Attempt)."""
    from pynetdicom import evt

    opened: list[str] = []

    def on_open(event: Any) -> None:
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        opened.append(sock.version() or "" if hasattr(sock, "version") else "")
        set_nodelay(event)
        leave_responses_to_the_caller(event.assoc.dimse)  # before its thread starts polling

    t0 = time.monotonic()
    try:
        ae = new_ae(target, contexts)
        assoc = ae.associate(target.host, target.port, ae_title=target.called,
                             max_pdu=target.max_pdu, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)],
                             tls_args=(target.context, target.host) if target.context else None)
    except (OSError, RuntimeError) as exc:  # the network, or pynetdicom's own refusal
        return Attempt(None, f"{type(exc).__name__}: {one_line(str(exc))}")
    if assoc.is_established:
        return Attempt(assoc, tls_version=opened[0] if opened else "")
    if not opened:  # pynetdicom reports a failed connect as an abort: tell them apart
        why = tls_problem(target) if target.context else ""
        if why:
            return Attempt(None, why, permanent=True)
        return Attempt(None, no_connection(target), connected=False)
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        hint = {(0x01, 0x03): f": register AE title {target.calling} there, or use "
                "--calling-ae with one it knows",
                (0x01, 0x07): ": check -a/--ae-title, the PACS's own AE title"}.get(
                    (rj.result_source, rj.diagnostic), "")
        why = (f"{peer_of(target)} rejected the association ({rj.result_str}): "
               f"{rj.reason_str} [{rj.source_str}]{hint}")
        return Attempt(None, why, permanent=rj.result == 0x01)
    if time.monotonic() - t0 >= target.acse_timeout:
        return Attempt(None, f"{peer_of(target)} did not answer the association request within "
                       f"--acse-timeout {target.acse_timeout:g} s")
    hint = "; or does it want a client certificate (--tls-cert, --tls-key)?" if \
        target.context and not target.tls_cert else "" if target.context else \
        "; or does it speak TLS only (--tls)?"
    return Attempt(None, f"{peer_of(target)} aborted the association request (no acceptable "
                   f"context?{hint})")


def accepted_syntaxes(assoc: Any, sop_class: str) -> set[str]:
    """Transfer syntaxes the peer accepted for a SOP class."""
    return {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
            if cx.abstract_syntax == sop_class}


CONVERTIBLE = (*UNCOMPRESSED, EXPLICIT_BE, DEFLATED)


def store_one(assoc: Any, f: Indexed, target: SendTarget) -> Sent | None:
    """C-STORE one file; None when the association was gone before it went out (the file
    waits for the next one). A file the receiver aborted on, or did not answer for, fails
    alone: the caller reopens the association for the rest, and never sends it again."""
    t0 = time.perf_counter()
    try:
        return _store_one(assoc, f, target, t0)
    except Exception as exc:
        if not assoc.is_established:  # pynetdicom refuses to send on a closed association
            return None
        return Sent.of(f, Outcome.FAILED, f"{type(exc).__name__}: {one_line(str(exc))}")


def decoded_for_sending(f: Indexed) -> tuple[Dataset, str]:
    """A file that cannot go out as its bytes, read by pydicom with odd-length binary values
    padded even (pydicom writes them as they are), and the syntax it was decoded from
    (deflate is undone by reading)."""
    ds = pydicom.dcmread(f.path, force=True)
    for elem in ds.iterall():
        if elem.VR in BULK_VRS and isinstance(elem.value, bytes) and len(elem.value) % 2:
            elem.value += b"\0"
    return ds, EXPLICIT_LE if f.syntax == DEFLATED else f.syntax


def _store_one(assoc: Any, f: Indexed, target: SendTarget, t0: float) -> Sent:
    accepted = accepted_syntaxes(assoc, f.sop_class)
    converted = ""
    if f.syntax in accepted and f.part10:
        dataset: Any = f.path  # streamed as its encoded bytes, never decoded
    elif f.syntax in accepted or (f.syntax in CONVERTIBLE and accepted & set(UNCOMPRESSED)):
        # decoded: pynetdicom takes the dataset's own UIDs and encodes it for the accepted
        # syntax (no pixel codec: compressed pixel data goes only in its own syntax)
        dataset, source = decoded_for_sending(f)
        if not hasattr(dataset, "file_meta"):
            dataset.file_meta = pydicom.dataset.FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = source
        if f.syntax not in accepted:
            into = source if source in accepted else next(ts for ts in UNCOMPRESSED
                                                          if ts in accepted)
            converted = f"{pydicom.uid.UID(f.syntax).name} -> {pydicom.uid.UID(into).name}"
    else:
        syntax = pydicom.uid.UID(f.syntax)
        return Sent.of(f, Outcome.FAILED, f"the receiver accepted no presentation context for "
                       f"{pydicom.uid.UID(f.sop_class).name} in {syntax.name}")
    status = assoc.send_c_store(dataset)
    seconds = time.perf_counter() - t0
    if not status or "Status" not in status:
        why = (f"no response within --dimse-timeout {target.dimse_timeout:g} s"
               if seconds >= target.dimse_timeout else "the receiver aborted the association")
        return Sent.of(f, Outcome.FAILED, f"{why} while this file was sent; not sent again "
                       "(the rest of its study goes on)", None, seconds, converted)
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

    code = int(status.Status)
    category = code_to_category(code)
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, (category, "unknown status"))[1]
    if category == "Success":
        return Sent.of(f, Outcome.SENT, "", code, seconds, converted)
    outcome = Outcome.WARNING if category == "Warning" else Outcome.FAILED
    return Sent.of(f, outcome, f"0x{code:04X} {meaning}", code, seconds, converted)


def association_plan(studies: dict[str, list[Indexed]]) -> Iterator[str]:
    """--dry-run: the associations a send would open."""
    for study, files in studies.items():
        for i, (batch, contexts) in enumerate(association_batches(files)):
            yield (f"study {study}  association {i + 1}: {len(batch)} files, "
                   f"{len(contexts)} presentation contexts")


def send_study(study: str, files: list[Indexed], target: SendTarget, events: Any,
               stop: threading.Event, unreachable: threading.Event) -> list[Sent]:
    """Send one study: an association per batch, reopened (with backoff) after faults.

    After a stop (Ctrl-C, SIGTERM) the file on the wire finishes and the rest is not sent.
    Once one batch has spent its retries without a single TCP connection, unreachable is
    set and every other study fails at once instead of backing off in turn (with a mistyped
    port, a thousand studies took half an hour to fail).
    """
    results: list[Sent] = []
    for batch, contexts in association_batches(files):
        pending, attempt, why, ever_connected = list(batch), 0, "", False
        while pending and attempt <= target.retries and not stop.is_set():
            if unreachable.is_set():
                why = f"{no_connection(target)}; not tried, as another study found no one there"
                break
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))  # back off before a retry
            tried = open_association(target, contexts)
            assoc, why = tried.assoc, tried.why
            ever_connected = ever_connected or tried.connected
            if assoc is None:
                if tried.permanent:
                    break
                attempt += 1
                continue
            lost = False
            try:
                while pending and not stop.is_set():
                    if not assoc.is_established:  # lost between files: a transient fault
                        why, lost = "association lost between files", True
                        break
                    outcome = store_one(assoc, pending[0], target)
                    if outcome is None:
                        why, lost = "association lost between files", True
                        break
                    pending.pop(0)
                    if tried.tls_version:
                        outcome = dataclasses.replace(outcome, tls=tried.tls_version)
                    results.append(outcome)
                    events.put(outcome)
                    if outcome.outcome == Outcome.FAILED and outcome.status is None:
                        break  # it broke the association, or failed here: reopen for the rest
            finally:
                if assoc.is_established:
                    assoc.release()
                else:
                    assoc.abort()
            attempt = attempt + 1 if lost else 0
        if pending and not ever_connected and not stop.is_set():
            unreachable.set()  # every try of this batch found no one listening
        kind, reason = (Outcome.NOT_SENT, "stopped before sending") if stop.is_set() else \
            (Outcome.FAILED, why or "not sent")
        for f in pending:
            outcome = Sent.of(f, kind, reason)
            results.append(outcome)
            events.put(outcome)
    return results


def echo(target: Destination) -> tuple[bool, str]:
    """C-ECHO the destination (a --url: web_echo): (ok, message with round-trip time)."""
    if isinstance(target, WebTarget):
        return web_echo(target)
    t0 = time.perf_counter()
    tried = open_association(target, [(sop_class("Verification"),
                                       pydicom.uid.ImplicitVRLittleEndian)])
    where = f"C-ECHO {target.called}@{target.host}:{target.port}"
    if tried.assoc is None:
        return False, f"{where}: no association: {tried.why}"
    status = tried.assoc.send_c_echo()
    rtt = (time.perf_counter() - t0) * 1000
    if tried.assoc.is_established:
        tried.assoc.release()
    if not status or "Status" not in status:
        return False, (f"{where}: no answer to the C-ECHO (the peer aborted the association or "
                       f"did not answer within --dimse-timeout {target.dimse_timeout:g} s)")
    ok = status.Status == 0
    tls = f", {tried.tls_version}" if tried.tls_version else ""
    return ok, (f"{where}: {'success' if ok else f'failed, status 0x{status.Status:04X}'}, "
                f"{rtt:.1f} ms round trip{tls}")


class QueryFailedError(DicomSarError):
    """A C-FIND that gave no answer to rely on: refused, unanswered, or cut off."""


def refused_query(target: SendTarget, how: str) -> str:
    """What to do when the PACS will not answer queries from our AE title."""
    return (f"the PACS {peer_of(target)} refused the query ({how}): register AE title "
            f"{target.calling} there as a modality allowed to query (Orthanc: DicomModalities, "
            "or DicomAlwaysAllowFind), or use --calling-ae with one it knows")


def held_instances(assoc: Any, study: str, series: str, target: SendTarget) -> set[str]:
    """The SOP Instance UIDs the receiver holds in a series (or a study, series unknown): one
    IMAGE-level C-FIND, Study Root, finished within --dimse-timeout. Raises QueryFailedError."""
    from pynetdicom import evt
    from pynetdicom.pdu import A_ABORT_RQ

    if not assoc.is_established:
        raise QueryFailedError(f"the association with {peer_of(target)} was lost before the query")
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study
    if series:
        query.SeriesInstanceUID = series
    query.SOPInstanceUID = ""
    aborted: list[bool] = []

    def on_pdu(event: Any) -> None:
        aborted.append(isinstance(event.pdu, A_ABORT_RQ))

    assoc.bind(evt.EVT_PDU_RECV, on_pdu)
    try:
        return find_held(assoc, query, target, aborted)
    finally:
        assoc.unbind(evt.EVT_PDU_RECV, on_pdu)


def find_held(assoc: Any, query: Dataset, target: SendTarget, aborted: list[bool]) -> set[str]:
    """held_instances' C-FIND and what its answers mean (aborted: A-ABORTs received)."""
    from pynetdicom.status import QR_FIND_SERVICE_CLASS_STATUS, code_to_category

    held: set[str] = set()
    peer, t0 = peer_of(target), time.monotonic()
    responses = assoc.send_c_find(query, sop_class("StudyRootQueryRetrieveInformationModelFind"))
    for answers, (status, ident) in enumerate(responses):
        if not status or "Status" not in status:
            if any(aborted) and not answers:
                raise QueryFailedError(refused_query(target,
                                                     "it aborted the association when asked"))
            if time.monotonic() - t0 >= target.dimse_timeout:
                raise QueryFailedError(f"the PACS {peer} did not answer the query within "
                                       f"--dimse-timeout {target.dimse_timeout:g} s")
            raise QueryFailedError(f"the PACS {peer} dropped the connection during the query, "
                                   f"after {answers} answers")
        code = int(status.Status)
        category = code_to_category(code)
        if category == "Success":
            return held
        if category != "Pending":
            meaning = QR_FIND_SERVICE_CLASS_STATUS.get(code, (category, "unknown status"))[1]
            raise QueryFailedError(refused_query(target,
                                                 f"C-FIND status 0x{code:04X}: {meaning}"))
        if ident is not None and ident.get("SOPInstanceUID"):
            held.add(str(ident.SOPInstanceUID))
        if time.monotonic() - t0 > target.dimse_timeout:
            assoc.abort()
            raise QueryFailedError(f"the PACS {peer} kept answering Pending for --dimse-timeout "
                                   f"{target.dimse_timeout:g} s without finishing the query")
    raise QueryFailedError(f"the PACS {peer} ended the query without a final status")


def find_contexts() -> list[tuple[str, str]]:
    """What a C-FIND association proposes."""
    return [(sop_class("StudyRootQueryRetrieveInformationModelFind"), ts) for ts in UNCOMPRESSED]


@dataclasses.dataclass(frozen=True)
class Verification:
    """What --verify found: files acknowledged but not held, or why it could not check."""

    not_held: tuple[Sent, ...] = ()
    unchecked: int = 0  # delivered files it could not check
    error: str = ""

    def problems(self) -> list[str]:
        """One line for each thing wrong, for stderr and the session log."""
        lines = [f"verify: the check could not be made for {self.unchecked} delivered files: "
                 f"{self.error}"] if self.error else []
        return lines + [f"verify: {s.path}: acknowledged (status 0x{s.status or 0:04X}) but "
                        "not held by the receiver" for s in self.not_held]

    def summary(self) -> dict[str, Any]:
        """The summary's "verify" field."""
        return {"made": not self.error, "error": self.error or None,
                "unchecked": self.unchecked, "not_held": len(self.not_held)}


SeriesKey = tuple[str, str]  # (StudyInstanceUID, SeriesInstanceUID)


@contextlib.contextmanager
def find_session(target: SendTarget) -> Iterator[Callable[[str, str], set[str]]]:
    """A worker's C-FIND session: held(study, series) over one association."""
    tried = open_association(target, find_contexts())
    if tried.assoc is None:
        raise QueryFailedError(f"no association for C-FIND: {tried.why}")
    try:
        yield lambda study, series: held_instances(tried.assoc, study, series, target)
    finally:
        if tried.assoc.is_established:
            tried.assoc.release()


def queryable(series: str) -> str:
    """A series UID to query by, or "" (ask for the whole study) when it is not a valid UID:
    a PACS keeps such a value in a form of its own (Orthanc drops the blanks of 'REM
    SAMPLES 1'), so asking by it finds nothing of what it holds."""
    return series if pydicom.uid.RE_VALID_UID.match(series) else ""


def held_by_series(target: Destination, keys: list[SeriesKey], workers: int
                   ) -> tuple[dict[SeriesKey, set[str] | None], str]:
    """What the receiver holds of each series: one session (association, or connection
    for QIDO-RS) per worker, each querying its share; (held by key, None where it did not
    answer; why a session failed)."""
    shares = [keys[i::workers] for i in range(min(workers, len(keys)) or 1)]
    session = qido_session if isinstance(target, WebTarget) else find_session

    def query(share: list[SeriesKey]) -> tuple[dict[SeriesKey, set[str] | None], str]:
        held: dict[SeriesKey, set[str] | None] = dict.fromkeys(share)
        try:
            with session(target) as ask:  # type: ignore[arg-type]
                for study, series in share:
                    held[study, series] = ask(study, queryable(series))
        except QueryFailedError as exc:  # the rest of the share is left unanswered
            return held, str(exc)
        return held, ""

    held: dict[SeriesKey, set[str] | None] = {}
    why = ""
    with ThreadPoolExecutor(max_workers=len(shares), thread_name_prefix=PROG) as pool:
        for part, problem in pool.map(query, shares):
            held |= part
            why = why or problem
    return held, why


def verify_sent(target: Destination, sent: list[Sent]) -> Verification:
    """After a send, C-FIND every series it delivered to: each file the receiver
    acknowledged but does not hold (instances it held before do not matter)."""
    delivered: dict[tuple[str, str], list[Sent]] = {}
    for s in sent:
        if s.delivered:
            delivered.setdefault((s.study, s.series), []).append(s)
    if not delivered:
        return Verification()
    held, why = held_by_series(target, list(delivered), 1)  # one association, as before
    not_held = [s for key, files in delivered.items() if held[key] is not None
                for s in files if s.sop_instance not in held[key]]
    return Verification(tuple(not_held), sum(len(files) for key, files in delivered.items()
                                             if held[key] is None), why)


@dataclasses.dataclass(frozen=True)
class Session:
    """One send session: its id, its clock and its detailed log."""

    id: str
    started: datetime
    t0: float
    log: logging.Logger


def run_send(opts: Options, out: Callable[[str], None], stop: StopSignal,
             watch: Callable[[int, int], None] | None = None) -> int:
    """Index, group by study, send study by study over the pool; log and summarise.
    pynetdicom's settings are ours for the run, before any thread, and restored after.
    watch(nbytes, total bytes) hears of each file sent or given up (the --ui page's bar)."""
    from pynetdicom import _config

    saved = _config.STORE_SEND_CHUNKED_DATASET, _config.LOG_HANDLER_LEVEL
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream files
    _config.LOG_HANDLER_LEVEL = "standard" if opts.verbose else "none"
    try:
        return send_run(opts, out, stop, watch)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET, _config.LOG_HANDLER_LEVEL = saved


def send_run(opts: Options, out: Callable[[str], None], stop: StopSignal,
             watch: Callable[[int, int], None] | None = None) -> int:
    """run_send's work: echo, or index, then send_studies."""
    import uuid

    target = with_tls(opts.send)
    if target is None:
        return EXIT_FAILURES
    opts = dataclasses.replace(opts, send=target)
    if target.echo_only:
        ok, message = echo(target)
        print(message, file=sys.stderr if not ok else sys.stdout)
        return EXIT_OK if ok else EXIT_FAILURES
    sid = str(uuid.uuid4())
    session = Session(sid, datetime.now(UTC), time.perf_counter(), session_logger(opts, sid))
    print(f"session {sid}", file=sys.stderr)
    excluded = excluded_locations(opts, [])
    reporter = Reporter(opts, out, count=WalkCount(opts, excluded) if countable(opts) else None)
    studies: dict[str, list[Indexed]] = {}
    for result in run_ordered(discover(opts, excluded),
                              lambda c: index_task(c, opts), opts.workers, stop.event,
                              opts.time_limit):
        reporter.handle(result)
        if result.record is not None:
            studies.setdefault(result.record.study, []).append(result.record)
            if result.record.note:
                session.log.warning("%s: %s", result.path, result.record.note)
                log.warning("%s: %s", result.path, result.record.note)
                print(f"warning: {result.path}: {result.record.note}", file=sys.stderr)
    reporter.close_bar()
    try:
        return send_studies(studies, opts, out, reporter, stop, session, watch)
    finally:
        for handler in list(session.log.handlers):  # the session's log is closed with it
            session.log.removeHandler(handler)
            handler.close()


def send_studies(studies: dict[str, list[Indexed]], opts: Options, out: Callable[[str], None],
                 reporter: Reporter, stop: StopSignal, session: Session,
                 watch: Callable[[int, int], None] | None = None) -> int:
    """Announce, send (or list, for a dry run), verify, and write the session summary."""
    target: Destination = opts.send
    total_files = sum(len(v) for v in studies.values())
    print(f"Found {total_files} DICOM files, grouped into {len(studies)} studies", file=sys.stderr)
    for study, files in list(studies.items())[:5]:
        print(f"  {study}: {len(files)} files", file=sys.stderr)
    if opts.dry_run:
        for line in stow_requests(studies, target) if isinstance(target, WebTarget) \
                else association_plan(studies):
            out(line)
        return stop.exit_status() or (EXIT_FAILURES if reporter.stats.errors else EXIT_OK)
    sent = transfer(studies, target, opts, session.log, stop.event, reporter, watch)
    verified = verify_sent(target, sent) if target.verify else None
    problems = verified.problems() if verified else []
    for problem in problems:
        print(problem, file=sys.stderr)
        session.log.warning(problem)
    summary = send_summary(session.id, session.started, time.perf_counter() - session.t0, sent,
                           target, opts, len(studies), reporter.stats.errors)
    if verified:
        summary["verify"] = verified.summary()
    tls = summary["tls"]
    session.log.info("transport: %s", f"encrypted, {tls['protocol']}" if tls["encrypted"]
                     else "not encrypted" if summary["successful_transfers"] else "nothing sent")
    if opts.shard:
        summary["shard"] = f"{opts.shard[0]}/{opts.shard[1]}"
    for path in (opts.log_dir / f"dicom_sender_summary_{session.id}.json", opts.summary_json):
        if path is not None:
            write_summary(summary, path)
    if not opts.quiet:
        shown = {k: v for k, v in summary.items()
                 if k not in ("failed_files", "files") and v is not None}
        tls = shown.pop("tls")
        shown["tls"] = f"yes, {tls['protocol']}" if tls["encrypted"] else "no"
        if verified:
            check = shown.pop("verify")
            shown["verified"] = (f"{check['not_held']} acknowledged but not held"
                                 if check["made"] else "no: the check could not be made")
        print(render_summary(shown), file=sys.stderr)
    if summary["not_sent_stopped"]:
        print(f"stopped: {summary['not_sent_stopped']} files not sent", file=sys.stderr)
    failed = summary["failed_transfers"] + reporter.stats.errors
    return stop.exit_status() or (EXIT_FAILURES if failed or problems else EXIT_OK)


def transfer(studies: dict[str, list[Indexed]], target: Destination, opts: Options,
             sender_log: logging.Logger, stop: threading.Event, reporter: Reporter,
             watch: Callable[[int, int], None] | None = None) -> list[Sent]:
    """Studies over the pool; events drive the reporter's bar (and watch), and the
    detailed log."""
    import queue

    events: queue.SimpleQueue[Sent] = queue.SimpleQueue()
    total = sum(f.size for files in studies.values() for f in files)
    bar = reporter.next_phase(total, "sending ", in_bytes=True)
    sent: list[Sent] = []
    with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix=PROG) as pool:
        unreachable = threading.Event()  # shared like stop: see send_study
        if isinstance(target, WebTarget):  # a worker keeps its connection from study to study
            todo: queue.SimpleQueue[tuple[str, list[Indexed]]] = queue.SimpleQueue()
            for item in studies.items():
                todo.put(item)
            futures = [pool.submit(stow_worker, todo, target, events, stop, unreachable)
                       for _ in range(min(opts.workers, len(studies)))]
        else:
            futures = [pool.submit(send_study, study, files, target, events, stop, unreachable)
                       for study, files in studies.items()]
        while True:
            try:
                outcome = events.get(timeout=0.2)
            except queue.Empty:
                if all(f.done() for f in futures) and events.empty():
                    break
                continue
            sent.append(outcome)
            bar.update(outcome.size)
            if watch is not None:
                watch(outcome.size, total)
            if outcome.outcome == Outcome.FAILED:
                sender_log.error("failed: %s: %s", outcome.path, outcome.reason)
                reporter.error(outcome.path, "SendFailed", outcome.reason)
            elif outcome.outcome == Outcome.WARNING:
                sender_log.warning("sent with warning: %s: %s", outcome.path, outcome.reason)
            elif outcome.outcome == Outcome.NOT_SENT:
                sender_log.info("not sent (stopped): %s", outcome.path)
            else:
                sender_log.info("sent: %s (%d bytes, %.1f ms)", outcome.path, outcome.size,
                                outcome.seconds * 1000)
            if outcome.converted:
                sender_log.info("converted: %s: %s (the receiver did not accept its own)",
                                outcome.path, outcome.converted)
        for future in futures:
            future.result()  # re-raise a worker's bug instead of hiding it
    bar.close()
    return sent


def session_logger(opts: Options, session: str) -> logging.Logger:
    """The detailed per-session log dicom_sender_<session>.log (mode 0600)."""
    path = opts.log_dir / f"dicom_sender_{session}.log"
    logger = logging.getLogger(f"{PROG}.sender.{session}")
    logger.addHandler(log_handler(path, logging.Formatter("%(asctime)s %(levelname)s %(message)s")))
    logger.propagate = False
    logger.setLevel(logging.DEBUG if opts.verbose else logging.INFO)
    logger.info("session %s: %s, %d workers, %s; %s", session, opts.send.describe(),
                opts.workers,
                ("TLS" + ("" if opts.send.tls_verify else " WITHOUT certificate verification"))
                if opts.send.tls else "plain TCP", runtime_line())
    return logger


def send_summary(session: str, started: datetime, seconds: float, sent: list[Sent],
                 target: Destination, opts: Options, studies: int,
                 index_errors: int) -> dict[str, Any]:
    """The JSON summary of a send session (the fields of the user's own sender)."""
    ok = [s for s in sent if s.delivered]
    failed = [s for s in sent if s.outcome == Outcome.FAILED]
    total_bytes = sum(s.size for s in ok)
    return {
        "session_id": session, "start_time": started.isoformat(),
        "end_time": datetime.now(UTC).isoformat(), "total_files": len(sent) + index_errors,
        "successful_transfers": len(ok),
        "warnings": sum(s.outcome == Outcome.WARNING for s in sent),
        "failed_transfers": len(failed), "index_errors": index_errors,
        "not_sent_stopped": sum(s.outcome == Outcome.NOT_SENT for s in sent),
        "total_bytes": total_bytes, "total_time_ms": round(seconds * 1000, 1),
        "average_transfer_time_ms": round(1000 * sum(s.seconds for s in ok) / max(1, len(ok)),
                                          2),
        "throughput_mbps": round(total_bytes / 1e6 / seconds, 2) if seconds else 0.0,
        "threads_used": opts.workers, "destination": target.where,
        "transport": "DICOMweb STOW-RS" if isinstance(target, WebTarget) else "DIMSE C-STORE",
        "calling_ae": getattr(target, "calling", None), "called_ae": getattr(target, "called",
                                                                             None),
        "studies_processed": studies, "free_threaded": gil_disabled(),
        "failed_files": [{"path": str(s.path), "reason": s.reason} for s in failed],
        "tls": {"encrypted": bool(ok) and all(s.tls for s in ok),
                "protocol": collections.Counter(s.tls for s in ok).most_common(1)[0][0]
                if ok and ok[0].tls else None, "verified": target.tls and target.tls_verify},
        # every file with the receiver's answer, to reconcile with what the PACS holds
        "files": [{"path": str(s.path), "sop_instance_uid": s.sop_instance,
                   "outcome": s.outcome, "status": s.status, "reason": s.reason,
                   **({"converted": s.converted} if s.converted else {})} for s in sent]}


# ════════════════════════════════════════════════════════════════════════════════════════
# DICOMweb (--url): STOW-RS for --send, QIDO-RS for --verify, --check-ingest and --echo
# (PS3.18), on the standard library's http.client: one kept-alive connection per worker,
# each file streamed from disk, the run's one TLS context, credentials read per request
# ════════════════════════════════════════════════════════════════════════════════════════


STOW_REQUEST_BYTES = 64 * 2**20  # a study goes in requests of at most this (a bigger file alone)
QIDO_PAGE = 1000  # instances asked for per QIDO-RS request (limit), then the next offset
RETRY_AFTER_CAP = 120.0  # seconds: a longer Retry-After is waited for this long, then retried
PASSWORD_VARIABLE = "DICOMWEB_PASSWORD"  # --user's password: never on the command line
DICOM_JSON = "application/dicom+json"


@dataclasses.dataclass(frozen=True)
class WebTarget(Peer):
    """A DICOMweb service: its root URL (no credentials in it), how to authenticate (the
    secret itself never printed) and its timeout."""

    url: str  # the service root, without a trailing slash
    token_file: Path | None
    user: str | None
    password: str = dataclasses.field(default="", repr=False)
    timeout: float = 60.0

    @property
    def tls(self) -> bool:
        """https:// (TLS, with tls_context's rules)."""
        return self.url.startswith("https://")

    @functools.cached_property
    def address(self) -> tuple[str, int, str]:
        """(host, port, root path) of the URL."""
        import urllib.parse

        parts = urllib.parse.urlsplit(self.url)
        return parts.hostname or "", parts.port or (443 if self.tls else 80), parts.path

    @property
    def where(self) -> str:
        """The destination as the summary names it."""
        return self.url

    def describe(self) -> str:
        """The destination as the session log names it."""
        return f"DICOMweb {self.url}"


Destination = SendTarget | WebTarget  # both are Peers


def web_options(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> WebTarget:
    """Validate a --url destination and its credentials (a usage error says what to do)."""
    import ipaddress
    import urllib.parse

    dimse = given_options(parser, ns, DIMSE_ONLY)
    if dimse:
        raise UsageError(f"--url is a DICOMweb destination and {', '.join(dimse.values())} a "
                         "DIMSE one: give one or the other")
    url = ns.url.rstrip("/")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not one)
    except ValueError as exc:
        raise UsageError(f"--url: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url {ns.url!r}: use the service root, e.g. "
                         "https://pacs.example.org/dicom-web or http://127.0.0.1:8042/dicom-web")
    if parts.username is not None or parts.password is not None:
        raise UsageError("--url must not carry credentials (they would show in process lists "
                         f"and logs): use --token-file FILE, or --user NAME with "
                         f"{PASSWORD_VARIABLE} in the environment")
    if parts.query or parts.fragment or not url.isascii() or any(
            c.isspace() or not c.isprintable() for c in url):
        raise UsageError(f"--url {url!r}: the service root takes no ?query, #fragment, "
                         "blanks or non-ASCII characters (percent-encode them, and give a "
                         "host name in its xn-- form)")
    try:
        loopback = ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        loopback = parts.hostname == "localhost"
    if parts.scheme == "http" and not ns.allow_plain_http and not loopback:
        raise UsageError(f"--url {url}: patient data would cross the network unencrypted; use "
                         "https://, or --allow-plain-http on a network you trust")
    if parts.scheme == "http" and tls_asked(ns):
        raise UsageError("--tls and --tls-* go with an https:// --url")
    if ns.token_file and ns.user:
        raise UsageError("--token-file and --user are two ways to authenticate: give one")
    if ns.token_file and not Path(ns.token_file).is_file():
        raise UsageError(f"--token-file {ns.token_file}: no such file")
    password = os.environ.get(PASSWORD_VARIABLE, "")
    if ns.user and not password:
        raise UsageError(f"--user {ns.user}: set the password in the environment variable "
                         f"{PASSWORD_VARIABLE} (fish: set -x {PASSWORD_VARIABLE} (cat FILE))")
    return WebTarget(url, Path(ns.token_file) if ns.token_file else None, ns.user,
                     password if ns.user else "", ns.network_timeout, **Peer.common(ns))


class WebError(DicomSarError):
    """A DICOMweb request that got no usable answer, after its retries."""

    def __init__(self, why: str, connected: bool = True) -> None:
        super().__init__(why)
        self.connected = connected  # False: no TCP connection was ever made


class Reply(NamedTuple):
    """An HTTP response, read to its end."""

    status: int
    reason: str
    headers: Any  # http.client.HTTPMessage
    body: bytes


class FilePart(NamedTuple):
    """A file that goes into a request body as it is on disk."""

    path: Path
    size: int


def authorization(target: WebTarget) -> dict[str, str]:
    """The Authorization header: the token file read now (a refreshed token is picked up),
    or HTTP Basic from --user and the environment's password."""
    if target.token_file is not None:
        try:
            token = target.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise WebError(f"--token-file {target.token_file}: cannot read it "
                           f"({getattr(exc, 'strerror', None) or exc})") from None
        if not token or any(c in token for c in "\r\n"):
            raise WebError(f"--token-file {target.token_file}: not one line holding a token")
        return {"Authorization": f"Bearer {token}"}
    if target.user:
        pair = f"{target.user}:{target.password}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    return {}


class WebClient:
    """One worker's kept-alive connection to the service (never shared between threads)."""

    def __init__(self, target: WebTarget) -> None:
        self.target = target
        self.conn: Any = None
        self.tls_version = ""
        self.connected = False  # a TCP connection was made at least once

    def close(self) -> None:
        """Close the connection (the next exchange opens a new one)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def connection(self) -> Any:
        """The kept-alive connection, opened on first need."""
        import http.client

        if self.conn is None:
            host, port, _ = self.target.address
            self.conn = http.client.HTTPSConnection(
                host, port, timeout=self.target.timeout, context=self.target.context) \
                if self.target.tls else http.client.HTTPConnection(host, port,
                                                                   timeout=self.target.timeout)
        return self.conn

    def exchange(self, method: str, path: str, headers: Mapping[str, str],
                 body: Iterable[bytes | FilePart] = ()) -> Reply:
        """One request and its whole response. A kept-alive connection the server closed
        while idle is opened again once (nothing reached the server on it)."""
        import http.client

        for reused in (self.conn is not None, False):
            conn = self.connection()
            try:
                return self._exchange(conn, method, path, headers, body)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if not reused:
                    raise
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    def _exchange(self, conn: Any, method: str, path: str, headers: Mapping[str, str],
                  body: Iterable[bytes | FilePart]) -> Reply:
        conn.putrequest(method, self.target.address[2] + path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        self.connected = True
        if self.target.tls and not self.tls_version:
            self.tls_version = conn.sock.version() or ""
        for piece in body:
            if isinstance(piece, FilePart):
                with piece.path.open("rb") as fh:
                    if conn.sock.sendfile(fh, 0, piece.size) != piece.size:
                        raise WebError(f"{piece.path} got shorter since it was read: not sent")
            else:
                conn.sock.sendall(piece)
        response = conn.getresponse()
        data = response.read()
        if response.will_close:
            self.close()
        return Reply(response.status, response.reason, response.headers, data)


def web_call(client: WebClient, method: str, path: str, headers: Mapping[str, str],
             body: Iterable[bytes | FilePart] = (), stop: threading.Event | None = None
             ) -> Reply:
    """A request with its retries: connection faults, 408, 429 and 5xx are retried with
    backoff (a Retry-After honoured); any other answer is returned. Raises WebError."""
    import http.client
    import ssl

    target, attempt = client.target, 0
    while True:
        delay = None
        try:
            reply = client.exchange(method, path, {**headers, **authorization(target)}, body)
        except ssl.SSLCertVerificationError as exc:
            raise WebError(f"TLS: the server's certificate is not accepted: "
                           f"{exc.verify_message}") from None
        except ssl.SSLError as exc:
            hint = "" if target.tls_cert else \
                "; or does it want a client certificate (--tls-cert, --tls-key)?"
            raise WebError(f"TLS with {target.address[0]}:{target.address[1]} failed "
                           f"({one_line(str(exc))}): does the server speak HTTPS on this "
                           f"port{hint}") from None
        except (OSError, http.client.HTTPException) as exc:
            why = (f"no connection to {target.address[0]}:{target.address[1]} (refused or "
                   "timed out): check --url, or whether the server runs") if not client.connected \
                else f"{type(exc).__name__}: {one_line(str(exc)) or 'connection lost'}"
            if target.tls and not target.tls_cert and isinstance(exc, ConnectionResetError
                                                                  | BrokenPipeError):
                why += " (over TLS: does the server want a client certificate (--tls-cert, " \
                       "--tls-key)?)"
        else:
            if reply.status not in (408, 429) and reply.status < 500:
                return reply
            why, delay = http_problem(reply, target), retry_after(reply)
        if attempt >= target.retries or (stop is not None and stop.is_set()):
            raise WebError(why, client.connected)
        attempt += 1
        wait = delay if delay is not None else min(0.5 * 2 ** (attempt - 1), 8.0)
        if stop is not None:
            stop.wait(wait)
        else:
            time.sleep(wait)


def retry_after(reply: Reply) -> float | None:
    """Seconds a Retry-After header asks for (a number or an HTTP date), at most the cap."""
    from email.utils import parsedate_to_datetime

    value = (reply.headers.get("Retry-After") or "").strip()
    if not value:
        return None
    try:
        seconds = float(value) if value.isdigit() else (
            parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
    except (TypeError, ValueError):
        return None
    return min(max(0.0, seconds), RETRY_AFTER_CAP)


def http_problem(reply: Reply, target: WebTarget) -> str:
    """An HTTP answer that is not what was asked for, with what to do about it."""
    credentials = target.token_file or target.user
    hint = {
        401: ": the credentials were refused (check --token-file, or --user and "
             f"{PASSWORD_VARIABLE})" if credentials else
             ": the server wants credentials (--token-file, or --user with "
             f"{PASSWORD_VARIABLE})",
        403: ": these credentials may not do this",
        404: ": is --url the service root (e.g. http://127.0.0.1:8042/dicom-web)?",
        413: ": the request is too large for the server",
        415: ": the server does not take multipart/related application/dicom here",
    }.get(reply.status, "")
    if 300 <= reply.status < 400:
        hint = f": redirected to {reply.headers.get('Location') or '?'} (give that as --url)"
    said = server_message(reply)
    return f"HTTP {reply.status} {reply.reason}{hint}" + (f" ({said})" if said else "")


def server_message(reply: Reply) -> str:
    """What an error's body says, on one short line (a JSON Message, else its text)."""
    text = reply.body[:2000].decode("utf-8", "replace")
    with contextlib.suppress(ValueError, AttributeError):
        text = str(json.loads(text).get("Message") or "")
    return one_line(text)[:160]


def response_dataset(reply: Reply) -> Dataset | None:
    """The DICOM JSON body of a STOW-RS response as a data set (None if it has none)."""
    try:
        return Dataset.from_json(json.loads(reply.body))
    except (ValueError, TypeError, AttributeError, KeyError):
        return None


# ── STOW-RS: --send ──────────────────────────────────────────────────────────────────────


def stow_batches(files: list[Indexed]) -> list[list[Indexed]]:
    """A study's files in requests of at most STOW_REQUEST_BYTES (a bigger file alone)."""
    batches: list[list[Indexed]] = []
    size = 0
    for f in files:
        if not batches or size + f.size > STOW_REQUEST_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(f)
        size += f.size
    return batches


def part10_bytes(f: Indexed) -> bytes:
    """A file that is not a Part 10 file as it is (no preamble or file meta, meta that
    disagrees with its data set, odd lengths), encoded as one by pydicom."""
    ds, source = decoded_for_sending(f)
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = f.sop_class, f.sop_instance
    meta.TransferSyntaxUID = source
    ds.file_meta = meta
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def stow_part(f: Indexed) -> bytes | FilePart:
    """A file as a part of a request: as it is on disk, or encoded by part10_bytes. Raises
    OSError or ValueError when it cannot be read again."""
    if f.part10:
        return FilePart(f.path, f.path.stat().st_size)
    try:
        return part10_bytes(f)
    except pydicom.errors.InvalidDicomError as exc:
        raise ValueError(str(exc)) from None


def stow_body(parts: list[bytes | FilePart], boundary: bytes
              ) -> tuple[list[bytes | FilePart], int]:
    """A multipart/related body of the parts, and its length."""
    head = b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n"
    pieces: list[bytes | FilePart] = []
    for part in parts:
        pieces += [head, part, b"\r\n"]
    pieces.append(b"--" + boundary + b"--\r\n")
    return pieces, sum(p.size if isinstance(p, FilePart) else len(p) for p in pieces)


def stow(client: WebClient, files: list[Indexed], stop: threading.Event) -> list[Sent]:
    """POST one request of a study's files to {url}/studies; each file's outcome from the
    response's ReferencedSOPSequence and FailedSOPSequence (a file that cannot be read
    again since it was indexed fails alone)."""
    import uuid

    t0 = time.perf_counter()
    boundary = f"dicom_sar-{uuid.uuid4().hex}".encode()
    ready: list[tuple[Indexed, bytes | FilePart]] = []
    unread: list[Sent] = []
    for f in files:
        try:
            ready.append((f, stow_part(f)))
        except (OSError, ValueError) as exc:
            unread.append(Sent.of(f, Outcome.FAILED, "cannot read it again since it was "
                                  f"indexed: {getattr(exc, 'strerror', None) or exc}"))
    if not ready:
        return unread
    files = [f for f, _ in ready]
    body, length = stow_body([part for _, part in ready], boundary)
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary='
               + boundary.decode(), "Content-Length": str(length), "Accept": DICOM_JSON}
    reply = web_call(client, "POST", "/studies", headers, body, stop)
    seconds = (time.perf_counter() - t0) / len(files)
    tls = client.tls_version
    return unread + [dataclasses.replace(s, tls=tls) if s.delivered else s
                     for s in stow_outcomes(files, reply, client.target, seconds)]


def stow_outcomes(files: list[Indexed], reply: Reply, target: WebTarget,
                  seconds: float) -> list[Sent]:
    """Each file's outcome in a STOW-RS response (PS3.18 10.5.3): listed as stored (with
    its WarningReason) or failed (with its FailureReason); unlisted, the HTTP status says."""
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    ds = response_dataset(reply) or Dataset()
    stored = {str(i.get("ReferencedSOPInstanceUID", "")): i
              for i in ds.get("ReferencedSOPSequence") or ()}
    failed = {str(i.get("ReferencedSOPInstanceUID", "")): i
              for i in ds.get("FailedSOPSequence") or ()}
    http = f"HTTP {reply.status} {reply.reason}"

    def meaning(code: int) -> str:
        return f"0x{code:04X} " + STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown"))[1]

    outcomes = []
    for f in files:
        if f.sop_instance in failed:
            code = int(failed[f.sop_instance].get("FailureReason") or 0xC000)
            outcomes.append(Sent.of(f, Outcome.FAILED, f"{meaning(code)} ({http})", code,
                                    seconds))
        elif f.sop_instance in stored:  # whatever the HTTP status (a partial failure)
            warning = int(stored[f.sop_instance].get("WarningReason") or 0)
            outcomes.append(Sent.of(f, Outcome.WARNING, meaning(warning), warning, seconds)
                            if warning else Sent.of(f, Outcome.SENT, "", 0, seconds))
        else:
            why = http_problem(reply, target) if reply.status >= 300 else \
                f"{http}, but the response does not list this instance as stored"
            outcomes.append(Sent.of(f, Outcome.FAILED, why, None, seconds))
    return outcomes


def stow_worker(todo: Any, target: WebTarget, events: Any, stop: threading.Event,
                unreachable: threading.Event) -> list[Sent]:
    """Take studies from the queue until it is empty and send each, request by request,
    over this worker's one kept-alive connection."""
    import queue

    client, results = WebClient(target), []
    try:
        while True:
            try:
                _study, files = todo.get_nowait()
            except queue.Empty:
                return results
            for batch in stow_batches(files):
                outcomes = stow_or_fail(client, batch, stop, unreachable)
                results += outcomes
                for outcome in outcomes:
                    events.put(outcome)
    finally:
        client.close()


def stow_or_fail(client: WebClient, batch: list[Indexed], stop: threading.Event,
                 unreachable: threading.Event) -> list[Sent]:
    """stow, or every file of the request failed (or not sent, after a stop) and why."""
    if stop.is_set():
        return [Sent.of(f, Outcome.NOT_SENT, "stopped before sending") for f in batch]
    if unreachable.is_set():
        why = f"no connection to {client.target.url}; not tried, as another request found " \
              "no one there"
        return [Sent.of(f, Outcome.FAILED, why) for f in batch]
    try:
        return stow(client, batch, stop)
    except WebError as exc:
        if not exc.connected:
            unreachable.set()
        return [Sent.of(f, Outcome.FAILED, str(exc)) for f in batch]


def stow_requests(studies: dict[str, list[Indexed]], target: WebTarget) -> Iterator[str]:
    """--dry-run: the requests a send would make."""
    for study, files in studies.items():
        for i, batch in enumerate(stow_batches(files)):
            yield (f"POST {target.url}/studies  study {study}  request {i + 1}: {len(batch)} "
                   f"files, {sum(f.size for f in batch)} bytes")


def web_echo(target: WebTarget) -> tuple[bool, str]:
    """--echo: ask QIDO-RS for one study; (ok, what answered and how fast)."""
    client, t0 = WebClient(target), time.perf_counter()
    where = f"QIDO-RS {target.url}/studies?limit=1"
    try:
        reply = web_call(client, "GET", "/studies?limit=1", {"Accept": DICOM_JSON})
    except WebError as exc:
        return False, f"{where}: {exc}"
    finally:
        client.close()
    rtt = (time.perf_counter() - t0) * 1000
    if reply.status not in (200, 204):
        return False, f"{where}: {http_problem(reply, target)}"
    server = reply.headers.get("Server")
    tls = f", {client.tls_version}" if client.tls_version else ", not encrypted"
    return True, (f"{where}: HTTP {reply.status} {reply.reason}" + (f" from {server}" if server
                                                                     else "")
                  + f", {rtt:.1f} ms round trip{tls}")


# ── QIDO-RS: --verify, --check-ingest ────────────────────────────────────────────────────


@contextlib.contextmanager
def qido_session(target: WebTarget) -> Iterator[Callable[[str, str], set[str]]]:
    """A worker's query session: held(study, series) over one connection, after checking
    the service answers searches at all (so a wrong --url is not 'nothing held')."""
    client = WebClient(target)
    try:
        try:
            reply = web_call(client, "GET", "/studies?limit=1", {"Accept": DICOM_JSON})
        except WebError as exc:
            raise QueryFailedError(f"no answer from QIDO-RS at {target.url}: {exc}") from None
        if reply.status not in (200, 204):
            raise QueryFailedError(f"QIDO-RS at {target.url} refused the search: "
                                   f"{http_problem(reply, target)}")
        yield lambda study, series: qido_held(client, study, series)
    finally:
        client.close()


def qido_held(client: WebClient, study: str, series: str) -> set[str]:
    """The SOP Instance UIDs the service holds in a series (or a study, series unknown),
    page by page until a page brings nothing new. Raises QueryFailedError."""
    import urllib.parse

    def quoted(uid: str) -> str:
        return urllib.parse.quote(uid, safe="")

    path = f"/studies/{quoted(study)}" + (f"/series/{quoted(series)}" if series else "")
    held: set[str] = set()
    offset = 0
    while True:
        query = f"{path}/instances?includefield=00080018&limit={QIDO_PAGE}&offset={offset}"
        try:
            reply = web_call(client, "GET", query, {"Accept": DICOM_JSON})
        except WebError as exc:
            raise QueryFailedError(f"no answer from QIDO-RS at {client.target.url}: "
                                   f"{exc}") from None
        if reply.status in (204, 404):  # nothing matches (404: no such study or series)
            return held
        if reply.status != 200:
            raise QueryFailedError(f"QIDO-RS at {client.target.url} refused the search: "
                                   f"{http_problem(reply, client.target)}")
        try:
            items = [Dataset.from_json(item) for item in json.loads(reply.body)]
        except (ValueError, TypeError, AttributeError, KeyError):
            raise QueryFailedError(f"QIDO-RS at {client.target.url} answered something that "
                                   "is not a DICOM JSON list") from None
        page = {str(ds.get("SOPInstanceUID", "")) for ds in items} - {""}
        if not page - held:  # the end, or a server that ignores offset
            return held
        held |= page
        offset += len(items)


# ════════════════════════════════════════════════════════════════════════════════════════
# Mode --check-ingest: ask the PACS (C-FIND, IMAGE level, Study Root) which instances of a
# generated tree it holds and compare with what the manifest expects; --ingest-test runs
# generate -> send -> settle -> check in one go
# ════════════════════════════════════════════════════════════════════════════════════════


def series_keys(instances: list[dict[str, Any]]) -> list[SeriesKey]:
    """The series a manifest's instances are in, each once, in manifest order."""
    return list(dict.fromkeys((e["study_uid"], e["series_uid"]) for e in instances))


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """The instances of a --generate manifest (a usage error for anything else)."""
    try:
        instances = json.loads(path.read_text(encoding="utf-8"))["instances"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--check-ingest {path}: not a --generate manifest.json ({exc})") \
            from None
    return instances


def compare_with_manifest(instances: list[dict[str, Any]],
                          held: dict[SeriesKey, set[str] | None]) -> dict[str, Any]:
    """Per scenario and expectation, how many instances the receiver holds; every mismatch.

    accept must be held; reject and absent must not be. A rejected instance that shares its
    SOP Instance UID with an accepted one (duplicate_sop) cannot be told apart by C-FIND.
    """
    accepted = {e["sop_uid"] for e in instances if e["expect"] == Expect.ACCEPT}
    table: dict[str, dict[str, dict[str, int]]] = {}
    mismatches, unanswered, indistinguishable = [], [], []
    for e in instances:
        row = table.setdefault(e["scenario"], {}).setdefault(
            e["expect"], {"expected": 0, "held": 0, "mismatches": 0})
        row["expected"] += 1
        got = held.get((e["study_uid"], e["series_uid"]))
        brief = {k: e.get(k) for k in ("scenario", "fault", "path", "sop_uid", "expect")}
        if got is None:
            unanswered.append(brief)
            continue
        is_held = e["sop_uid"] in got
        row["held"] += is_held
        if e["expect"] != Expect.ACCEPT and e["sop_uid"] in accepted:
            indistinguishable.append(brief)
        elif is_held != (e["expect"] == Expect.ACCEPT):
            mismatches.append({**brief, "held": is_held})
            row["mismatches"] += 1
    return {"scenarios": table, "mismatches": mismatches, "unanswered": unanswered,
            "indistinguishable": indistinguishable}


def run_check(opts: Options, out: Callable[[str], None]) -> int:
    """--check-ingest: query, compare, report; exit 1 on any mismatch."""
    assert opts.manifest is not None
    target = with_tls(opts.send)
    if target is None:
        return EXIT_FAILURES
    instances = read_manifest(opts.manifest)
    held, why = held_by_series(target, series_keys(instances), opts.workers)
    report = compare_with_manifest(instances, held)
    report = {"manifest": str(opts.manifest), "destination": target.where,
              "instances": len(instances), "checked": not why, "error": why or None, **report}
    for line in render_check(report):
        out(line)
    if why:
        print(f"{paint('error:', RED)} {why}", file=sys.stderr)
        errlog.error("%s: CheckNotMade: %s", opts.manifest, why)
    log.info("check-ingest: %d instances, %d mismatches, %d unanswered", len(instances),
             len(report["mismatches"]), len(report["unanswered"]))
    for m in report["mismatches"]:
        errlog.error("%s: IngestMismatch: expected %s (%s, fault %s), the PACS %s it",
                     m["path"], m["expect"], m["scenario"], m["fault"],
                     "holds" if m["held"] else "does not hold")
    if opts.summary_json:
        write_summary(report, opts.summary_json)
    return EXIT_FAILURES if report["mismatches"] or report["unanswered"] else EXIT_OK


def render_check(report: dict[str, Any]) -> Iterator[str]:
    """The report: a table per scenario, then every mismatch with its scenario, fault, file;
    a check no series answered is only the reason it could not be made."""
    if report["error"] and len(report["unanswered"]) == report["instances"]:
        yield f"{report['instances']} instances: the check could not be made (why: stderr)"
        return
    width = max([len(s) for s in report["scenarios"]] + [8])
    yield f"{'scenario':<{width}}  expect  files  held  mismatches"
    for scenario, rows in report["scenarios"].items():
        for expect, row in sorted(rows.items()):
            yield (f"{scenario:<{width}}  {expect:<6}  {row['expected']:5d}  {row['held']:4d}  "
                   f"{row['mismatches'] or '':>10}")
    for m in report["mismatches"]:
        found = "the PACS holds it" if m["held"] else "the PACS does not hold it"
        yield (f"mismatch: {m['scenario']} (fault {m['fault'] or '-'}) {m['path']}: expected "
               f"{m['expect']}, {found}")
    for m in report["indistinguishable"]:
        yield (f"note: {m['scenario']} (fault {m['fault']}) {m['path']}: shares its SOP "
               "Instance UID with an accepted instance; C-FIND cannot tell them apart")
    for m in report["unanswered"]:
        yield f"unanswered: {m['scenario']} {m['path']}: no answer for its series"
    verdict = "the PACS behaved exactly as the manifest expects" if not (
        report["mismatches"] or report["unanswered"]) else \
        f"{len(report['mismatches'])} mismatches, {len(report['unanswered'])} unanswered" + (
            f" (the check could not be completed: {report['error']})" if report["error"] else "")
    yield f"{report['instances']} instances checked: {verdict}"


def run_ingest_test(opts: Options, out: Callable[[str], None], stop: StopSignal) -> int:
    """generate into a fresh directory, send it, wait until the PACS settles, check."""
    assert opts.output is not None
    if opts.output.exists() and any(opts.output.iterdir()):
        raise UsageError(f"--output {opts.output}: --ingest-test generates into a new or empty "
                         "directory")
    target = with_tls(opts.send)  # one TLS context for the send, the settling and the check
    if target is None:
        return EXIT_FAILURES
    opts = dataclasses.replace(opts, send=target)
    print(f"== generate into {opts.output}", file=sys.stderr)
    if run_generate(dataclasses.replace(opts, mode="generate"), out, stop) not in (0, 1) \
            or stop.signum:
        return stop.exit_status() or EXIT_FAILURES
    print(f"== send to {opts.send.describe()}", file=sys.stderr)
    run_send(dataclasses.replace(opts, mode="send", paths=(opts.output,)), out, stop)
    if stop.signum:
        return stop.exit_status()
    manifest = opts.output / "manifest.json"
    print("== wait until the PACS settles", file=sys.stderr)
    settle(opts, read_manifest(manifest))
    print("== check what it kept against the manifest", file=sys.stderr)
    return run_check(dataclasses.replace(opts, mode="check_ingest", manifest=manifest), out)


def settle(opts: Options, instances: list[dict[str, Any]]) -> None:
    """Poll the held count until it stops changing (a PACS may store asynchronously), at
    most --settle-timeout seconds."""
    target = with_tls(opts.send)
    if target is None:
        return
    keys = series_keys(instances)
    deadline, last = time.monotonic() + target.settle_timeout, -1
    while time.monotonic() < deadline:
        held, why = held_by_series(target, keys, opts.workers)
        count = sum(len(h) for h in held.values() if h is not None)
        if count == last or why:  # settled, or no query answers: the check will say why
            return
        last = count
        time.sleep(1.0)
    log.warning("the PACS did not settle within --settle-timeout")


# ════════════════════════════════════════════════════════════════════════════════════════
# Mode --merge-summaries: the --summary-json files of --shard runs, added up
# ════════════════════════════════════════════════════════════════════════════════════════


SLOWEST = ("total_seconds",)  # shards run side by side: the run took as long as the slowest


def merge_summaries(summaries: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """(the summed summary, what is wrong: a missing or repeated shard, mixed runs)."""
    problems = []
    shards = [s.get("shard") for s in summaries]
    counts = {str(s).split("/")[-1] for s in shards if s}
    if None in shards or len(counts) != 1:
        problems.append("every summary must come from a --shard run of the same N")
    else:
        n = int(counts.pop())
        have = collections.Counter(int(str(s).split("/")[0]) for s in shards)
        missing = [i for i in range(1, n + 1) if not have[i]]
        problems += [f"shard {i}/{n} is missing" for i in missing]
        problems += [f"shard {i}/{n} is given {k} times" for i, k in have.items() if k > 1]
    if len({s.get("mode") for s in summaries}) > 1:
        problems.append("the summaries come from different modes")
    merged: dict[str, Any] = {}
    for s in summaries:
        for key, value in s.items():
            if key == "shard":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                merged.setdefault(key, value)
            elif key in SLOWEST:
                merged[key] = max(merged.get(key, 0), value)
            else:
                merged[key] = merged.get(key, 0) + value
    seconds, done = merged.get("total_seconds") or 0, merged.get("processed", 0)
    merged["avg_ms_per_file"] = round(sum(
        s.get("avg_ms_per_file", 0) * (s.get("processed", 0) + s.get("errors", 0))
        for s in summaries) / max(1, done + merged.get("errors", 0)), 3)
    merged["files_per_second"] = round(done / seconds, 1) if seconds else 0.0
    merged["mb_per_second"] = round(sum(s.get("mb_per_second", 0) * s.get(
        "total_seconds", 0) for s in summaries) / seconds, 2) if seconds else 0.0
    merged["workers"] = sum(s.get("workers", 0) for s in summaries)
    merged["shards"] = len(summaries)
    return merged, problems


def run_merge(opts: Options, out: Callable[[str], None]) -> int:
    """Sum the shards' summaries; exit 1 if a shard is missing or any had failures."""
    summaries = []
    for name in opts.merge:
        try:
            summaries.append(json.loads(Path(name).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--merge-summaries {name}: {exc}") from None
    merged, problems = merge_summaries(summaries)
    for problem in problems:
        print(f"{paint('error:', RED)} {problem}", file=sys.stderr)
    if opts.summary_json:
        write_summary(merged, opts.summary_json)
    if not opts.quiet:
        print(render_summary(merged), file=sys.stderr)
    failed = merged.get("errors", 0) or merged.get("rejected", 0) or merged.get(
        "failed_transfers", 0)
    return EXIT_FAILURES if problems or failed else EXIT_OK


# ════════════════════════════════════════════════════════════════════════════════════════
# Mode --ui: the generator's "power customize" wizard as a page served on loopback; its
# JSON API calls the same functions as the command line (options, config, plan, generate,
# echo, send, check)
# ════════════════════════════════════════════════════════════════════════════════════════


@dataclasses.dataclass(eq=False)
class Job:
    """A generate or send the page started, in a thread of its own; the page polls it."""

    kind: str
    total: int = 0
    done: int = 0
    finished: bool = False
    code: int | None = None
    summary: dict[str, Any] | None = None
    error: str = ""
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def state(self) -> dict[str, Any]:
        """What the page shows."""
        with self.lock:
            return {"kind": self.kind, "total": self.total, "done": self.done,
                    "finished": self.finished, "code": self.code, "summary": self.summary,
                    "error": self.error}


def wizard_generate_options(request: dict[str, Any], base: Options) -> Options:
    """A --generate run exactly as the command line would make it from the page's request:
    the same argparse, the same option checks, the same --config checks (UsageError)."""
    argv = ["--generate", "--output", str(request.get("output") or "")]
    for name in request.get("scenarios") or []:
        argv += ["--scenario", str(name)]
    for flag in ("seed", "patients", "studies", "series", "instances", "modality", "size",
                 "layout"):
        value = request.get(flag)
        if value not in (None, ""):
            argv += [f"--{flag}", str(value)]
    if not request.get("output"):
        raise UsageError("choose an output directory (new or empty)")
    opts = wizard_run_options(argv, base)
    config = request.get("config")
    if config:
        checked = check_config(config, "ui")
        req = dataclasses.replace(opts.generate, config=checked, config_name="ui",
                                  scenarios=opts.generate.scenarios if request.get(
                                      "scenarios") else ())
        opts = dataclasses.replace(opts, generate=req)
    return opts


def wizard_send_options(request: dict[str, Any], base: Options, mode: str) -> Options:
    """--send / --echo / --check-ingest options from the page's Send section."""
    argv = [FLAG_OF[mode]]
    if mode == "check_ingest":
        argv.append(str(Path(request.get("output") or ".") / "manifest.json"))
    if request.get("url"):  # DICOMweb; a password only from the wizard's environment
        argv += ["--url", str(request["url"])]
        for key, flag in (("token_file", "--token-file"), ("user", "--user")):
            if request.get(key):
                argv += [flag, str(request[key])]
    else:
        argv += ["-H", str(request.get("host") or ""), "-p", str(request.get("port") or 0),
                 "-a", str(request.get("called") or "ANY-SCP"),
                 "-c", str(request.get("calling") or "DICOM_SAR")]
    if mode == "send":
        argv += ["--path", str(request.get("output") or "")]
    return wizard_run_options(argv, base)


def wizard_run_options(argv: list[str], base: Options) -> Options:
    """Options from a command line the page's request made, through the CLI's own parser
    and checks (a UsageError, never an exit); logs and workers as the --ui run's."""
    parser = build_parser()
    parser.exit_on_error = False
    try:
        ns = parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise UsageError(str(exc) or "invalid options") from None
    return dataclasses.replace(options_from_args(ns, parser), log_dir=base.log_dir,
                               progress=False,
                               quiet=True, workers=base.workers)


def hmac_equal(a: str, b: str) -> bool:
    """Compare tokens in constant time."""
    import hmac
    return hmac.compare_digest(a.encode(), b.encode())


def config_where(message: str) -> str:
    """The JSON path a --config error names ('current_study.images[0].tags.StudyDate')."""
    m = re.match(r"--config [^:]*: ([\w.\[\]]+):", message)
    return m[1] if m else ""


def wizard_server(port: int, opts: Options) -> Any:
    """The --ui HTTP server (its classes are made here: http.server is imported only by the
    runs that serve the page)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class WizardHandler(BaseHTTPRequestHandler):
        """The page and its JSON API; every request must carry the run's token."""

        server: Any

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("ui: " + format, *args)

        def authorised(self) -> bool:
            from urllib.parse import parse_qs, urlsplit
            token = self.headers.get("X-Token") or parse_qs(urlsplit(self.path).query).get(
                "token", [""])[0]
            if hmac_equal(token, self.server.token):
                return True
            self.reply(403, {"error": "forbidden: this page needs the token from its URL"})
            return False

        def reply(self, code: int, body: dict[str, Any] | str, kind: str = "application/json"
                  ) -> None:
            data = (body if isinstance(body, str) else json.dumps(body)).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", f"{kind}; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if not self.authorised():
                return
            path = self.path.split("?", 1)[0]
            if path == "/":
                self.reply(200, WIZARD_PAGE, "text/html")
            elif path == "/api/catalogue":
                self.reply(200, {"scenarios": scenario_catalogue(), "faults": FAULTS,
                                 "modalities": list(DEFAULT_SIZES), "layouts": ["tree", "flat"]})
            elif path.startswith("/api/jobs/"):
                job = self.server.jobs.get(path.rsplit("/", 1)[-1])
                self.reply(200, job.state()) if job else self.reply(404, {"error": "no such job"})
            else:
                self.reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            if not self.authorised():
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(min(length, 1 << 22)) or b"{}")
                if not isinstance(request, dict):
                    raise UsageError("the request must be a JSON object")
                self.reply(200, self.server.answer(self.path.split("?", 1)[0], request))
            except UsageError as exc:
                self.reply(400, {"error": str(exc), "where": config_where(str(exc))})
            except ValueError as exc:
                self.reply(400, {"error": f"not JSON: {exc}"})


    class WizardServer(ThreadingHTTPServer):
        """The --ui server: loopback only, one token, the jobs the page started."""

        daemon_threads = True

        def __init__(self, port: int, opts: Options):
            super().__init__(("127.0.0.1", port), WizardHandler)
            import secrets
            self.token, self.opts = secrets.token_urlsafe(24), opts
            self.jobs: dict[str, Job] = {}

        def answer(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
            """The JSON API: what each POST does, through the command line's own functions."""
            if path == "/api/validate":
                wizard_generate_options(request, self.opts)
                return {"ok": True}
            if path == "/api/plan":
                opts = wizard_generate_options(request, self.opts)
                check_generate_output(opts.output or Path(DEFAULT_GENERATED))
                plans = plan_generation(opts.generate)
                return {"lines": [plan_line(p) for p in plans],
                        "files": sum(p.expect != Expect.ABSENT for p in plans)}
            if path == "/api/generate":
                opts = wizard_generate_options(request, self.opts)
                check_generate_output(opts.output or Path(DEFAULT_GENERATED))
                return {"job": self.start("generate", opts)}
            if path == "/api/echo":
                target = with_tls(wizard_send_options(request, self.opts, "echo").send)
                if target is None:
                    raise UsageError("TLS cannot be set up (see the server's log)")
                ok, message = echo(target)
                return {"ok": ok, "message": message}
            if path == "/api/send":
                return {"job": self.start("send", wizard_send_options(request, self.opts, "send"))}
            if path == "/api/check":
                opts = wizard_send_options(request, self.opts, "check_ingest")
                report = self.opts.log_dir / f"dicom_sar-ui-check-{os.getpid()}.json"
                code = run_check(dataclasses.replace(opts, summary_json=report), lambda _: None)
                return {"code": code, "report": json.loads(report.read_text())}
            raise UsageError(f"no such API: {path}")

        def start(self, kind: str, opts: Options) -> str:
            """Run a generate or a send in a thread; the page polls /api/jobs/<id>."""
            import uuid
            job_id, job = uuid.uuid4().hex, Job(kind)
            self.jobs[job_id] = job
            summary = self.opts.log_dir / f"dicom_sar-ui-{kind}-{job_id}.json"
            opts = dataclasses.replace(opts, summary_json=summary)

            def watch(amount: int, total: int) -> None:  # files generated, bytes sent
                with job.lock:
                    job.done += amount
                    job.total = total

            def run_job() -> None:
                stop = StopSignal(handlers=False)
                try:
                    code = (run_generate(opts, lambda _: None, stop, watch) if kind == "generate"
                            else run_send(opts, lambda _: None, stop, watch))
                    data = json.loads(summary.read_text()) if summary.exists() else None
                    with job.lock:
                        job.code, job.summary = code, data
                except Exception as exc:
                    with job.lock:
                        job.error = f"{type(exc).__name__}: {exc}"
                finally:
                    with job.lock:
                        job.finished = True

            threading.Thread(target=run_job, daemon=True, name=f"{PROG}-ui-{kind}").start()
            return job_id

    return WizardServer(port, opts)


def run_ui(opts: Options, stop: StopSignal) -> int:
    """Serve the wizard until Ctrl-C (or SIGTERM); print its URL (with the token), open a
    browser where there is a screen."""
    server = wizard_server(opts.ui_port, opts)
    url = f"http://127.0.0.1:{server.server_address[1]}/?token={server.token}"
    print(f"dicom_sar wizard: {url}", flush=True)
    print("(Ctrl-C stops it)", file=sys.stderr, flush=True)
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or \
            os.environ.get("BROWSER"):
        import webbrowser
        with contextlib.suppress(Exception):
            webbrowser.open(url)
    threading.Thread(target=lambda: (stop.event.wait(), server.shutdown()), daemon=True,
                     name=f"{PROG}-ui-stop").start()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return stop.exit_status()


WIZARD_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dicom_sar wizard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f6f8;color:#1d2733}
header{background:#1d3557;color:#fff;padding:10px 18px}header h1{font-size:18px;margin:0}
main{display:grid;grid-template-columns:minmax(300px,1fr) minmax(360px,1.4fr);gap:14px;padding:14px}
section{background:#fff;border:1px solid #d6dde4;border-radius:6px;padding:12px}
h2{font-size:15px;margin:0 0 8px}label{display:inline-block;margin:3px 10px 3px 0}
input[type=text],input[type=number],select{padding:3px 5px;border:1px solid #b8c2cc;
  border-radius:3px}
input[type=number]{width:70px}
#scenarios{max-height:260px;overflow:auto;border:1px solid #e2e7ec;padding:4px}
#scenarios div{padding:1px 0}#scenarios small{color:#5a6b7b}
button{background:#1d6fb8;color:#fff;border:0;border-radius:3px;padding:5px 11px;
  margin:4px 6px 4px 0;cursor:pointer}
button.light{background:#e7edf3;color:#1d2733}
.study{border:1px solid #e2e7ec;border-radius:4px;padding:6px;margin:6px 0}
.image{margin:4px 0 4px 14px;padding:4px;border-left:3px solid #c9d6e3}
.err{color:#b00020;font-size:12px;margin-left:6px}
pre{background:#0f1720;color:#d7e3ee;padding:8px;max-height:240px;overflow:auto;font-size:12px;
  white-space:pre-wrap}
progress{width:100%;height:16px}
.full{grid-column:1/-1}
table{border-collapse:collapse}
td{padding:1px 10px 1px 0}
</style></head><body>
<header><h1>dicom_sar &mdash; generate test data, power customize, send</h1></header>
<main>
<section><h2>Scenarios</h2>
<input id="search" type="text" placeholder="search scenarios" style="width:95%">
<div id="scenarios"></div></section>
<section><h2>Options</h2>
<label>patients <input id="patients" type="number" min="1"></label>
<label>studies <input id="studies" type="number" min="1"></label>
<label>series <input id="series" type="number" min="1"></label>
<label>instances <input id="instances" type="number" min="1"></label><br>
<label>modality <select id="modality"><option value="">default</option></select></label>
<label>size <input id="size" type="text" placeholder="64x64" size="8"></label>
<label>layout <select id="layout"></select></label>
<label>seed <input id="seed" type="number" value="0"></label><br>
<label>output <input id="output" type="text" size="40" placeholder="a new or empty directory">
</label>
<span class="err" data-where="options"></span></section>
<section class="full"><h2>Power customize</h2>
<div id="groups"></div>
<button class="light" id="load-btn">Load config JSON</button>
<input id="load" type="file" accept=".json" hidden>
<button class="light" id="save">Save config JSON</button>
<span class="err" data-where="config"></span></section>
<section><h2>Plan and generate</h2>
<button id="preview">Preview</button><button id="generate">Generate</button>
<progress id="progress" value="0" max="1"></progress><div id="status"></div>
<pre id="plan"></pre><div id="summary"></div></section>
<section><h2>Send (optional)</h2>
<label>host <input id="host" type="text" value="127.0.0.1"></label>
<label>port <input id="port" type="number" value="4242"></label>
<label>called AE <input id="called" type="text" value="ORTHANC" size="12"></label>
<label>calling AE <input id="calling" type="text" value="DICOM_SAR" size="12"></label><br>
<label>or DICOMweb URL <input id="url" type="text" size="36"
  placeholder="http://127.0.0.1:8042/dicom-web"></label>
<label>token file <input id="token_file" type="text" size="16"></label>
<label>user <input id="user" type="text" size="10"
  title="its password from DICOMWEB_PASSWORD in the wizard's environment"></label><br>
<button class="light" id="echo">Echo</button>
<button id="send">Send</button>
<button id="check">Check ingestion</button>
<div id="send-status"></div><pre id="report"></pre></section>
</main>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token") || "";
const $ = id => document.getElementById(id);
let catalogue = {scenarios: {}, faults: {}};
async function api(path, body) {
  const r = await fetch(path, body === undefined ? {headers: {"X-Token": token}} :
    {method: "POST", headers: {"X-Token": token, "Content-Type": "application/json"},
     body: JSON.stringify(body)});
  return [r.status, await r.json()];
}
function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "on") for (const [ev, f] of Object.entries(v)) e.addEventListener(ev, f);
    else if (k in e && k !== "list") e[k] = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}
const GROUPS = [["current_study", "Current study", false], ["internal_priors",
    "Internal priors", true],
                ["external_priors", "External priors", true]];
const state = {current_study: null, internal_priors: [], external_priors: []};
function newStudy() { return {count: 4, cancerous: false, description: "", images: []}; }
function faultSelect(image) {
  const s = el("select", {on: {change: e => { image.fault = e.target.value || undefined;
      changed(); }}},
               el("option", {value: ""}, "no fault"));
  for (const [name, what] of Object.entries(catalogue.faults))
    s.append(el("option", {value: name, title: what, selected: image.fault === name}, name));
  return s;
}
function renderGroups() {
  const root = $("groups"); root.textContent = "";
  for (const [key, title, many] of GROUPS) {
    const box = el("div", {}, el("h3", {style: "font-size:14px;margin:6px 0"}, title));
    const studies = many ? state[key] : (state[key] ? [state[key]] : []);
    studies.forEach((study, i) => {
      const where = many ? `${key}[${i}]` : key;
      const div = el("div", {className: "study"},
        el("label", {}, "count ", el("input", {type: "number", min: 0, value: study.count,
          on: {change: e => { study.count = parseInt(e.target.value || "0"); changed(); }}})),
        el("span", {className: "err", "data-where": `${where}.count`}),
        el("label", {}, el("input", {type: "checkbox", checked: !!study.cancerous,
          on: {change: e => { study.cancerous = e.target.checked; changed(); }}}), " cancerous"),
        el("label", {}, "description ", el("input", {type: "text", value: study.description || "",
          on: {change: e => { study.description = e.target.value; changed(); }}})),
        el("span", {className: "err", "data-where": `${where}.description`}),
        el("button", {className: "light", on: {click: () => { study.images.push({tags: {}});
            changed(true); }}},
           "add image"),
        el("button", {className: "light", on: {click: () => {
          if (many) state[key].splice(i, 1); else state[key] = null; changed(true); }}},
              "remove study"));
      study.images.forEach((image, j) => {
        const iw = `${where}.images[${j}]`;
        const keyword = el("input", {type: "text", placeholder: "tag keyword", size: 16,
            className: "new-tag"});
        const row = el("div", {className: "image"}, `image ${j + 1} `, faultSelect(image),
            keyword,
          el("button", {className: "light add-tag", on: {click: () => {
            const k = keyword.value.trim(); if (k) { image.tags[k] = ""; changed(true); } }}},
                "add tag"),
          el("button", {className: "light", on: {click: () => { study.images.splice(j, 1);
              changed(true); }}},
            "remove"), el("span", {className: "err", "data-where": iw}));
        for (const tag of Object.keys(image.tags)) {
          row.append(el("div", {}, el("label", {}, tag + " ", el("input", {type: "text",
              value: image.tags[tag],
            "data-tag": tag, on: {change: e => { image.tags[tag] = e.target.value; changed();
                }}})),
            el("span", {className: "err", "data-where": `${iw}.tags.${tag}`})));
        }
        div.append(row);
      });
      box.append(div);
    });
    if (many || !state[key])
      box.append(el("button", {className: "light", id: `add-${key}`, on: {click: () => {
        if (many) state[key].push(newStudy()); else state[key] = newStudy(); changed(true); }}},
        `add ${many ? "a prior" : "the current study"}`));
    root.append(box);
  }
}
function config() {
  const c = {};
  if (state.current_study) c.current_study = state.current_study;
  if (state.internal_priors.length) c.internal_priors = state.internal_priors;
  if (state.external_priors.length) c.external_priors = state.external_priors;
  return Object.keys(c).length ? c : null;
}
function request() {
  const r = {scenarios: [...document.querySelectorAll("#scenarios input:checked")]
               .map(i => i.value),
             config: config(), output: $("output").value.trim()};
  for (const k of ["patients", "studies", "series", "instances", "modality", "size", "layout",
      "seed"])
    if ($(k).value !== "") r[k] = $(k).value;
  return r;
}
function showError(body) {
  document.querySelectorAll(".err").forEach(e => e.textContent = "");
  if (!body || !body.error) return;
  const target = document.querySelector(`.err[data-where="${body.where}"]`) ||
                 document.querySelector(body.where ? '.err[data-where="config"]'
                                                   : '.err[data-where="options"]');
  target.textContent = body.error;
}
let timer = null;
function changed(rerender) {
  if (rerender) renderGroups();
  clearTimeout(timer);
  timer = setTimeout(async () => { const [, b] = await api("/api/validate", request());
      showError(b); }, 250);
}
async function poll(job, onDone, status, bar) {
  const [, s] = await api(`/api/jobs/${job}`);
  bar.max = s.total || 1; bar.value = s.done;
  status.textContent = s.kind === "send"
    ? `${(s.done / 1e6).toFixed(2)} / ${(s.total / 1e6).toFixed(2)} MB`
    : `${s.done.toLocaleString()} / ${s.total.toLocaleString()} files`;
  if (!s.finished) { setTimeout(() => poll(job, onDone, status, bar), 250); return; }
  onDone(s);
}
function summaryTable(summary) {
  const t = el("table", {id: "summary-table"});
  for (const [k, v] of Object.entries(summary || {}))
    if (typeof v !== "object") t.append(el("tr", {}, el("td", {}, k.replaceAll("_", " ")),
        el("td", {}, String(v))));
  return t;
}
async function init() {
  const [code, c] = await api("/api/catalogue");
  if (code !== 200) { document.body.textContent = "forbidden: open the URL with its token";
      return; }
  catalogue = c;
  for (const [name, what] of Object.entries(c.scenarios))
    $("scenarios").append(el("div", {}, el("label", {title: what}, el("input",
        {type: "checkbox", value: name,
      id: `sc-${name}`, on: {change: () => changed()}}), ` ${name} `, el("small", {}, what))));
  for (const m of c.modalities) $("modality").append(el("option", {value: m}, m));
  for (const l of c.layouts) $("layout").append(el("option", {value: l}, l));
  for (const k of ["patients", "studies", "series", "instances", "modality", "size", "layout",
      "seed", "output"])
    $(k).addEventListener("change", () => changed());
  $("search").addEventListener("input", e => {
    const q = e.target.value.toLowerCase();
    for (const d of $("scenarios").children)
      d.hidden = q && !d.textContent.toLowerCase().includes(q);
  });
  $("load-btn").addEventListener("click", () => $("load").click());
  $("load").addEventListener("change", async e => {
    const c = JSON.parse(await e.target.files[0].text());
    state.current_study = c.current_study || null;
    state.internal_priors = c.internal_priors || [];
        state.external_priors = c.external_priors || [];
    changed(true);
  });
  $("save").addEventListener("click", () => {
    const a = el("a", {href: URL.createObjectURL(new Blob([JSON.stringify(config() || {}, null,
        1)],
                  {type: "application/json"})), download: "dicom_sar_config.json"});
    a.click();
  });
  $("preview").addEventListener("click", async () => {
    const [code, b] = await api("/api/plan", request());
    showError(code === 200 ? null : b);
    $("plan").textContent = code === 200
      ? b.lines.join("\\n") + `\\n\\n${b.files} files would be written` : "";
  });
  $("generate").addEventListener("click", async () => {
    const [code, b] = await api("/api/generate", request());
    showError(code === 200 ? null : b);
    if (code !== 200) return;
    $("summary").textContent = "";
    poll(b.job, s => { $("summary").append(s.error ? s.error : summaryTable(s.summary)); },
        $("status"), $("progress"));
  });
  const send = () => ({host: $("host").value, port: $("port").value, called: $("called").value,
                       calling: $("calling").value, output: $("output").value.trim(),
                       url: $("url").value.trim(), token_file: $("token_file").value.trim(),
                       user: $("user").value.trim()});
  $("echo").addEventListener("click", async () => {
    const [code, b] = await api("/api/echo", send());
        $("send-status").textContent = b.message || b.error; });
  $("send").addEventListener("click", async () => {
    const [code, b] = await api("/api/send", send());
    if (code !== 200) { $("send-status").textContent = b.error; return; }
    poll(b.job, s => { $("send-status").textContent = s.error ||
      `sent ${s.summary.successful_transfers}, failed ${s.summary.failed_transfers}`; },
      $("send-status"), $("progress"));
  });
  $("check").addEventListener("click", async () => {
    const [code, b] = await api("/api/check", send());
    $("report").textContent = code !== 200 ? b.error : JSON.stringify(b.report.scenarios, null,
        1) +
      `\\nmismatches: ${b.report.mismatches.length}`;
  });
  renderGroups();
}
init();
</script></body></html>
"""


# ════════════════════════════════════════════════════════════════════════════════════════
# Shell completions: generated from the parser itself, so they cannot drift from --help
# ════════════════════════════════════════════════════════════════════════════════════════


MODE_FLAGS = tuple(m.flag for m in MODES)
DIRECTORY_OPTIONS = ("--path", "--output", "--log-dir", "--backup-dir")


def completion_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options worth completing (everything but -h)."""
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def fish_completions(parser: argparse.ArgumentParser) -> str:
    """A fish script: dicom_sar, ./dicom_sar.py, python dicom_sar.py and
    venv/bin/python dicom_sar.py."""
    def quote(text: str) -> str:
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

    lines = [
        "# fish completions for dicom_sar.py (dicom_sar.py --completions fish)",
        "function __dicom_sar_cmd",
        "    set -l tokens (commandline -opc)",
        "    string match -q -r '(^|/)dicom_sar(\\.py)?$' -- $tokens[1]; and return 0",
        "    string match -q -r 'python' -- $tokens[1]",
        "    and string match -q -r 'dicom_sar\\.py$' -- $tokens[2]",
        "end",
        "function __dicom_sar_no_mode",
        "    __dicom_sar_cmd; or return 1",
        "    set -l tokens (commandline -opc)",
        f"    for mode in {' '.join(MODE_FLAGS)}",
        "        contains -- $mode $tokens; and return 1",
        "    end",
        "    return 0",
        "end",
        "function __dicom_sar_mode",
        "    __dicom_sar_cmd; and not __dicom_sar_no_mode",
        "end",
        "function __dicom_sar_keywords",
        "    printf '%s\\n' " + " ".join(sorted(keyword_tags())),
        "end",
        "for cmd in dicom_sar dicom_sar.py python python3 python3.11 python3.13 python3.13t",
    ]
    for action in completion_options(parser):
        longs = [o[2:] for o in action.option_strings if o.startswith("--")]
        shorts = [o[1:] for o in action.option_strings if len(o) == 2]
        flag = longs[0] if longs else None
        opts = " ".join([*(f"-l {name}" for name in longs), *(f"-s {c}" for c in shorts)])
        condition = "__dicom_sar_no_mode" if f"--{flag}" in MODE_FLAGS else "__dicom_sar_mode"
        args = ""
        if f"--{flag}" in DIRECTORY_OPTIONS:
            args = " -x -a '(__fish_complete_directories)'"
        elif flag == "tag":
            args = " -x -a '(__dicom_sar_keywords)'"
        elif flag == "scenario":
            args = " -x -a " + quote(" ".join(scenario_catalogue()))
        elif action.choices:
            args = " -x -a " + quote(" ".join(map(str, action.choices)))
        elif action.nargs != 0:
            args = " -r"
        help_text = (action.help or "").replace("%%", "%")
        lines.append(f"    complete -c $cmd -n {condition} {opts}{args} -d {quote(help_text)}")
    lines.append("end")
    return "\n".join(lines) + "\n"


def bash_completions(parser: argparse.ArgumentParser) -> str:
    """A small bash script: option names, and directories after path options."""
    words = " ".join(o for a in completion_options(parser) for o in a.option_strings)
    return (f"_dicom_sar() {{\n  local cur=${{COMP_WORDS[COMP_CWORD]}} "
            f"prev=${{COMP_WORDS[COMP_CWORD-1]}}\n"
            f"  case $prev in {'|'.join(DIRECTORY_OPTIONS)}) COMPREPLY=($(compgen -d -- \"$cur\"));"
            f" return;; esac\n"
            f"  COMPREPLY=($(compgen -W \"{words}\" -- \"$cur\"))\n}}\n"
            "complete -o default -F _dicom_sar dicom_sar.py dicom_sar\n")


def zsh_completions(parser: argparse.ArgumentParser) -> str:
    """A small zsh script built on _arguments."""
    specs = []
    for action in completion_options(parser):
        help_text = (action.help or "").replace("[", "(").replace("]", ")").replace("'", "")
        value = ":dir:_files -/" if action.option_strings[0] in DIRECTORY_OPTIONS else (
            ":value:" if action.nargs != 0 else "")
        for option in action.option_strings:
            specs.append(f"  '{option}[{help_text}]{value}'")
    return "#compdef dicom_sar.py dicom_sar\n_arguments \\\n" + " \\\n".join(specs) + "\n"


# ════════════════════════════════════════════════════════════════════════════════════════
# main(): options -> the mode's driver -> exit status
# ════════════════════════════════════════════════════════════════════════════════════════


def print_versions() -> None:
    """What a bug report needs."""
    try:
        import pynetdicom
        netver = pynetdicom.__version__
    except ImportError:
        netver = "not installed"
    import tqdm as tqdm_module
    print(f"dicom_sar {__version__}")
    print(f"Python {sys.version.split()[0]} ({sys.executable}), "
          f"free-threaded: {'yes' if gil_disabled() else 'no'}")
    load_pydicom()
    print(f"pydicom {pydicom.__version__}, pynetdicom {netver}, tqdm {tqdm_module.__version__}")


def warn_if_gil() -> None:
    """One warning when threads cannot run Python code in parallel."""
    if not gil_disabled():
        print("warning: this Python has the GIL enabled, so worker threads will not run in "
              "parallel; for full speed use python3.13t (README, \"Set up and run\": "
              "tools/free-threaded-python finds or builds one)", file=sys.stderr)


def run(opts: Options) -> int:
    """Run one mode over the tree; return the exit status."""
    log_paths = setup_logging(opts)
    if not (opts.mode == "dump" and opts.fast):
        load_pydicom()
    log.info("run started: %s; mode %s; workers %d; %s", PROG + " " + __version__, opts.mode,
             opts.workers, runtime_line())
    stop = StopSignal()
    try:
        code = run_mode(opts, stop.output(sys.stdout), stop, log_paths)
    finally:
        stop.restore()
    log.info("run finished: free-threaded: %s", "yes" if gil_disabled() else "no")
    return code


Runner = Callable[[Options, Callable[[str], None], StopSignal, list[Path]], int]
RUNNERS: dict[str, Runner] = {  # each mode of the table that runs: its driver
    "dump": run_dump,
    "sar": run_sar,
    "deid": run_deid,
    "deid_audit": run_audit,
    "generate": lambda opts, out, stop, _: run_generate(opts, out, stop),
    "send": lambda opts, out, stop, _: run_send(opts, out, stop),
    "echo": lambda opts, out, stop, _: run_send(opts, out, stop),
    "check_ingest": lambda opts, out, _stop, _: run_check(opts, out),
    "ingest_test": lambda opts, out, stop, _: run_ingest_test(opts, out, stop),
    "ui": lambda opts, _out, stop, _: run_ui(opts, stop),
    "merge_summaries": lambda opts, out, _stop, _: run_merge(opts, out),
}


def run_mode(opts: Options, out: Callable[[str], None], stop: StopSignal,
             log_paths: list[Path]) -> int:
    """The chosen mode's driver."""
    return RUNNERS[opts.mode](opts, out, stop, log_paths)


def main(argv: list[str] | None = None, prog: str = "dicom_sar.py") -> int:
    """Entry point: parse, validate, run; usage errors exit 2 before any file is touched,
    and a bug of ours is one line and exit 70, never a traceback."""
    threading.excepthook = thread_died
    parser = build_parser(prog)
    try:
        return command_line(parser, parser.parse_args(argv))
    except UsageError as exc:
        print(f"{parser.prog}: {paint('error:', RED)} {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except BrokenPipeError:  # stderr's reader is gone too (fish: `&| head`): nobody to tell
        return 128 + signal.SIGPIPE
    except Exception as exc:  # the last boundary
        return internal_error(exc)


def command_line(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    """What the parsed command line asks for: an answer of its own, or a run."""
    if not ns.dump:  # a dump decides in run(): its raw tag dump runs without pydicom
        load_pydicom()
    with contextlib.suppress(AttributeError, ValueError):  # a file name, a value not UTF-8:
        sys.stdout.reconfigure(errors="surrogateescape")  # its own bytes, as ls prints them
    if ns.version:
        print_versions()
        return EXIT_OK
    if ns.completions:
        make = {"fish": fish_completions, "bash": bash_completions, "zsh": zsh_completions}
        sys.stdout.write(make[ns.completions](parser))
        return EXIT_OK
    if ns.list_scenarios:
        for name, what in scenario_catalogue().items():
            print(f"{name:<32} {what}")
        return EXIT_OK
    opts = options_from_args(ns, parser)
    if not opts.quiet:
        warn_if_gil()
    return run(opts)


def internal_error(exc: BaseException, where: str = "") -> int:
    """Say in one line that dicom_sar itself failed; the traceback goes to dicom_sar.log."""
    log.error("internal error%s: %s: %s", where, type(exc).__name__, exc,
              exc_info=(type(exc), exc, exc.__traceback__))
    with contextlib.suppress(OSError, ValueError):
        print(f"{PROG}: {paint('internal error', RED)}{where}: {type(exc).__name__}: "
              f"{one_line(str(exc))} (a bug in {PROG}, not in your files or your peer; the "
              f"traceback is in {LOG_NAME} for a bug report)", file=sys.stderr)
    return EXIT_INTERNAL


def thread_died(args: threading.ExceptHookArgs) -> None:
    """threading's hook: a thread that dies of a bug says so in one line, as main does."""
    if args.exc_value is not None and not isinstance(args.exc_value, SystemExit):
        internal_error(args.exc_value, f" in thread {args.thread.name if args.thread else '?'}")


def leave(code: int) -> NoReturn:
    """Flush the logs and the standard streams, then exit without the interpreter's
    teardown: every file this run wrote is closed by now, and every pool shut down.

    Why: the teardown frees pydicom's ~100k dictionary objects one by one (a tenth of a tag
    dump's start-up), and a worker abandoned at the time limit can never be joined.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader gone, a stream closed
            stream.flush()
    os._exit(code)


def cli() -> NoReturn:
    """The installed `dicom_sar` command (pyproject's console script)."""
    leave(main(prog="dicom_sar"))


if __name__ == "__main__":
    leave(main())
