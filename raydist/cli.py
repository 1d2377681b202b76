"""`raydist ...` sub-commands: parse, build a spec, hand over. No logic of their own."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

import yaml

from raydist.config import ConfigError, RunSpec, load_yaml, parse_sets
from raydist.config.values import MAPPINGS, PROBE_S, RAY_ADDRESS_FORMS, parse_size
from raydist.errors import Unreachable, unknown
from raydist.runtime import capacity, connect, interrupts


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def add_spec_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """--config FILE, --set key=value, and one flag per RunSpec field (--batch-size ...) but
    those in `skip`."""
    p.add_argument("--config", help="YAML file whose keys are RunSpec fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field; repeatable")
    for name in MAPPINGS:  # --model-arg width=256: one entry of model_args
        p.add_argument(f"--{name.removesuffix('s').replace('_', '-')}", dest=f"{name}_items",
                       action="append", default=[], metavar="KEY=VALUE",
                       help=f"one entry of {name} (its value read as YAML); repeatable")
    for f in (f for f in fields(RunSpec) if f.name not in skip):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                       metavar=f.name.upper(), help=f.metadata["help"])


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """Defaults < --config file < flags < --set."""
    raw: dict[str, Any] = {}
    if args.config:
        raw = load_yaml(args.config)
        RunSpec.from_dict(raw, source=args.config)
    raw.update({f.name: getattr(args, f.name) for f in fields(RunSpec) if hasattr(args, f.name)})
    for name in MAPPINGS:
        for key, value in parse_sets(getattr(args, f"{name}_items", []), f"--{name[:-1]}").items():
            raw[f"{name}.{key}"] = yaml_value(value)
    raw.update(parse_sets(args.set))
    return RunSpec.from_dict(raw)


def yaml_value(text: str) -> Any:
    """'256' -> 256, 'true' -> True, '[1, 2]' -> [1, 2]; anything else stays the text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def cmd_train(args: argparse.Namespace) -> int:
    from raydist.engine import Diverged
    from raydist.errors import Stalled
    from raydist.train import train

    spec = spec_from_args(args)
    try:
        train(spec)
    except Diverged as e:  # the user's settings (an lr too large); the epoch was printed
        print(f"error: diverged: {e}; try a smaller lr", file=sys.stderr)
        return 1
    except Stalled as e:  # the line says what it waited on; the checkpoints stay for a resume
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt as e:
        print(interrupted_line(spec, getattr(e, "epoch", None)), file=sys.stderr, flush=True)
        return interrupts.code()
    print(f"wrote {spec.out}/spec.yaml, metrics.csv, model.pt")
    return 0


def interrupted_line(spec: RunSpec, epoch: int | None) -> str:
    """How to go on after Ctrl-C or SIGTERM: every finished epoch's checkpoint is in --out."""
    from raydist.strategies import get

    where = f"interrupted at epoch {epoch}" if epoch else "interrupted before the first epoch"
    if not get(spec.strategy).RESUMES:
        return f"{where}; {spec.strategy} keeps no checkpoint: run the same command again to start over"
    return f"{where}; run the same command again to resume"


def add_sweep_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", help="sweep YAML, e.g. tune_configs/quickstart.yaml")
    p.add_argument("--out", help="results folder (default: results/<file name>)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted sweep in DIR")
    p.add_argument("--address", help="Ray cluster to join, overriding the file's address: "
                   f"{RAY_ADDRESS_FORMS} (default: RAY_ADDRESS, else the local Ray `raydist ray "
                   f"start` keeps, else an embedded one); nothing answering in {PROBE_S:g} s is an error")


def sweep_dir(args: argparse.Namespace) -> str:
    """The folder a `sweep` command writes: --resume DIR, --out DIR or results/<file name>."""
    return args.resume or args.out or f"results/{Path(args.file).stem}"


