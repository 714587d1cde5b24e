"""Run one harness: with atheris (coverage-guided), or a quick smoke without it.

    python -m fuzz.run NAME [libFuzzer flags, e.g. -atheris_runs=1000000]
    python -m fuzz.run NAME --smoke COUNT [--seed N]
    python -m fuzz.run --list

NAME is a module ``fuzz/fuzz_NAME.py``.  With atheris, only cyclemirror's
Python modules are instrumented (the harness is imported inside
``instrument_imports``), the harness's seeds are written to
``fuzz/corpus/NAME/`` (or ``$CYCLEMIRROR_FUZZ_CORPUS/NAME/``; it also keeps
what atheris finds), and the defaults
are ``-timeout=10 -rss_limit_mb=1536`` unless given.  The smoke mode runs the
target over the seeds and COUNT mutations (``harness.mutations``) and exits 1
with the input on the first escape.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def harness_names() -> list[str]:
    return sorted(f[5:-3] for f in os.listdir(HERE)
                  if f.startswith("fuzz_") and f.endswith(".py"))


def _write_corpus(name: str, seeds: list[bytes]) -> str:
    root = os.environ.get("CYCLEMIRROR_FUZZ_CORPUS") or os.path.join(HERE, "corpus")
    corpus = os.path.join(root, name)
    os.makedirs(corpus, exist_ok=True)
    for s in seeds:
        path = os.path.join(corpus, "seed-" + hashlib.sha1(s).hexdigest()[:16])
        if not os.path.exists(path):
            with open(path, "wb") as fh:
                fh.write(s)
    return corpus


def run_atheris(name: str, flags: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["cyclemirror"]):
        module = importlib.import_module(f"fuzz.fuzz_{name}")
    corpus = _write_corpus(name, module.seeds())
    if not any(f.startswith("-timeout=") for f in flags):
        flags.append("-timeout=10")
    if not any(f.startswith("-rss_limit_mb=") for f in flags):
        flags.append("-rss_limit_mb=1536")
    if not any(f.startswith("-max_len=") for f in flags):
        flags.append(f"-max_len={getattr(module, 'MAX_LEN', 4096)}")
    atheris.Setup([sys.argv[0], *flags, corpus], module.test_one_input)
    atheris.Fuzz()


def run_smoke(name: str, count: int, seed: int) -> int:
    from fuzz.harness import mutations

    module = importlib.import_module(f"fuzz.fuzz_{name}")
    seeds = module.seeds()
    start = time.monotonic()
    n = 0
    for data in [*seeds, *mutations(seeds, count, seed, getattr(module, "MAX_LEN", 4096))]:
        try:
            module.test_one_input(data)
        except BaseException:
            print(f"fuzz {name}: ESCAPE on input {data[:512]!r} (len {len(data)})")
            traceback.print_exc()
            return 1
        n += 1
    print(f"fuzz {name}: {n} inputs clean in {time.monotonic() - start:.1f}s")
    known = getattr(module, "KNOWN", None)
    if known:
        print(f"fuzz {name}: known escapes left to their owner: {dict(known)}")
    return 0


def main(argv: list[str]) -> int:
    import logging

    logging.disable(logging.CRITICAL)  # the code under test logs every refusal
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] == "--list":
        print("\n".join(harness_names()))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in harness_names():
        print(f"no harness {name!r}; known: {', '.join(harness_names())}", file=sys.stderr)
        return 2
    if rest and rest[0] == "--smoke":
        count = int(rest[1]) if len(rest) > 1 else 2000
        seed = int(rest[3]) if len(rest) > 3 and rest[2] == "--seed" else 0
        return run_smoke(name, count, seed)
    run_atheris(name, list(rest))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    sys.exit(main(sys.argv[1:]))
