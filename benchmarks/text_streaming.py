"""Measures streaming text input: a generated corpus of any size, and what each input shard reads.

  python benchmarks/text_streaming.py corpus --out DIR --megabytes 1024 [--files 8]
  python benchmarks/text_streaming.py shards --files 'DIR/*.txt' --vocab VOCAB --count 2

`corpus` writes text files in the BERT layout (one sentence per line, a blank line between
documents) from a fixed pseudo-word list, deterministic for a seed. `shards` runs one process per
input shard at once; each builds its shard with `mlm.data.text_source.text_shard_documents`,
tokenizes every one of its documents and prints one JSON line: its byte ranges, documents,
sentences, tokens, seconds and peak RSS. Peak RSS and input tokens/s of a whole training input
pipeline come from `python -m mlm.bench input`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def pseudo_words(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` distinct-ish lower-case pseudo-words of 2-10 letters."""
    lengths = rng.integers(2, 11, count)
    return np.array(["".join(rng.choice(LETTERS, length)) for length in lengths])


def write_corpus(out_dir: str, megabytes: int, num_files: int, seed: int = 0) -> list[str]:
    """Writes about `megabytes` MiB of documents over `num_files` files; returns the paths."""
    rng = np.random.default_rng(seed)
    words = pseudo_words(rng, 20_000)
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    os.makedirs(out_dir, exist_ok=True)
    per_file = megabytes * (1 << 20) // num_files
    paths = []
    for number in range(num_files):
        path = os.path.join(out_dir, f"part-{number:03d}.txt")
        written = 0
        with open(path, "w", encoding="utf-8") as file:
            while written < per_file:
                ids = rng.choice(len(words), 200_000, p=zipf)
                sentence_lengths = rng.integers(6, 30, 200_000 // 6)
                lines, start = [], 0
                for length in sentence_lengths:
                    if start + length > len(ids):
                        break
                    lines.append(" ".join(words[ids[start : start + length]]).capitalize() + ".")
                    start += length
                    if rng.random() < 0.08:  # documents of ~12 sentences on average
                        lines.append("")
                text = "\n".join(lines) + "\n\n"
                file.write(text)
                written += len(text)
        paths.append(path)
    return paths


def shard_report(
    files: list[str], vocab_path: str, index: int, count: int, max_documents: int
) -> dict:
    """Builds input shard `index` of `count` and tokenizes its first `max_documents` documents."""
    from mlm.data.text_source import shard_ranges, text_shard_documents
    from mlm.data.tokenizer import load_vocab

    vocab = load_vocab(vocab_path, lowercase=True)
    start = time.perf_counter()
    ranges = shard_ranges(files, index, count)
    documents = text_shard_documents(files, vocab, shard_index=index, shard_count=count)
    scan_s = time.perf_counter() - start
    sentences = tokens = 0
    tokenized = min(len(documents), max_documents or len(documents))
    for document in documents[:tokenized]:
        sentences += len(document)
        tokens += sum(len(ids) for ids in document)
    total_s = time.perf_counter() - start
    return dict(
        shard=index,
        shards=count,
        ranges=[[os.path.basename(r.path), r.start, r.end] for r in ranges],
        bytes=sum(r.end - r.start for r in ranges),
        documents=len(documents),
        tokenized_documents=tokenized,
        sentences=sentences,
        tokens=tokens,
        scan_s=round(scan_s, 2),
        total_s=round(total_s, 2),
        tokens_per_s=round(tokens / (total_s - scan_s)),
        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    corpus = commands.add_parser("corpus")
    corpus.add_argument("--out", required=True)
    corpus.add_argument("--megabytes", type=int, required=True)
    corpus.add_argument("--files", type=int, default=8)
    shards = commands.add_parser("shards")
    shards.add_argument("--files", required=True, help="comma-separated globs")
    shards.add_argument("--vocab", required=True)
    shards.add_argument("--count", type=int, default=2)
    shards.add_argument("--index", type=int, default=None, help="run one shard in this process")
    shards.add_argument("--max_documents", type=int, default=0, help="0: tokenize all")
    args = parser.parse_args()
    if args.command == "corpus":
        paths = write_corpus(args.out, args.megabytes, args.files)
        print(json.dumps(dict(files=paths, bytes=sum(os.path.getsize(p) for p in paths))))
        return
    from mlm.data.corpus import expand_globs

    files = expand_globs(args.files, "--files", "")
    if args.index is not None:
        report = shard_report(files, args.vocab, args.index, args.count, args.max_documents)
        print(json.dumps(report), flush=True)
        return
    command = [sys.executable, __file__, "shards", "--files", args.files, "--vocab", args.vocab]
    command += ["--max_documents", str(args.max_documents)]
    workers = [
        subprocess.Popen([*command, "--count", str(args.count), "--index", str(index)])
        for index in range(args.count)
    ]
    sys.exit(max(worker.wait() for worker in workers))


if __name__ == "__main__":
    main()
