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

Each pipeline runs in a fresh process, so its wall time and peak-RSS growth are its own. The
three run ``--repeats`` times (default 3), the order rotating every repeat so that drift on a
shared machine hits all alike; the table shows each pipeline's median, the ratios are the
medians of the per-repeat ratios (pipelines measured side by side in one repeat), and the
per-repeat wall times are printed below. The token accounting must hold in every repeat
(ours and streaming keep every token and make the same packs; torchtune drops exactly what
its truncation to ``max_seq_len - 1`` drops; every repeat counts the same), otherwise the
script exits with status 1 after the table.

Run::

    .venv/bin/python benchmarks/packing_vs_torchtune.py                 # stdlib sources
    .venv/bin/python benchmarks/packing_vs_torchtune.py --source corpus # built default corpus
    .venv/bin/python benchmarks/packing_vs_torchtune.py --max-seq-len 4096 --limit-docs 200
    .venv/bin/python benchmarks/packing_vs_torchtune.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from acadlm_plugins.cli_types import int_at_least

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


PIPELINES = ("torchtune", "ours", "streaming")
_COUNTS = ("packs", "tokens_kept", "positions")


def streaming_seconds(streaming: dict) -> float:
    """The streaming pipeline builds its packs lazily, so reading every pack is part of its
    work: tokenize + plan + read, as torchtune's wall time builds and reads every pack."""
    return streaming["tokenize_s"] + streaming["pack_s"] + streaming["read_s"]


def seconds_of(pipeline: str, result: dict) -> float:
    return streaming_seconds(result) if pipeline == "streaming" else result["wall_s"]


def accounting_problems(runs: list[dict[str, dict]], max_seq_len: int) -> list[str]:
    """What is wrong with the token accounting of ``runs`` (one ``{pipeline: result}`` per
    repeat); an empty list when it holds."""
    problems = []
    first = runs[0]
    for index, run in enumerate(runs, 1):
        tt, ours, streaming = (run[p] for p in PIPELINES)
        tokens_in = ours["tokens_in"]
        if ours["tokens_kept"] != tokens_in:
            problems.append(f"repeat {index}: ours kept {ours['tokens_kept']:,} of "
                            f"{tokens_in:,} tokens")
        if streaming["tokens_in"] != tokens_in or any(streaming[k] != ours[k] for k in _COUNTS):
            problems.append(f"repeat {index}: the streaming pipeline tokenized or packed "
                            "differently from ours")
        if tokens_in - tt["tokens_kept"] != ours["truncated_tokens"]:
            problems.append(f"repeat {index}: torchtune dropped {tokens_in - tt['tokens_kept']:,} "
                            f"tokens, its truncation to {max_seq_len - 1} explains "
                            f"{ours['truncated_tokens']:,}: the pipelines did not tokenize "
                            "identically")
        for pipeline in PIPELINES:
            if any(run[pipeline][k] != first[pipeline][k] for k in _COUNTS):
                problems.append(f"repeat {index}: {pipeline} counted differently from repeat 1")
    return problems