def cmd_sweep(args: argparse.Namespace) -> int:
    from raydist import sweep

    if bool(args.file) == bool(args.resume) or (args.resume and args.out):
        raise ConfigError("sweep: give a sweep FILE (with --out DIR) or --resume DIR")
    try:
        if args.resume:
            results = sweep.resume(args.resume, args.address)
        else:
            results = sweep.run(args.file, sweep_dir(args), args.address)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside Tune's fit
        print(f"sweep: interrupted; continue it with `raydist sweep --resume {sweep_dir(args)}`",
              file=sys.stderr, flush=True)
        return interrupts.code()
    # Tune ends a fit on Ctrl-C (or SIGTERM: raydist.sweep) with its state saved, and
    # sweep.summarize has said how to continue
    return interrupts.code() if sweep.interrupted(results) else 0


def add_report_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a sweep's results folder (holds results.csv)")
    p.add_argument("--plan", help="a `raydist plan --out` folder (or its plan.csv): predicted "
                   "speedups set beside the measured ones")


def cmd_report(args: argparse.Namespace) -> None:
    from raydist import report

    path = Path(report.write(args.dir, args.plan))
    print(f"report: {path} and {path.with_suffix('.html').name}")


CLUSTER_ACTIONS = ("check", "publish")


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", metavar="{check,publish}", help="check: validate a `ray up` "
                   "cluster YAML and print the most CPUs/GPUs its autoscaler can bring up; publish: "
                   "also record that maximum in the running cluster (run on the head after ray start)")
    p.add_argument("file", help="cluster-launcher YAML, e.g. cluster.yaml")
    p.add_argument("--address", default="auto", help="publish: the cluster to record it in "
                   f"({RAY_ADDRESS_FORMS}; RAY_ADDRESS overrides auto)")


def cmd_cluster(args: argparse.Namespace) -> None:
    if args.action not in CLUSTER_ACTIONS:
        raise ConfigError(unknown("action", args.action, list(CLUSTER_ACTIONS)))
    address = connect.cluster_address(args.address) if args.action == "publish" else None
    most = capacity.check_cluster_file(args.file)
    print(f"{args.file}: valid; at most (each on its own, head + workers up to max_workers):")
    for name, amount in most.items():
        print(f"  {name}: {amount:g}")
    if address:
        connect.join(*address)
        capacity.publish_max(capacity.load_cluster_config(args.file))
        print(f"recorded as the autoscaler's maximum of the cluster at {args.address}")


RAY_ACTIONS = ("start", "stop", "status")


def add_ray_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", metavar="{start,stop,status}", help="start: keep one local Ray "
                   "running (loopback, token auth) that every raydist command given no address "
                   "joins, and whose job server takes `ray job submit`; stop: end it; status: say "
                   "whether one runs and where its job server listens")
    p.add_argument("--cpus", type=int, help="start: logical CPUs it offers (default: the cores, "
                   "at least 4, so a 2-worker run beside its driver fits)")


def cmd_ray(args: argparse.Namespace) -> None:
    import os

    from raydist.runtime import local_ray

    if args.action not in RAY_ACTIONS:
        raise ConfigError(unknown("action", args.action, list(RAY_ACTIONS)))
    if args.action == "start":
        head = local_ray.start(args.cpus or max(4, os.cpu_count() or 1))
        print(f"local Ray at {head['address']} (pid {head['pid']}, {head['cpus']} CPUs); raydist "
              "train and sweep join it until `raydist ray stop`")
        print(job_server_line(head))
        return
    head = local_ray.stop() if args.action == "stop" else connect.local_head()
    state = "stopped" if args.action == "stop" else "runs"
    print(f"local Ray at {head['address']} (pid {head['pid']}) {state}" if head
          else "no local Ray runs (`raydist ray start` keeps one)")
    if head and args.action == "status":
        print(job_server_line(head))


