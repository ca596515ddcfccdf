"""Packing a code corpus: torchtune 0.6.1's packed text-completion dataset vs ours.

Both pipelines read the same JSON-lines file (one document per Python module) with the same
SmolLM2 tokenizer and pack it into ``--max-seq-len`` sequences:

* torchtune: ``text_completion_dataset(source="json", data_files=..., packed=True)``, i.e.
  ``TextCompletionDataset`` (which truncates every document to ``max_seq_len - 1`` tokens)
  wrapped in ``PackedDataset(split_across_pack=True)``;
* ours: ``tokenize_texts`` (batched encoding) then ``pack_documents`` (no token dropped);
* ours, streaming: ``stream_tokenize`` (tokens appended to an on-disk store, read back through
  ``np.memmap``) then ``StreamingPackedSequences`` (packs computed on demand from the
  offsets); every pack is then read once as a sample, so the lazy packing is really paid for:
  its wall time is tokenization + pack planning + reading every pack, as torchtune's includes
  building every pack and the count of its kept tokens reads each one.

Each pipeline runs in a fresh process, so its wall time and peak-RSS growth are its own; the
ratios printed at the end compare pipelines measured in the same run.

Run::

    .venv/bin/python benchmarks/packing_vs_torchtune.py                 # stdlib sources
    .venv/bin/python benchmarks/packing_vs_torchtune.py --source corpus # built default corpus
    .venv/bin/python benchmarks/packing_vs_torchtune.py --max-seq-len 4096 --limit-docs 200
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("ACADLM_NO_PROGRESS", "1")

CROSS_ENTROPY_IGNORE_INDEX = -100
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "lib2to3",
                 "tkinter", "turtledemo", "ensurepip"}


def stdlib_documents(limit: int | None) -> list[dict]:
    """One ``{"text", "id"}`` document per .py module of the standard library, tests skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS
                         and not d.startswith("test") and d != "tests")
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith("test_"):
                path = Path(folder) / name
                text = path.read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    docs.append({"text": text, "id": str(path.relative_to(root))})
    return docs if limit is None else docs[:limit]


def corpus_documents(limit: int | None) -> list[dict]:
    """The ``code`` domain of the default corpus built by ``acadlm-defaults build``."""
    from acadlm_plugins.defaults.paths import default_corpus_dir

    path = default_corpus_dir() / "code" / "train.jsonl"
    if not path.is_file():
        sys.exit(f"{path}: not found. Run `acadlm-defaults build`, or use `--source stdlib`.")
    with open(path) as handle:
        docs = [json.loads(line) for line in handle if line.strip()]
    return docs if limit is None else docs[:limit]


def load_tokenizer(max_seq_len: int):
    """The SmolLM2 tokenizer of the embedded default model, or exit with the fix."""
    from acadlm_plugins.errors import DataError
    from acadlm_plugins.models.tokenizer import smollm2_tokenizer

    try:
        return smollm2_tokenizer(max_seq_len=max_seq_len)
    except (DataError, OSError) as error:  # a missing default model says how to build it
        sys.exit(f"The SmolLM2 tokenizer is not available ({error}).\n"
                 "Build the embedded default first: `acadlm-defaults build`.")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:  # Linux: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _torchtune_pipeline(jsonl: str, tokenizer, max_seq_len: int) -> dict:
    from torchtune.datasets import text_completion_dataset

    # A fresh Arrow cache, so a second run does not read the first one's.
    cache_dir = tempfile.mkdtemp(dir=Path(jsonl).parent, prefix="hf_cache_")
    packed = text_completion_dataset(tokenizer, source="json", data_files=jsonl, split="train",
                                     packed=True, cache_dir=cache_dir)
    tokens_kept = sum(int((pack["labels"] != CROSS_ENTROPY_IGNORE_INDEX).sum())
                      for pack in packed)
    return {"packs": len(packed), "tokens_kept": tokens_kept,
            "positions": len(packed) * max_seq_len}


def _ours_pipeline(jsonl: str, tokenizer, max_seq_len: int) -> dict:
    from acadlm_plugins.data.documents import iter_texts
    from acadlm_plugins.data.packing import pack_documents
    from acadlm_plugins.data.tokenization import tokenize_texts

    started = time.perf_counter()
    docs = tokenize_texts(iter_texts([Path(jsonl)], text_field="text"), tokenizer)
    tokenized = time.perf_counter()
    packed = pack_documents(docs, max_seq_len, tokenizer.pad_id, mode="split")
    lengths = docs.offsets[1:] - docs.offsets[:-1]
    return {"packs": packed.stats.packs, "tokens_kept": packed.stats.tokens_out,
            "positions": packed.stats.packs * max_seq_len, "tokens_in": docs.num_tokens,
            "tokenize_s": tokenized - started, "pack_s": time.perf_counter() - tokenized,
            # what torchtune's truncation to max_seq_len - 1 throws away
            "truncated_docs": int((lengths > max_seq_len - 1).sum()),
            "truncated_tokens": int((lengths - (max_seq_len - 1)).clip(min=0).sum())}


