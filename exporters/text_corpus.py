"""Build a real English text set from standard-library docstrings and write it as tokenized calibration data.

The texts are the module, class and function docstrings of a fixed, sorted list of Python
standard-library modules, cut into passages of one or a few sentences. Nothing is
downloaded, and the same Python version gives the same passages on every machine.

Order and split are both derived from the SHA-256 of each passage, so they do not depend on
import order or dictionary order: a passage goes to the held-out set when its hash is odd
and to the calibration set when it is even, which makes the two sets disjoint by
construction (a passage has one hash, and duplicates are removed first). Within a set,
passages are taken in hash order, which mixes modules instead of taking all of ``abc`` first.

Output format (project-wide): a folder of ``.npz`` files, ``NNNN.npz`` in order, each holding
``input_ids``, ``attention_mask`` and ``token_type_ids`` as int64 arrays of shape
(samples_per_file, seq_len).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import warnings
from pathlib import Path

import numpy as np

#: Modules whose docstrings make the corpus: sorted, importable without side effects
#: (no ``this``/``antigravity``, nothing that opens a window or a network connection).
STDLIB_MODULES = tuple(sorted((
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "doctest", "email.message", "enum", "filecmp", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html.parser", "http.client", "http.cookiejar", "imaplib", "inspect",
    "io", "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mailbox",
    "mimetypes", "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "pydoc", "queue",
    "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal",
    "smtplib", "socket", "socketserver", "sqlite3", "statistics", "string", "struct",
    "subprocess", "symtable", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "trace", "traceback", "typing", "unittest.case", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile", "zoneinfo",
)))

MIN_CHARS = 60      # shorter passages are mostly "Return self." and signatures, not prose
MAX_CHARS = 480     # about 100 word pieces: most passages fit in 128 tokens untruncated
MIN_WORDS = 8
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |[-=~*]{3,}|:param|:return|:raises)")


def _docstrings(module) -> list[str]:
    """The module's own docstrings: module, then its classes and functions and their methods.

    Members are visited in sorted name order and only if defined in this module, so a
    re-exported function is read once, where it is defined.
    """
    docs = [module.__doc__]
    for _, obj in sorted(vars(module).items()):
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        docs.append(obj.__doc__)
        if inspect.isclass(obj):
            docs += [m.__doc__ for _, m in sorted(vars(obj).items()) if inspect.isfunction(m)]
    return [d for d in docs if isinstance(d, str) and d.strip()]


def _is_prose(paragraph: str) -> bool:
    """True for running text; false for doctests, tables, signatures and option lists."""
    lines = paragraph.splitlines()
    if any(_CODE_LINE.match(line) for line in lines):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return letters >= 0.85 * len(paragraph)


def _passages(docstring: str) -> list[str]:
    """Cut a docstring into passages: prose paragraphs, long ones packed sentence by sentence."""
    out = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(docstring)):
        if not _is_prose(paragraph):
            continue
        chunk = ""
        for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
            if chunk and len(chunk) + 1 + len(sentence) > MAX_CHARS:
                out.append(chunk)
                chunk = ""
            chunk = f"{chunk} {sentence}".strip()
        out.append(chunk)
    return [p for p in out if MIN_CHARS <= len(p) <= MAX_CHARS and len(p.split()) >= MIN_WORDS]


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def build_corpus(modules: tuple[str, ...] = STDLIB_MODULES) -> list[str]:
    """All distinct passages of the modules' docstrings, in SHA-256 order."""
    passages = set()
    # Reading typing's deprecated typing.io/typing.re members warns; the text is unaffected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in modules:
            for docstring in _docstrings(importlib.import_module(name)):
                passages.update(_passages(docstring))
    return sorted(passages, key=lambda text: (_text_hash(text), text))


def split_corpus(passages: list[str]) -> tuple[list[str], list[str]]:
    """(calibration, held_out): even hash -> calibration, odd hash -> held-out; order kept."""
    calibration = [p for p in passages if _text_hash(p) % 2 == 0]
    held_out = [p for p in passages if _text_hash(p) % 2 == 1]
    return calibration, held_out


def load_tokenizer(tokenizer_json: str | Path, seq_len: int):
    """The model's own fast tokenizer, padding and truncating to exactly ``seq_len`` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.enable_truncation(max_length=seq_len)
    tokenizer.enable_padding(length=seq_len, pad_id=0, pad_type_id=0, pad_token="[PAD]")
    return tokenizer


def tokenize(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    """BERT inputs for ``texts`` as int64 arrays of shape (len(texts), seq_len)."""
    encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def write_npz_folder(folder: Path, tokenizer, texts: list[str], samples_per_file: int = 8) -> list[Path]:
    """Tokenize ``texts`` and write them as ``0000.npz``, ``0001.npz``, ... into ``folder``.

    Old ``.npz`` files in the folder are removed first, so a smaller rerun leaves no stale
    files behind for a reader that takes every file in the folder.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.npz"):
        stale.unlink()
    paths = []
    for index, start in enumerate(range(0, len(texts), samples_per_file)):
        path = folder / f"{index:04d}.npz"
        np.savez(path, **tokenize(tokenizer, texts[start:start + samples_per_file]))
        paths.append(path)
    return paths


def write_text_datasets(out_dir: str | Path, tokenizer_json: str | Path, seq_len: int,
                        calib_samples: int, heldout_samples: int,
                        samples_per_file: int = 8) -> dict[str, Path]:
    """Write ``calib/`` and ``heldout/`` npz folders and ``texts.json`` (the raw passages).

    Raises ValueError when the corpus has fewer passages than asked for, rather than
    silently writing fewer samples.
    """
    out_dir = Path(out_dir)
    calibration, held_out = split_corpus(build_corpus())
    if calib_samples > len(calibration) or heldout_samples > len(held_out):
        raise ValueError(
            f"asked for {calib_samples} calibration / {heldout_samples} held-out passages, "
            f"the corpus has {len(calibration)} / {len(held_out)}")
    texts = {"calib": calibration[:calib_samples], "heldout": held_out[:heldout_samples]}
    tokenizer = load_tokenizer(tokenizer_json, seq_len)
    for split, split_texts in texts.items():
        write_npz_folder(out_dir / split, tokenizer, split_texts, samples_per_file)
    texts_path = out_dir / "texts.json"
    texts_path.write_text(json.dumps(texts, indent=1, ensure_ascii=False) + "\n")
    return {"calib": out_dir / "calib", "heldout": out_dir / "heldout", "texts": texts_path}
