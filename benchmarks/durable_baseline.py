"""The machine's yardstick: durable-rules posting simple events, as the engine issue
quotes it ("about 60,000 simple events per second").

    pip install durable-rules    # not a dependency of the engine yet
    python benchmarks/durable_baseline.py [--events 100000] [--runs 3]

Prints events per second for each run. Dividing ``benchmarks/engine.py``'s figures
by these tells how the engine compares on the same machine, whatever its speed.
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    try:
        from durable.lang import m, post, ruleset, when_all
    except ImportError:
        sys.exit("durable-rules is not installed: pip install durable-rules")

    matched = [0]
    with ruleset("baseline"):
        @when_all(m.type == "purchase")
        def purchase(c: object) -> None:
            matched[0] += 1

    for run in range(args.runs):
        started = time.perf_counter()
        for i in range(args.events):
            post("baseline", {"id": f"{run}-{i}", "sid": f"c{i % 1000}", "type": "purchase",
                              "amount": 10})
        elapsed = time.perf_counter() - started
        print(f"durable-rules, run {run + 1}: {args.events:,} simple events in {elapsed:.2f} s"
              f" = {args.events / elapsed:,.0f} events/s")
    print(f"matched {matched[0]:,} of {args.events * args.runs:,}")


if __name__ == "__main__":
    main()
