"""`infergate bench pd`: time to first token and time per output token, aggregated against
prefill/decode disaggregated, on the same 4 simulator pods and the same trace.

aggregated: examples/quickstart (4 aggregated pods, its picker config); disaggregated:
examples/pd (2 groups of 1 prefill + 1 decode pod with the nixl connector sidecar, the
pd-profile-handler); disaggregated-1-group: the same as one group of 2 + 2 (bench/pd/fleet.py).
A mix of long prompts with short answers and short prompts with long answers
(bench/pd/workload.py), open-loop Poisson arrivals at a few rates, a fresh fleet per point.
--latency-profile, --pd-params and the mix's flags run other points of the regime (README
"bench/pd"). Writes bench/results/pd-<date>[-quick].json and docs/benchmarks/pd[-quick].png.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import yaml

from infergw.api.cli_help import HelpFormatter
from infergw.bench.common import machine, positive_number, rate_list, save_results
from infergw.bench.pd.fleet import MODES, Tuning, check_tuning
from infergw.bench.pd.report import markdown, plot
from infergw.bench.pd.run import Settings, run_point
from infergw.bench.pd.workload import Mix
from infergw.epp.scheduling.config_file import ConfigError
from infergw.simulator.latency_profiles import DEFAULT_PROFILE, PROFILES

FULL = {"rates": [2.0, 6.0, 10.0, 14.0], "warmup_s": 5.0, "duration_s": 30.0, "modes": MODES}
QUICK = {"rates": [6.0], "warmup_s": 3.0, "duration_s": 8.0, "modes": MODES[:2]}
# The longest prompt (words) and answer (tokens) a run asks for: far past any model's context
# in the profiles, small enough that a trace of them fits in memory.
MAX_LENGTH = 100_000
# A point's trace is built before it runs: its expected arrivals (rate × seconds) are bounded
# so that it fits in memory (the full run's largest point has about 500).
MAX_ARRIVALS = 1_000_000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="infergate bench pd", description=__doc__, formatter_class=HelpFormatter
    )
    run = p.add_argument_group("Run")
    output = p.add_argument_group("Output")
    run.add_argument("--quick", action="store_true", help="one rate, short (about a minute)")
    run.add_argument("--rates", type=rate_list, default=None, help="comma-separated requests/s")
    run.add_argument(
        "--duration", type=positive_number, default=None, help="measured seconds per point"
    )
    run.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated: {', '.join(MODES)} (default: all; --quick: the first two)",
    )
    run.add_argument("--seed", type=int, default=7, help="random seed of the workload")
    tuning_group = p.add_argument_group("Pods and the P/D decider")
    mix_group = p.add_argument_group("Workload mix")
    tuning_group.add_argument(
        "--latency-profile",
        choices=sorted(PROFILES),
        default=DEFAULT_PROFILE,
        help="every pod's --sim-latency-profile (default: the examples', sim-default)",
    )
    tuning_group.add_argument(
        "--pd-params",
        type=_mapping,
        default={},
        help="YAML mapping merged into the pd-profile-handler's parameters, e.g. "
        "'{nonCachedTokens: 256, decodeBatchWeight: 0.1, prefillQueueWeight: 32}'",
    )
    defaults = Mix()
    mix_group.add_argument(
        "--long-share", type=float, default=defaults.long_share, help="share of long prompts"
    )
    mix_group.add_argument(
        "--long-prompt-words",
        type=int,
        default=defaults.long_prompt_words,
        help="words in a long prompt",
    )
    mix_group.add_argument(
        "--decode-output-tokens",
        type=int,
        default=defaults.decode_output_tokens,
        help="tokens each request generates",
    )
    output.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where the JSON and PNG go (default: bench/results/ and docs/benchmarks/)",
    )
    args = p.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    if args.rates:
        plan["rates"] = args.rates
    if args.duration is not None:
        plan["duration_s"] = args.duration
    if max(plan["rates"]) * (plan["warmup_s"] + plan["duration_s"]) > MAX_ARRIVALS:
        p.error(f"--rates × (warm-up + --duration) over {MAX_ARRIVALS:,} requests a point")
    modes = args.modes.split(",") if args.modes else list(plan["modes"])
    if not modes or set(modes) - set(MODES):
        p.error(f"--modes takes {', '.join(MODES)}")
    if not 0 <= args.long_share <= 1:
        p.error("--long-share takes 0..1")
    for flag, n in (
        ("--long-prompt-words", args.long_prompt_words),
        ("--decode-output-tokens", args.decode_output_tokens),
    ):
        if not 1 <= n <= MAX_LENGTH:
            p.error(f"{flag} takes 1..{MAX_LENGTH:,}, got {n}")
    mix = replace(
        defaults,
        long_share=args.long_share,
        long_prompt_words=args.long_prompt_words,
        decode_output_tokens=args.decode_output_tokens,
    )
    tuning = Tuning(args.latency_profile, args.pd_params)
    try:
        check_tuning(tuning)
    except ConfigError as exc:
        p.error(f"--pd-params: {exc}")
    settings = Settings(plan["warmup_s"], plan["duration_s"], args.seed, mix, tuning)
    out = {
        "benchmark": "pd",
        "machine": machine(),
        "settings": {
            "warmup_s": settings.warmup_s,
            "duration_s": settings.duration_s,
            "seed": settings.seed,
            "rates": plan["rates"],
            "pods": 4,
            "workload": mix.describe(),
            "tuning": tuning.describe(),
            "slo": settings.slo.describe(),
        },
        "rows": [],
    }
    for rate in plan["rates"]:
        for mode in modes:
            print(f"{mode} at {rate:g} req/s ...", flush=True)
            row = run_point(mode, rate, settings)
            out["rows"].append(row)
            print(
                f"  TTFT p50/p90 {row['ttft_p50_ms']}/{row['ttft_p90_ms']} ms, "
                f"TPOT p50/p90 {row['tpot_p50_ms']}/{row['tpot_p90_ms']} ms, "
                f"goodput {row['goodput_per_s']} req/s, "
                f"errors {row['errors']}, {row['seconds']:.0f} s",
                flush=True,
            )
    save_results(
        "pd", out, quick=args.quick, output_dir=args.output_dir, plot=plot, markdown=markdown
    )
    return 0


def _mapping(text: str) -> dict:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not YAML: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("a YAML mapping of the handler's parameters")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
