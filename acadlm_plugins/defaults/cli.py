"""``acadlm-defaults``: build, describe and verify the offline embedded default.

acadlm-defaults build [--force] [--only model|corpus] [--home DIR]
acadlm-defaults info [--home DIR]
acadlm-defaults verify [--home DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from acadlm_plugins.defaults import manifest as manifest_lib
from acadlm_plugins.defaults.paths import (
    HOME_ENV_VAR,
    acadlm_home,
    default_corpus_dir,
    default_model_dir,
    manifest_path,
    sources_dir,
)

logger = logging.getLogger("acadlm_plugins.defaults")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acadlm-defaults",
        description="Build and inspect the offline default (SmolLM2-135M-Instruct + corpus).",
    )
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help=f"root folder (default: ${HOME_ENV_VAR} or ~/.cache/acadlm)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build what is missing or stale (idempotent)")
    build.add_argument("--force", action="store_true", help="rebuild even when up to date")
    build.add_argument("--only", choices=("model", "corpus"), help="build one component")
    build.add_argument("--home", type=Path, default=argparse.SUPPRESS, help="root folder")
    for name, text in (("info", "print paths and sizes"), ("verify", "check sha256 sums")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--home", type=Path, default=argparse.SUPPRESS, help="root folder")
    return parser


def _build(home: Path, force: bool, only: str | None) -> int:
    started = time.perf_counter()
    before = manifest_lib.load_manifest(home).get("components", {})
    if only in (None, "model"):
        from acadlm_plugins.defaults.model import build_model

        build_model(home, force=force)
    if only in (None, "corpus"):
        from acadlm_plugins.defaults.corpus import build_corpus

        build_corpus(home, force=force)
    after = manifest_lib.load_manifest(home).get("components", {})
    rebuilt = [
        name
        for name in after
        if after[name].get("built_at") != before.get(name, {}).get("built_at")
    ]
    elapsed = time.perf_counter() - started
    if rebuilt:
        print(f"built {', '.join(rebuilt)} in {home} ({elapsed:.1f} s)")
    else:
        print(f"up to date: {home} ({elapsed:.1f} s)")
    return 0


def _format_count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _command(name: str, home: Path | None) -> str:
    """The ``acadlm-defaults <name>`` command line to suggest in a fix hint, with ``--home``
    when the user gave one: without it the suggested command would act on another folder."""
    return f"acadlm-defaults {name}" + (f" --home {shlex.quote(str(home))}" if home else "")


def _info(home: Path, given_home: Path | None = None) -> int:
    manifest = manifest_lib.load_manifest(home)
    components = manifest.get("components", {})
    print(f"home:     {home}")
    print(f"manifest: {manifest_path(home)}{'' if manifest_path(home).is_file() else ' (missing)'}")
    print(f"sources:  {sources_dir(home)}")
    model = components.get("model")
    print(f"model:    {default_model_dir(home)}", "" if model else "(not built)")
    if model:
        size = sum(entry["bytes"] for entry in model["files"])
        facts = model.get("model", {})
        print(
            f"          {facts.get('parameters', 0):,} parameters, {size / 2**20:.0f} MiB, "
            f"checkpoint_files={facts.get('checkpoint_files')}, built {model.get('built_at')}"
        )
    corpus = components.get("corpus")
    print(f"corpus:   {default_corpus_dir(home)}", "" if corpus else "(not built)")
    if corpus:
        print(
            f"          {'domain':<10} {'train docs':>10} {'val docs':>9} {'train tokens':>13} "
            f"{'val tokens':>11} {'train chars':>12}"
        )
        for domain, stats in corpus["domains"].items():
            print(
                f"          {domain:<10} {stats['train_docs']:>10,} {stats['validation_docs']:>9,} "
                f"{_format_count(stats['train_tokens']):>13} "
                f"{_format_count(stats['validation_tokens']):>11} {stats['train_chars']:>12,}"
            )
        for name, stats in corpus.get("long", {}).items():
            print(
                f"          long/{name}.jsonl: {stats['docs']:,} docs, "
                f"{_format_count(stats['tokens'])} tokens, longest {stats['max_doc_chars']:,} chars"
            )
    try:
        problems = manifest_lib.verify_manifest(home)
    except manifest_lib.ManifestUnreadableError:
        problems = [f"{manifest_path(home)}: unreadable"]
    print(
        "status:   "
        + ("ok" if not problems
           else f"{len(problems)} problem(s); run `{_command('verify', given_home)}`")
    )
    return 0


def _verify(home: Path, given_home: Path | None = None) -> int:
    """Print every manifest problem of ``home`` and the command that repairs them; ``given_home``
    is the ``--home`` the user passed (None when the default folder is used)."""
    try:
        problems = manifest_lib.verify_manifest(home)
    except manifest_lib.ManifestUnreadableError as err:
        print(f"problem: {err.path}: unreadable manifest ({err.reason})")
        print(f"Fix: delete {shlex.quote(str(err.path))} and run `{_command('build', given_home)}`, "
              "which rebuilds what the manifest no longer vouches for.")
        return 1
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        print(f"Fix: `{_command('build', given_home)}` rebuilds what is missing or changed.")
        return 1
    print(f"ok: every file in {manifest_path(home)} matches its sha256")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``acadlm-defaults`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    home = (args.home.expanduser() if args.home else acadlm_home()).resolve()
    if home.exists() and not home.is_dir():
        given = "--home" if args.home else f"${HOME_ENV_VAR}"
        print(f"error: {given} {home} is a file, not a folder. Fix: point {given} at a folder "
              "(it is created by `build` if missing).", file=sys.stderr)
        return 2
    if args.home:
        os.environ[HOME_ENV_VAR] = str(home)  # so helpers that read the environment agree
    if args.command == "build":
        return _build(home, args.force, args.only)
    given_home = home if args.home else None
    if args.command == "info":
        return _info(home, given_home)
    return _verify(home, given_home)


if __name__ == "__main__":
    sys.exit(main())
