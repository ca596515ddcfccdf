"""QuRating selection at scale: our streaming selection against "load the columns, argsort".

Writes ``--num-docs`` synthetic annotated documents (default 10^7) as ``--shards`` parquet shards
in a temporary folder: the columns the annotation writes (a short synthetic ``text``, ``domain``,
``source``, ``id``, ``num_tokens`` and four float32 ``score_<criterion>`` columns). Then, each in
its own fresh Python process so that one's memory cannot inflate the other's peak, it runs:

* **numpy baseline**: read the two columns it uses (``num_tokens`` and the criterion's score)
  of every shard into memory (``pq.read_table(..., columns=...)``), z-score the criterion, add
  ``numpy.random.Generator.gumbel`` noise, ``argsort`` the keys, ``cumsum`` the tokens in key
  order up to the budget. Like ours, it never decodes a text.
* **ours, selection**: passes 1 and 2 of ``acadlm_plugins.qurating.selection`` (streaming
  moments, then streaming keys with the running threshold) as ``select()`` runs them: the same
  answer, which rows. Its noise is keyed by document id (``noise_key: id``, the default), so it
  reads and hashes every id and checks that they are unique (``scan_corpus(...,
  unique_ids=True)``, as ``select()`` calls it), which the baseline never does.
* **ours, row noise**: the same with ``noise_key: row`` (noise from the row number): like the
  baseline, it reads no ids, so this is the like-for-like comparison of the sampling itself.
* **ours, end to end** (unless ``--skip-write``): ``select()``, which also reads the selected
  rows' texts and writes ``<domain>/train.jsonl``, ``selection.json`` and ``selection.png``.

Each child reports its wall time, its peak RSS (``ru_maxrss``) and its RSS after imports; the
script prints documents per second and peak RSS for each, the ratios, and the mean z-score of
the selected documents for each method (the two samplers should agree on it).

Run::

    .venv/bin/python benchmarks/selection_throughput.py                     # 10^7 documents
    .venv/bin/python benchmarks/selection_throughput.py --num-docs 1000000 --shards 4
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CRITERION = "educational_value"
DOMAINS = ("web", "code", "books", "papers", "wiki", "forums", "news", "docs")


def _rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_corpus(folder: Path, num_docs: int, shards: int, seed: int) -> dict:
    """Synthetic annotation shards; texts are 30-70 characters, built with pyarrow compute."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from acadlm_plugins.qurating import CRITERIA

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, num_docs, shards + 1).astype(np.int64)
    total_tokens = 0
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"
    fillers = pa.array([words[:length] for length in range(20, 60)])
    for shard in range(shards):
        start, end = int(bounds[shard]), int(bounds[shard + 1])
        n = end - start
        domain_index = rng.integers(0, len(DOMAINS), n)
        domain = pa.array(DOMAINS).take(pa.array(domain_index))
        number = pc.cast(pa.array(np.arange(start, end)), pa.string())
        body = fillers.take(pa.array(rng.integers(0, len(fillers), n)))
        text = pc.binary_join_element_wise("doc ", number, ": ", body, "")
        tokens = rng.integers(50, 2000, n).astype(np.int32)
        total_tokens += int(tokens.sum())
        columns = {"text": text, "domain": domain, "source": pa.repeat(pa.scalar("synthetic"), n),
                   "id": pc.binary_join_element_wise("doc-", number, ""),
                   "num_tokens": pa.array(tokens)}
        shift = np.asarray([0.4 * (d % 3) for d in range(len(DOMAINS))])[domain_index]
        for name in CRITERIA:
            columns[f"score_{name}"] = pa.array(
                (rng.normal(size=n) + shift).astype(np.float32))
        pq.write_table(pa.table(columns), folder / f"scores-0-{shard:05d}.parquet",
                       row_group_size=1 << 17)
    return {"documents": num_docs, "tokens": total_tokens}


# --------------------------------------------------------------------------------------------
# The measured methods; each runs in a child process (``--run METHOD``).