def format_report(runs: list[dict[str, dict]], *, documents: int, max_seq_len: int,
                  source: str) -> str:
    """The table of medians over ``runs`` (one ``{pipeline: result}`` per repeat), the
    medians of the per-repeat ratios to torchtune, and the per-repeat wall times."""
    def median(pipeline: str, key) -> float:
        return statistics.median(key(run[pipeline]) for run in runs)

    def wall(pipeline: str) -> float:
        return median(pipeline, lambda r: seconds_of(pipeline, r))

    tt, ours, streaming = (runs[0][p] for p in PIPELINES)  # counts: the same in every repeat
    tokens_in = ours["tokens_in"]
    columns = (tt, ours, streaming)
    rss = {p: median(p, lambda r: r["peak_rss_delta_mib"]) for p in PIPELINES}
    rows = [("tokens in", *(f"{tokens_in:,}",) * 2, f"{streaming['tokens_in']:,}"),
            ("tokens kept", *(f"{c['tokens_kept']:,}" for c in columns)),
            ("tokens dropped", *(f"{tokens_in - c['tokens_kept']:,}" for c in columns)),
            ("packs", *(f"{c['packs']:,}" for c in columns)),
            ("efficiency (kept / positions)",
             *(f"{c['tokens_kept'] / c['positions']:.2%}" for c in columns)),
            ("wall time, every pack built (s)", *(f"{wall(p):.2f}" for p in PIPELINES)),
            ("  of which tokenize / pack (s)", "(interleaved)",
             *(f"{median(p, lambda r: r['tokenize_s']):.2f} / "
               f"{median(p, lambda r: r['pack_s']):.2f}" for p in ("ours", "streaming"))),
            ("  of which read every pack (s)", "(interleaved)", "(in pack)",
             f"{median('streaming', lambda r: r['read_s']):.2f}"),
            ("tokens in per second", *(f"{tokens_in / wall(p):,.0f}" for p in PIPELINES)),
            ("tokens kept per second",
             *(f"{c['tokens_kept'] / wall(p):,.0f}" for c, p in zip(columns, PIPELINES))),
            ("peak RSS growth (MiB)", *(f"{rss[p]:.0f}" for p in PIPELINES))]
    width = max(len(r[0]) for r in rows) + 2
    header = f"{'torchtune 0.6.1':>18}{'acadlm_plugins':>18}{'acadlm streaming':>18}"
    lines = [(f"{documents} documents from {source}, max_seq_len={max_seq_len}, "
              f"SmolLM2 tokenizer; median of {len(runs)} repeat(s), order rotated"), "",
             f"{'':<{width}}{header}"]
    lines += [f"{name:<{width}}{a:>18}{b:>18}{c:>18}" for name, a, b, c in rows]

    def ratios(value) -> list[str]:
        """Median over the repeats of value(pipeline, run) / value('torchtune', run)."""
        cells = []
        for pipeline in PIPELINES:
            per_run = [value(pipeline, run) / value("torchtune", run) for run in runs
                       if value("torchtune", run)]
            cells.append(f"{statistics.median(per_run):.3f}x" if per_run else "n/a")
        return cells

    table = [("tokens kept", ratios(lambda p, run: run[p]["tokens_kept"])),
             ("wall time, every pack built", ratios(lambda p, run: seconds_of(p, run[p]))),
             ("tokens kept per second",
              ratios(lambda p, run: run[p]["tokens_kept"] / seconds_of(p, run[p]))),
             ("peak RSS growth", ratios(lambda p, run: run[p]["peak_rss_delta_mib"]))]
    lines += ["", f"{'ratio to torchtune (median)':<{width}}{header}"]
    lines += [f"{name:<{width}}{a:>18}{b:>18}{c:>18}" for name, (a, b, c) in table]
    lines += ["", "per repeat, wall s torchtune / ours / streaming (ours / torchtune): "
              + "; ".join(f"{run['torchtune']['wall_s']:.2f} / {run['ours']['wall_s']:.2f} / "
                          f"{streaming_seconds(run['streaming']):.2f} "
                          f"({run['ours']['wall_s'] / run['torchtune']['wall_s']:.3f}x)"
                          for run in runs)]
    lines += ["",
              (f"torchtune truncates {ours['truncated_docs']} documents longer than "
               f"max_seq_len - 1 = {max_seq_len - 1} tokens, dropping "
               f"{ours['truncated_tokens']:,} tokens "
               f"({ours['truncated_tokens'] / tokens_in:.1%} of the corpus).")]
    if not all(run[p]["exact_peak"] for run in runs for p in PIPELINES):
        lines.append("note: /proc/self/clear_refs is not writable; peak RSS includes imports.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-seq-len", type=int, default=2048, help="pack length in tokens")
    parser.add_argument("--limit-docs", type=int_at_least(1), default=None,
                        help="use only the first N >= 1 documents (default: all)")
    parser.add_argument("--source", choices=("stdlib", "corpus"), default="stdlib",
                        help="stdlib: one document per standard-library module; corpus: the "
                             "code domain of the default corpus (acadlm-defaults build)")
    parser.add_argument("--repeats", type=int_at_least(1), default=3,
                        help="runs of each pipeline, order rotated; medians reported "
                             "(default 3)")
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
              f"each pipeline in a fresh process, {args.repeats} repeat(s)...", flush=True)
        runs = []
        for repeat in range(args.repeats):
            shift = repeat % len(PIPELINES)
            run = {}
            for pipeline in PIPELINES[shift:] + PIPELINES[:shift]:
                run[pipeline] = measure_in_fresh_process(pipeline, jsonl, args.max_seq_len)
            runs.append(run)
    print(format_report(runs, documents=len(docs), max_seq_len=args.max_seq_len,
                        source=source))
    problems = accounting_problems(runs, args.max_seq_len)
    if problems:
        print("\nMISMATCH in the token accounting:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