def job_server_line(head: dict[str, Any]) -> str:
    """Where to submit Ray Jobs to the kept head, as a command to copy."""
    return (f"job server: {head['api_server']} (RAY_AUTH_MODE={head.get('auth_mode', 'token')} "
            f".venv/bin/ray job submit --address {head['api_server']} --working-dir . -- python "
            "jobs/train.py ...)")


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    add_spec_flags(p, skip=("workers",))  # --workers here is the list of counts to predict
    p.add_argument("--workers", "--counts", dest="counts", default="1,2,4,8,16,64,256,1024",
                   help="worker (or stage) counts to predict, e.g. 1,2,4,8")
    p.add_argument("--bandwidth", default="25Gbit/s", help="link bandwidth, e.g. 25Gbit/s")
    p.add_argument("--latency", default="10us", help="per-message latency, e.g. 10us")
    p.add_argument("--flops", help="each worker's compute rate, e.g. 2TFLOP/s: the step's "
                   "operations are counted instead of timed (default: calibrate on this machine)")
    p.add_argument("--workers-per-node", type=int, help="workers (stages) that share one node; "
                   "calibration runs up to this many at once (default: CPUs // threads per worker)")
    # --memory-per-worker is the spec's: here it marks the configurations that do not fit
    p.add_argument("--recommend", action="store_true", help="name the fastest configuration "
                   "(strategy, N) that fits --memory-per-worker")


def cmd_plan(args: argparse.Namespace) -> None:
    from raydist import plan
    from raydist.engine import check_out, setup
    from raydist.memory import footprint
    from raydist.plan import calibration

    spec = spec_from_args(args)
    counts = plan.parse_counts(args.counts)
    net = plan.Network(plan.parse_bandwidth(args.bandwidth), plan.parse_duration(args.latency))
    rate = plan.parse_rate(args.flops) if args.flops else None
    budget = parse_size(spec.memory_per_worker) if spec.memory_per_worker else None
    check_out(spec.out)  # before the calibration's seconds of work
    data, model, _ = setup(spec)
    sizes = footprint.sizes_of(model, spec.model, spec.optimizer, data.x_train[:1])
    costs = (calibration.from_flops(spec, rate, args.workers_per_node) if rate
             else calibration.calibrate(spec, counts, args.workers_per_node))
    rows = plan.predict(costs, net, spec.global_batch, counts, spec.microbatches,
                        memory=(sizes, footprint.Layout.of(spec)))
    rows = plan.mark(rows, budget) if budget is not None else rows
    print(plan.table(rows))
    if args.recommend:
        print(plan.recommendation(plan.recommend(rows), budget))
    plan.write(rows, Path(spec.out))
    print(f"wrote {spec.out}/plan.csv, plan.png")


Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None],
                str]
COMMANDS: dict[str, Command] = {
    "train": (add_spec_flags, cmd_train, "train one run with one strategy"),
    "sweep": (add_sweep_flags, cmd_sweep, "run a Ray Tune sweep over RunSpec fields"),
    "report": (add_report_flags, cmd_report, "Markdown + PNG report of a sweep's results, and report.html"),
    "cluster": (add_cluster_flags, cmd_cluster, "check a cluster-launcher YAML (`ray up FILE`)"),
    "plan": (add_plan_flags, cmd_plan, "predict step time, speedup and memory per strategy at scale"),
    "ray": (add_ray_flags, cmd_ray, "keep one local Ray running for later commands to join"),
}


def build_parser() -> Parser:
    parser = Parser(prog="raydist", allow_abbrev=False,
                    description="Parallel and distributed PyTorch training on Ray, measured.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (add_args, handler, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, allow_abbrev=False)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:  # argparse: no suggestion
        print(f"error: {unknown('command', argv[0], list(COMMANDS))}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        with interrupts.catching():  # SIGTERM unwinds as Ctrl-C does
            code = args.handler(args) or 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Unreachable as e:  # well-formed input, but the cluster it names is not there
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return interrupts.code()
    return code


if __name__ == "__main__":
    sys.exit(main())