def _streaming_pipeline(jsonl: str, tokenizer, max_seq_len: int) -> dict:
    from acadlm_plugins.data.streaming import StreamingPackedSequences, stream_tokenize

    # A fresh token store, so the tokenization is measured, not a cache hit.
    cache_dir = tempfile.mkdtemp(dir=Path(jsonl).parent, prefix="token_store_")
    started = time.perf_counter()
    docs = stream_tokenize([Path(jsonl)], tokenizer, text_field="text", cache_dir=cache_dir)
    tokenized = time.perf_counter()
    packed = StreamingPackedSequences(docs, max_seq_len, tokenizer.pad_id, mode="split")
    planned = time.perf_counter()
    for index in range(len(packed)):
        packed.sample(index)
    return {"packs": packed.stats.packs, "tokens_kept": packed.stats.tokens_out,
            "positions": packed.stats.packs * max_seq_len, "tokens_in": docs.num_tokens,
            "tokenize_s": tokenized - started, "pack_s": planned - tokenized,
            "read_s": time.perf_counter() - planned}


def _measure(pipeline: str, jsonl: str, max_seq_len: int, queue) -> None:
    """Child process: import and load the tokenizer first, then time the pipeline and its
    peak-RSS growth (neither import nor tokenizer loading counts for either side)."""
    run = {"torchtune": _torchtune_pipeline, "ours": _ours_pipeline,
           "streaming": _streaming_pipeline}[pipeline]
    import torchtune.datasets  # noqa: F401  (import cost is not part of any pipeline)

    import acadlm_plugins.data.streaming
    import acadlm_plugins.data.tokenization  # noqa: F401

    tokenizer = load_tokenizer(max_seq_len)
    exact_peak = _reset_peak_rss()
    baseline = _rss_kib("VmRSS")
    started = time.perf_counter()
    result = run(jsonl, tokenizer, max_seq_len)
    result["wall_s"] = time.perf_counter() - started
    result["peak_rss_delta_mib"] = (_rss_kib("VmHWM") - baseline) / 1024
    result["exact_peak"] = exact_peak
    queue.put(result)


def measure_in_fresh_process(pipeline: str, jsonl: Path, max_seq_len: int) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_measure, args=(pipeline, str(jsonl), max_seq_len, queue))
    child.start()
    result = queue.get()
    child.join()
    if child.exitcode:
        sys.exit(f"the {pipeline} pipeline failed (exit code {child.exitcode}).")
    return result


