"""What annotating a corpus costs beyond the rater's forward passes, on SmolLM2-135M.

Times, in one run, the annotator's per-shard loop as the annotate recipe runs it (read the
rows through ``datasets``, tokenize, cut into chunks, batch chunks by length, forward, take
token-weighted means, write parquet shards with done markers) against a plain forward pass of
the same rater on the same tokens: every chunk framed as the annotator frames it (``[BOS] +
chunk``), concatenated into one stream and cut into dense ``batch x (seq_len + 1)`` rows, so
no padding, no tokenizer and no I/O. Both count the corpus's text tokens, so the ratio
annotation / plain is the throughput the annotation keeps (1.0 = no overhead).

The rater is ``--rater-dir`` if given, else the embedded SmolLM2-135M-Instruct with random
heads for the four criteria (its speed does not depend on how the heads were trained). The
documents are the first ``--docs-per-file`` rows of each validation split of the embedded
corpus.

Run::

    .venv/bin/python benchmarks/annotation_overhead.py --threads 1   # 2 chunks of 256 tokens
    .venv/bin/python benchmarks/annotation_overhead.py --seq-len 512 --batch-size 4
    .venv/bin/python benchmarks/annotation_overhead.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from pruning_overhead import parse_common_args

from acadlm_plugins.defaults.paths import default_corpus_dir, default_model_dir
from acadlm_plugins.qurating import CRITERIA
from acadlm_plugins.qurating.annotation import (
    DocumentScorer,
    annotate_rank,
    open_corpus,
    plan_shards,
)
from acadlm_plugins.qurating.rater import (
    LoadedRater,
    RaterInfo,
    RaterModel,
    RaterTokenizer,
    frame,
    load_backbone,
    load_rater,
)

DEFAULT_MODEL_DIR = default_model_dir()  # under $ACADLM_HOME
DEFAULT_CORPUS_DIR = default_corpus_dir()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_rater(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> LoadedRater:
    """``--rater-dir``, or SmolLM2 (built default, or its shape with random weights) with
    random heads."""
    if args.rater_dir:
        return load_rater(args.rater_dir, device=device, dtype=dtype,
                          max_seq_len=args.seq_len + 1)
    if not (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        sys.exit(f"The embedded default is missing at {DEFAULT_MODEL_DIR}. Build it with "
                 "`acadlm-defaults build` (or `make defaults`), or pass --rater-dir.")
    backbone = load_backbone(DEFAULT_MODEL_DIR, device=device, dtype=dtype,
                             max_seq_len=args.seq_len + 1)
    torch.manual_seed(0)
    with torch.no_grad():
        if args.weights == "random":
            for name, param in backbone.named_parameters():
                if "norm" not in name:
                    param.normal_(0.0, 0.02)
        model = RaterModel(backbone, CRITERIA, "last")
        model.heads.weight.normal_(0.0, 0.05)
    model.eval().requires_grad_(False)
    info = RaterInfo(CRITERIA, "last", args.seq_len, model.dim, {})
    return LoadedRater(model, RaterTokenizer(DEFAULT_MODEL_DIR), info, DEFAULT_MODEL_DIR)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def plain_forward(rater: LoadedRater, stream: torch.Tensor, rows: int, width: int,
                  device: torch.device) -> float:
    """Seconds for the rater's forward over ``stream`` in dense ``rows x width`` batches."""
    lengths = torch.full((rows,), width, dtype=torch.long, device=device)
    usable = stream.numel() // width * width
    blocks = stream[:usable].view(-1, width)
    synchronize(device)
    started = time.perf_counter()
    for start in range(0, blocks.shape[0], rows):
        batch = blocks[start:start + rows].to(device)
        rater.model(batch, lengths[:batch.shape[0]])
    synchronize(device)
    seconds = time.perf_counter() - started
    return seconds * stream.numel() / max(usable, 1)  # the few tokens of the last partial row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rater-dir", default=None, help="a trained rater folder")
    parser.add_argument("--docs-per-file", type=int, default=4,
                        help="first rows of each validation split")
    parser.add_argument("--shard-size", type=int, default=4,
                        help="documents per output shard (the unit of alternation)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parse_common_args(parser)  # --batch-size (chunks per forward), --seq-len (chunk)
    os.environ.setdefault("ACADLM_NO_PROGRESS", "1")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rater = build_rater(args, device, dtype)
    files = sorted(DEFAULT_CORPUS_DIR.glob("*/validation.jsonl"))
    if not files:
        sys.exit(f"No corpus at {DEFAULT_CORPUS_DIR}; build it with `acadlm-defaults build`.")
    scorer = DocumentScorer(rater, chunk_tokens=args.seq_len,
                            batch_tokens=args.batch_size * (args.seq_len + 1), device=device)

    with tempfile.TemporaryDirectory(prefix="acadlm_bench_annotate_") as scratch:
        started = time.perf_counter()
        corpus = open_corpus(files, cache_dir=Path(scratch) / "datasets",
                             max_documents_per_file=args.docs_per_file)
        open_seconds = time.perf_counter() - started
        shards = plan_shards(corpus.num_rows, 1, args.shard_size)[0]
        streams, text_tokens, chunks = [], 0, 0
        for shard in shards:  # the plain pass's input, prepared outside any timing
            texts = corpus.rows(shard.start, shard.end).column("text").to_pylist()
            documents = scorer.tokenize(texts)
            spans = scorer.chunks(documents)
            stream = [t for d, s, e in spans
                      for t in frame(documents[d][s:e], rater.tokenizer.bos_id)]
            streams.append(torch.tensor(stream, dtype=torch.long))
            text_tokens += sum(len(d) for d in documents)
            chunks += len(spans)
        print(f"rater: {rater.folder} ({args.weights if not args.rater_dir else 'trained'}), "
              f"{args.dtype} on {device}, {torch.get_num_threads()} threads")
        print(f"corpus: {corpus.num_rows} documents ({args.docs_per_file} per file of "
              f"{len(files)} validation splits) in {len(shards)} shards, {text_tokens:,} tokens, "
              f"{chunks} chunks of <= {args.seq_len} tokens; {args.batch_size} x "
              f"{args.seq_len + 1} tokens per forward")
        width = args.seq_len + 1
        plain_forward(rater, streams[0][:args.batch_size * width], args.batch_size, width,
                      device)  # warm-up, untimed
        # Shard by shard, alternating which goes first, so drift on a shared machine hits both.
        annotate_seconds = plain_seconds = 0.0
        dense_positions = 0
        for k, (shard, stream) in enumerate(zip(shards, streams)):
            for what in (("annotate", "plain") if k % 2 == 0 else ("plain", "annotate")):
                if what == "annotate":
                    annotate_seconds += annotate_rank(corpus, scorer, Path(scratch) / "scores",
                                                      [shard], progress=False).seconds
                else:
                    plain_seconds += plain_forward(rater, stream, args.batch_size, width, device)
            dense_positions += stream.numel()

    annotate_rate = text_tokens / annotate_seconds
    plain_rate = text_tokens / plain_seconds
    print()
    print(f"{'':<36}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'annotation (annotate_rank)':<36}{annotate_seconds:>10.2f}{annotate_rate:>12,.0f}")
    print(f"{'plain rater forward, dense batches':<36}{plain_seconds:>10.2f}{plain_rate:>12,.0f}")
    print(f"(opening the corpus through datasets, once per run: {open_seconds:.2f} s; "
          f"padded forward positions / dense: {scorer.forward_positions / dense_positions:.3f})")
    print(f"\nannotation / plain forward tokens/s: {annotate_rate / plain_rate:.3f}")


if __name__ == "__main__":
    main()