def run_baseline(folder: Path, budget: int, tau: float, seed: int) -> dict:
    """Load the two columns it uses from all shards, Gumbel noise, argsort, cumsum to the
    budget."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = sorted(folder.glob("scores-*.parquet"))
    columns = ["num_tokens", f"score_{CRITERION}"]
    table = pa.concat_tables([pq.read_table(p, columns=columns) for p in paths])
    tokens = table.column("num_tokens").to_numpy().astype(np.int64)
    score = table.column(f"score_{CRITERION}").to_numpy().astype(np.float64)
    z = (score - score.mean()) / score.std()
    keys = z / tau + np.random.default_rng(seed).gumbel(size=len(z))
    order = np.argsort(-keys)
    last = int(np.searchsorted(np.cumsum(tokens[order]), budget))
    selected = order[: last + 1]
    return {"selected_documents": int(selected.size),
            "selected_tokens": int(tokens[selected].sum()),
            "mean_z_selected": float(z[selected].mean()), "rows_in_memory": table.num_rows,
            "table_mib": table.nbytes / 2**20}


def run_ours(folder: Path, budget: int, tau: float, seed: int, batch_size: int,
             noise_key: str = "id") -> dict:
    """Passes 1 and 2 of the streaming selection: the selected rows, no texts read."""
    from acadlm_plugins.qurating.selection import (
        ScoreShards,
        SelectionConfig,
        check_sampling,
        plan_selections,
        scan_corpus,
    )

    started = time.perf_counter()
    shards = ScoreShards.discover(folder)
    config = SelectionConfig(scores_dir=str(folder), output_dir="", criteria={CRITERION: 1.0},
                             tau=tau, seed=seed, batch_size=batch_size, noise_key=noise_key)
    sampling = check_sampling(config, shards.score_criteria())
    shards.require([CRITERION], need_id=noise_key == "id")
    # As select() calls it: with id noise, pass 1 also reads and hashes the ids (for the
    # uniqueness check and, since 2026-12-06, for pass 2's noise).
    stats = scan_corpus(shards, [CRITERION], [CRITERION], batch_size=batch_size,
                        unique_ids=noise_key == "id")
    plan = plan_selections(shards, stats, [sampling], budget, batch_size=batch_size)[0][0]
    seconds = time.perf_counter() - started
    moments = stats.moments[CRITERION]
    # The mean z of the selection, for the comparison; not timed.
    import pyarrow.parquet as pq

    z_sum, start = 0.0, 0
    for shard in shards.shards:
        scores = pq.read_table(shard.path, columns=[f"score_{CRITERION}"]).column(0).to_numpy()
        lo, hi = np.searchsorted(plan.rows, [start, start + shard.num_rows])
        z_sum += float(((scores[plan.rows[lo:hi] - start] - moments.mean) / moments.std).sum())
        start += shard.num_rows
    return {"selected_documents": plan.documents, "selected_tokens": plan.tokens,
            "mean_z_selected": z_sum / plan.documents, "peak_candidates": plan.peak_candidates,
            "seconds": seconds}


def run_end_to_end(folder: Path, budget: int, tau: float, seed: int, batch_size: int,
                   output: Path) -> dict:
    """``select()``: passes 1-3, writing the selection folder and its report."""
    from acadlm_plugins.qurating.selection import select

    report = select({"scores_dir": str(folder), "output_dir": str(output),
                     "criteria": {CRITERION: 1.0}, "tau": tau, "seed": seed,
                     "budget_tokens": budget, "batch_size": batch_size})["selected"]
    return {"selected_documents": report["selected"]["documents"],
            "selected_tokens": report["selected"]["tokens"],
            "mean_z_selected": report["mean_score"][CRITERION]["mean_z_after"],
            "passes_s": report["elapsed_s"]}


def child(args: argparse.Namespace) -> None:
    """Run one method in this (fresh) process and print its measurements as JSON."""
    # Imports count as the process's memory before the method, not as the method's:
    # pyarrow.parquet (and with it pyarrow) for every method. Ours imports it with its module;
    # the baseline used to import it inside its timed and measured region.
    import pyarrow.parquet  # noqa: F401

    module = None
    if args.run != "baseline":
        import acadlm_plugins.qurating.selection as module
    after_imports = _rss_mib()
    started = time.perf_counter()
    folder = Path(args.dir)
    if args.run == "baseline":
        result = run_baseline(folder, args.budget, args.tau, args.seed)
    elif args.run in ("ours", "ours_row"):
        result = run_ours(folder, args.budget, args.tau, args.seed, args.batch_size,
                          noise_key="row" if args.run == "ours_row" else "id")
    else:
        result = run_end_to_end(folder, args.budget, args.tau, args.seed, args.batch_size,
                                folder.parent / "selection")
    result.setdefault("seconds", time.perf_counter() - started)
    result.update(peak_rss_mib=_peak_mib(), rss_after_imports_mib=after_imports,
                  module=module.__file__ if module is not None else None)
    print("RESULT " + json.dumps(result))


def measure(method: str, folder: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--run", method, "--dir", str(folder),
               "--budget", str(args.budget), "--tau", str(args.tau), "--seed", str(args.seed),
               "--batch-size", str(args.batch_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{method} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-docs", type=int, default=10_000_000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--budget-fraction", type=float, default=0.1,
                        help="share of the corpus's tokens to select (default 0.1)")
    parser.add_argument("--tau", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1 << 16,
                        help="rows per pyarrow batch in ours (default 65536)")
    parser.add_argument("--skip-write", action="store_true",
                        help="do not run the end-to-end select() (writing the selection)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the shards here and keep them (default: a temp folder)")
    parser.add_argument("--run", choices=("baseline", "ours", "ours_row", "end_to_end"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        child(args)
        return

    scratch = Path(tempfile.mkdtemp(prefix="acadlm-selection-bench-"))
    folder = (args.keep or scratch) / "scores"
    try:
        started = time.perf_counter()
        corpus = write_corpus(folder, args.num_docs, args.shards, args.seed)
        size = sum(p.stat().st_size for p in folder.glob("*.parquet"))
        print(f"{corpus['documents']:,} documents, {corpus['tokens']:,} tokens in {args.shards} "
              f"shards ({size / 2**20:,.0f} MiB parquet), written in "
              f"{time.perf_counter() - started:.0f} s")
        args.budget = int(args.budget_fraction * corpus["tokens"])
        print(f"budget {args.budget:,} tokens ({args.budget_fraction:.0%}), tau={args.tau}, "
              f"criterion {CRITERION}\n")
        methods = ["baseline", "ours", "ours_row"] + ([] if args.skip_write else ["end_to_end"])
        results = {m: measure(m, folder, args) for m in methods}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    names = {"baseline": "numpy baseline", "ours": "ours, selection",
             "ours_row": "ours, row noise", "end_to_end": "ours, end to end"}
    header = f"{'':34}" + "".join(f"{names[m]:>18}" for m in methods)
    rows = [
        ("wall time (s)", lambda r: f"{r['seconds']:.1f}"),
        ("documents / s", lambda r: f"{args.num_docs / r['seconds']:,.0f}"),
        ("peak RSS (MiB)", lambda r: f"{r['peak_rss_mib']:,.0f}"),
        ("peak RSS over imports (MiB)",
         lambda r: f"{r['peak_rss_mib'] - r['rss_after_imports_mib']:,.0f}"),
        ("selected documents", lambda r: f"{r['selected_documents']:,}"),
        ("selected tokens", lambda r: f"{r['selected_tokens']:,}"),
        ("mean z of the selection", lambda r: f"{r['mean_z_selected']:.3f}"),
    ]
    print(header)
    for label, cell in rows:
        print(f"{label:34}" + "".join(f"{cell(results[m]):>18}" for m in methods))
    base, ours = results["baseline"], results["ours"]
    print(f"\ndocuments / s, ours / baseline: {base['seconds'] / ours['seconds']:.2f}x "
          f"(id noise), {base['seconds'] / results['ours_row']['seconds']:.2f}x (row noise, "
          "no ids read: like for like)")
    growth = {m: r["peak_rss_mib"] - r["rss_after_imports_mib"] for m, r in results.items()}
    print(f"peak RSS,      ours / baseline: {ours['peak_rss_mib'] / base['peak_rss_mib']:.3f}x "
          f"(over imports: {growth['ours'] / growth['baseline']:.3f}x; row noise: "
          f"{growth['ours_row'] / growth['baseline']:.3f}x)")
    print(f"ours kept at most {ours['peak_candidates']:,} candidate rows "
          f"({ours['peak_candidates'] / args.num_docs:.1%} of the corpus); the baseline's table "
          f"in memory: {base['table_mib']:,.0f} MiB")
    if "end_to_end" in results:
        print(f"end to end, passes (s): {results['end_to_end']['passes_s']}")
    print(f"ours imported {ours['module']}")


if __name__ == "__main__":
    main()