def format_report(tt: dict, ours: dict, streaming: dict, *, documents: int, max_seq_len: int,
                  source: str) -> str:
    tokens_in = ours["tokens_in"]
    # The streaming pipeline builds its packs lazily, so reading every pack is part of its
    # work: tokenize + plan + read, as torchtune's wall time builds and reads every pack.
    stream_s = streaming["tokenize_s"] + streaming["pack_s"] + streaming["read_s"]
    columns = (tt, ours, streaming)
    rows = [("tokens in", *(f"{tokens_in:,}",) * 2, f"{streaming['tokens_in']:,}"),
            ("tokens kept", *(f"{c['tokens_kept']:,}" for c in columns)),
            ("tokens dropped", *(f"{tokens_in - c['tokens_kept']:,}" for c in columns)),
            ("packs", *(f"{c['packs']:,}" for c in columns)),
            ("efficiency (kept / positions)",
             *(f"{c['tokens_kept'] / c['positions']:.2%}" for c in columns)),
            ("wall time, every pack built (s)", f"{tt['wall_s']:.2f}", f"{ours['wall_s']:.2f}",
             f"{stream_s:.2f}"),
            ("  of which tokenize / pack (s)", "(interleaved)",
             f"{ours['tokenize_s']:.2f} / {ours['pack_s']:.2f}",
             f"{streaming['tokenize_s']:.2f} / {streaming['pack_s']:.2f}"),
            ("  of which read every pack (s)", "(interleaved)", "(in pack)",
             f"{streaming['read_s']:.2f}"),
            ("tokens in per second", f"{tokens_in / tt['wall_s']:,.0f}",
             f"{tokens_in / ours['wall_s']:,.0f}", f"{streaming['tokens_in'] / stream_s:,.0f}"),
            ("tokens kept per second", f"{tt['tokens_kept'] / tt['wall_s']:,.0f}",
             f"{ours['tokens_kept'] / ours['wall_s']:,.0f}",
             f"{streaming['tokens_kept'] / stream_s:,.0f}"),
            ("peak RSS growth (MiB)", *(f"{c['peak_rss_delta_mib']:.0f}" for c in columns))]
    width = max(len(r[0]) for r in rows) + 2
    header = f"{'torchtune 0.6.1':>18}{'acadlm_plugins':>18}{'acadlm streaming':>18}"
    lines = [(f"{documents} documents from {source}, max_seq_len={max_seq_len}, "
              "SmolLM2 tokenizer"), "", f"{'':<{width}}{header}"]
    lines += [f"{name:<{width}}{a:>18}{b:>18}{c:>18}" for name, a, b, c in rows]
    tt_rate = tt["tokens_kept"] / tt["wall_s"]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.3f}x" if b else "n/a"

    ratios = [("tokens kept", ours["tokens_kept"], streaming["tokens_kept"], tt["tokens_kept"]),
              ("wall time, every pack built", ours["wall_s"], stream_s, tt["wall_s"]),
              ("tokens kept per second", ours["tokens_kept"] / ours["wall_s"],
               streaming["tokens_kept"] / stream_s, tt_rate),
              ("peak RSS growth", ours["peak_rss_delta_mib"], streaming["peak_rss_delta_mib"],
               tt["peak_rss_delta_mib"])]
    lines += ["", f"{'ratio to torchtune (this run)':<{width}}{header}"]
    lines += [f"{name:<{width}}{'1.000x':>18}{ratio(a, base):>18}{ratio(b, base):>18}"
              for name, a, b, base in ratios]
    lines += ["",
              (f"torchtune truncates {ours['truncated_docs']} documents longer than "
               f"max_seq_len - 1 = {max_seq_len - 1} tokens, dropping "
               f"{ours['truncated_tokens']:,} tokens "
               f"({ours['truncated_tokens'] / tokens_in:.1%} of the corpus).")]
    if tokens_in - tt["tokens_kept"] != ours["truncated_tokens"]:
        lines.append("note: torchtune's dropped tokens differ from the truncation estimate; "
                     "the two pipelines did not tokenize identically.")
    if streaming["tokens_in"] != tokens_in or streaming["packs"] != ours["packs"]:
        lines.append("note: the streaming pipeline tokenized or packed differently from ours.")
    if not all(c["exact_peak"] for c in columns):
        lines.append("note: /proc/self/clear_refs is not writable; peak RSS includes imports.")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    """An argparse type for a count that must be at least 1: ``--limit-docs 0`` used to run
    the whole corpus (0 read as "no limit"), the opposite of what it says."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be at least 1, got {value} (leave the flag out to use every document)")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-seq-len", type=int, default=2048, help="pack length in tokens")
    parser.add_argument("--limit-docs", type=positive_int, default=None,
                        help="use only the first N >= 1 documents (default: all)")
    parser.add_argument("--source", choices=("stdlib", "corpus"), default="stdlib",
                        help="stdlib: one document per standard-library module; corpus: the "
                             "code domain of the default corpus (acadlm-defaults build)")
    args = parser.parse_args(argv)

    load_tokenizer(args.max_seq_len)  # fail fast, with the fix, before any work
    docs = (stdlib_documents if args.source == "stdlib" else corpus_documents)(args.limit_docs)
    source = (sysconfig.get_paths()["stdlib"] if args.source == "stdlib"
              else "the default corpus (code/train.jsonl)")
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "documents.jsonl"
        with open(jsonl, "w") as handle:
            handle.writelines(json.dumps({"text": d["text"], "id": d.get("id", "")}) + "\n"
                              for d in docs)
        print(f"packing {len(docs)} documents ({jsonl.stat().st_size / 2**20:.1f} MiB) with "
              f"each pipeline in a fresh process...", flush=True)
        tt = measure_in_fresh_process("torchtune", jsonl, args.max_seq_len)
        ours = measure_in_fresh_process("ours", jsonl, args.max_seq_len)
        streaming = measure_in_fresh_process("streaming", jsonl, args.max_seq_len)
    print(format_report(tt, ours, streaming, documents=len(docs), max_seq_len=args.max_seq_len,
                        source=source))


if __name__ == "__main__":
    main()
