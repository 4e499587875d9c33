"""Fuzz every psgrid service with raw, random and mutated requests: the long run of issue 12.

Starts each service in this process with a cluster token (the parameter server
with one job, a supervisor, an inference server), warms up, then sends
``--count`` hostile requests to each (every other one without the token) with the
same generator as ``tests/service/test_fuzz.py``. Prints, per service, the
messages sent, the status codes (with and without the token), the RSS before and
after, and whether parameters are bit-identical and the server still serves; then
one JSON line of the figures. Exits 1 when any call answered INTERNAL or UNKNOWN.

    python scripts/fuzz_rpc.py [--count 20000] [--seed 12] [--services ps,supervisor,inference]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from helpers import fuzz  # noqa: E402

TOKEN = "fuzz-token"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="messages per service")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--services", default="ps,supervisor,inference")
    args = parser.parse_args(argv)
    results, failed = {}, False
    with tempfile.TemporaryDirectory() as tmp:
        targets = {"ps": lambda: fuzz.parameter_server(TOKEN), "supervisor": lambda: fuzz.supervisor(TOKEN),
                   "inference": lambda: fuzz.inference(TOKEN, tmp)}
        for i, name in enumerate(args.services.split(",")):
            with contextlib.ExitStack() as stack:
                target = stack.enter_context(targets[name]())
                figures, before, after = fuzz.run(target, args.count, args.seed + i, TOKEN)
                intact = target.intact()
            bad = sum(n for c in (figures.codes, figures.tokenless)
                      for k, n in c.items() if k in ("INTERNAL", "UNKNOWN"))
            failed |= bad > 0 or not intact
            results[name] = {"messages": figures.messages, "with_token": dict(figures.codes.most_common()),
                             "tokenless": dict(figures.tokenless.most_common()),
                             "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
                             "intact_and_serving": intact}
            print(f"{name}: {figures.messages} messages, RSS {before:.1f} -> {after:.1f} MB, "
                  f"intact and serving: {intact}")
            print(f"  with the token: {dict(figures.codes.most_common())}")
            print(f"  without:        {dict(figures.tokenless.most_common())}")
    print(json.dumps(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
