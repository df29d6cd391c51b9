"""What FlagsinkHook adds to an OpenFeature evaluation, beside the SDK's own cost.

A standalone script (pytest does not collect ``bench_*`` files)::

    .venv/bin/python tests/benchmarks/bench_openfeature.py [--calls 50000] [--trials 7]

Every row is measured in the same process, interleaved within each trial; figures are the
median of the trials, in ns per evaluation. The OpenFeature SDK (in-memory provider) runs
the same evaluation in every row; the rows differ only in the hooks attached:

- ``no hook``: the SDK alone.
- ``no-op hook``: an empty ``Hook`` subclass: what the SDK spends dispatching any hook.
- ``FlagsinkHook``: our hook, feeding a pipeline whose exporter discards batches.
- ``FlagsinkHook + metadata``: with static metadata and a 2-name context allow-list.

``hook's own cost`` is the FlagsinkHook row minus the no-op hook row (the target: <= 1 us);
``after() direct`` calls ``hook.after`` alone, without the SDK.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.flag_evaluation import FlagEvaluationDetails, FlagType
from openfeature.hook import Hook, HookContext
from openfeature.provider.in_memory_provider import InMemoryFlag, InMemoryProvider

from flagsink.event import Event
from flagsink.exporter import Exporter, ExporterSettings
from flagsink.integrations.openfeature import FlagsinkHook
from flagsink.pipeline import Pipeline
from flagsink.scheduler import DataExporterScheduler


class Discard(Exporter[ExporterSettings]):
    kind = "discard"

    def export(self, events: Sequence[Event]) -> None:
        pass


class NoOpHook(Hook):
    pass


FLAGS = {"bool-flag": InMemoryFlag("on", {"on": True, "off": False}, {"version": "3"})}
CONTEXT = EvaluationContext("user-42", {"plan": "pro", "region": "eu", "email": "a@b.c"})


def make_client(name: str, hooks: list[Hook]) -> Callable[[], Any]:
    api.set_provider(InMemoryProvider(FLAGS), name)
    client = api.get_client(name)
    client.add_hooks(hooks)

    def evaluate() -> Any:
        return client.get_boolean_value("bool-flag", False, CONTEXT)

    return evaluate


def time_per_call(func: Callable[[], Any], calls: int) -> float:
    gc.collect()
    start = time.perf_counter_ns()
    for _ in range(calls):
        func()
    return (time.perf_counter_ns() - start) / calls


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--trials", type=int, default=7)
    args = parser.parse_args(argv)

    pipeline = Pipeline(
        [
            (
                DataExporterScheduler(Discard(), flush_interval=1.0, max_events_in_memory=10_000),
                "feature",
            )
        ],
        exit_timeout=None,
    )
    hook = FlagsinkHook(pipeline)
    rich_hook = FlagsinkHook(
        pipeline, metadata={"service": "shop"}, context_attributes=("plan", "region")
    )
    hook_context = HookContext("bool-flag", FlagType.BOOLEAN, False, CONTEXT)
    details = FlagEvaluationDetails("bool-flag", True, "on", {"version": "3"})

    rows: dict[str, Callable[[], Any]] = {
        "no hook": make_client("bench-none", []),
        "no-op hook": make_client("bench-noop", [NoOpHook()]),
        "FlagsinkHook": make_client("bench-flagsink", [hook]),
        "FlagsinkHook + metadata": make_client("bench-rich", [rich_hook]),
        "after() direct": lambda: hook.after(hook_context, details, {}),
    }
    for func in rows.values():  # warm up
        time_per_call(func, 2_000)
    results: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.trials):
        for name, func in rows.items():
            results[name].append(time_per_call(func, args.calls))
    assert pipeline.close(10)
    stats = pipeline.stats()[0]
    assert hook.errors == 0
    assert rich_hook.errors == 0

    median = {name: statistics.median(values) for name, values in results.items()}
    print(
        f"# OpenFeature SDK evaluation with and without FlagsinkHook\n\n"
        f"Python {platform.python_version()} on {platform.machine()}, "
        f"{args.calls:,} evaluations x {args.trials} trials, ns per evaluation "
        "(median and best trial)\n"
    )
    best = {name: min(values) for name, values in results.items()}
    print(
        f"| {'row':<26} | {'median':>8} | {'vs no hook':>10} | {'best':>8} | {'vs no hook':>10} |"
    )
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 12}|{'-' * 10}|{'-' * 12}|")
    for name in rows:
        direct = name == "after() direct"
        delta = "" if direct else f"{median[name] - median['no hook']:+.0f}"
        best_delta = "" if direct else f"{best[name] - best['no hook']:+.0f}"
        print(
            f"| {name:<26} | {median[name]:>8.0f} | {delta:>10} "
            f"| {best[name]:>8.0f} | {best_delta:>10} |"
        )
    for label, figures in (("median", median), ("best", best)):
        own = figures["FlagsinkHook"] - figures["no-op hook"]
        own_rich = figures["FlagsinkHook + metadata"] - figures["no-op hook"]
        print(
            f"\n{label}: hook's own cost (FlagsinkHook - no-op hook) {own:.0f} ns, "
            f"{own_rich:.0f} ns with metadata; after() alone {figures['after() direct']:.0f} ns "
            f"(target <= 1000 ns)"
        )
    print(f"events received by the pipeline: {stats.received:,} (dropped {stats.dropped:,})")


if __name__ == "__main__":
    main(sys.argv[1:])
