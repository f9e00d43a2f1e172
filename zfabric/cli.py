"""The `zfabric` command line (layer 6: maps options onto the config objects).

The rule it keeps: defaults come from the config dataclasses, never restated
here; the library only calls `logging.getLogger`, this module configures it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

import click

from .config import ClientConfig, CurveConfig, FabricAddress, SchedulerConfig, Timing, WorkerConfig
from .errors import FabricError

_TIMING = Timing()
_WORKER = WorkerConfig()
_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")


def log_level_option(fn: Any) -> Any:
    def set_level(ctx: click.Context, _: Any, value: str | None) -> None:
        if value:
            ctx.ensure_object(dict)["log_level"] = value
            logging.getLogger().setLevel(value.upper())
    return click.option("--log-level", type=_LEVELS, default=None, expose_value=False, callback=set_level,
                        help="Logging detail (default: info, or the group's --log-level).")(fn)


def timing_options(fn: Any) -> Any:
    for name, help_text in reversed([
        ("heartbeat_s", "Heartbeat interval, both directions."),
        ("worker_timeout_s", "A worker silent this long is declared dead."),
        ("scheduler_timeout_s", "Reconnect after hearing nothing from the scheduler this long."),
        ("client_timeout_s", "A client silent this long is forgotten with its tasks."),
    ]):
        fn = click.option(f"--{name.replace('_', '-')}", name, type=float, default=getattr(_TIMING, name),
                          show_default=True, help=help_text)(fn)
    return fn


def curve_option(fn: Any) -> Any:
    fn = click.option("--curve-name", default="", help="Keypair to use from the CURVE directory "
                      "(default: scheduler, worker or client by role).")(fn)
    return click.option("--curve", "curve_dir", type=click.Path(file_okay=False), default=None,
                        help="Turn on CURVE encryption and authentication with the keys in DIR "
                        "(made by `zfabric keys DIR`).")(fn)


def _curve(curve_dir: str | None, curve_name: str = "") -> CurveConfig | None:
    return CurveConfig(curve_dir, curve_name) if curve_dir else None


def _timing(kwargs: dict[str, Any]) -> Timing:
    return Timing(**{k: kwargs.pop(k) for k in list(kwargs) if k in Timing.__dataclass_fields__})


def _run(coro: Any) -> Any:
    from .runtime import use_uvloop_if_installed
    use_uvloop_if_installed()
    try:
        return asyncio.run(coro)
    except FabricError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--log-level", type=_LEVELS, default="info", show_default=True, help="Logging detail.")
@click.version_option(package_name="zfabric")
@click.pass_context
def main(ctx: click.Context, log_level: str) -> None:
    """zfabric: a ZeroMQ peer-to-peer task fabric (no broker, no database)."""
    ctx.ensure_object(dict)["log_level"] = log_level
    _setup_logging(log_level)


def _parse_resources(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, float]:
    from .routing import parse_resources_spec
    try:
        return parse_resources_spec(value or "")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _check_tags(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    from .routing import check_tags
    problem = check_tags(list(value), "--tag")
    if isinstance(problem, str):
        raise click.BadParameter(problem)
    return value


def metrics_option(fn: Any) -> Any:
    """``--metrics-port``: Prometheus metrics of the scheduler (SPEC §9)."""
    return click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
                        help="Serve Prometheus metrics at http://BIND_HOST:PORT/metrics (needs the observe "
                             "extra).")(fn)


def routing_options(fn: Any) -> Any:
    """``--tag`` and ``--resources``: which routed tasks a worker takes (SPEC §8)."""
    fn = click.option("--resources", callback=_parse_resources, metavar="NAME=N,...", default=None,
                      help="Amounts this worker has, e.g. gpu=2,mem_gb=64: a task submitted with "
                           "resources={'gpu': 1} holds one while it runs.")(fn)
    return click.option("--tag", "tags", multiple=True, callback=_check_tags,
                        help="A tag of this worker (repeatable): tasks submitted with tags=[...] run only on "
                             "workers with every one of them.")(fn)


def _routing_args(tags: tuple[str, ...], resources: dict[str, float]) -> list[str]:
    args = [a for tag in tags for a in ("--tag", tag)]
    if resources:
        args += ["--resources", ",".join(f"{name}={amount}" for name, amount in resources.items())]
    return args


@main.command()
@click.option("--workers", "-w", type=click.IntRange(min=1), default=2, show_default=True, help="Worker processes.")
@click.option("--app", "-a", multiple=True, help="Module the workers may run functions from (repeatable).")
@click.option("--port", "-p", type=int, default=None, help="Intake port (workers use PORT+1); 0 picks free ports.")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="Interface (or tcp://IP:PORT) to listen on; loopback unless told otherwise.")
@click.option("--concurrency", type=int, default=_WORKER.concurrency, show_default=True, help="Tasks per worker.")
@click.option("--threads", type=int, default=_WORKER.threads, show_default=True,
              help="Threads per worker for sync functions (0 runs them on the event loop).")
@click.option("--curve", "curve_dir", type=click.Path(file_okay=False), default=None,
              help="CURVE keys directory for the scheduler and workers (see `zfabric keys`).")
@click.option("--accept-pickle", is_flag=True, help="Run tasks whose arguments a client pickled (serializer='pickle'): only on fabrics that trust every client.")
@routing_options
@metrics_option
@log_level_option
@click.pass_context
def up(ctx: click.Context, workers: int, app: tuple[str, ...], port: int | None, bind: str, concurrency: int,
       threads: int, curve_dir: str | None, accept_pickle: bool, tags: tuple[str, ...],
       resources: dict[str, float], metrics_port: int | None) -> None:
    """Run a scheduler and N workers in the foreground until Ctrl-C / SIGTERM."""
    from .supervisor import Supervisor

    if bind.startswith(("tcp://", "ipc://")):
        address = FabricAddress.parse(bind).intake
        if port is not None and address.startswith("tcp://"):
            address = f"{address.rsplit(':', 1)[0]}:{port}"
    else:
        address = f"tcp://{bind}:{7100 if port is None else port}"
    worker_args = [a for m in app for a in ("--app", m)] + ["--concurrency", str(concurrency),
                                                          "--threads", str(threads)]
    if accept_pickle:
        worker_args.append("--accept-pickle")
    worker_args += _routing_args(tags, resources)
    level = ctx.obj["log_level"]
    curve_args = ["--curve", curve_dir] if curve_dir else []

    async def run() -> None:
        import signal
        metrics_args = [] if metrics_port is None else ["--metrics-port", str(metrics_port)]
        supervisor = Supervisor(["--bind", address, *curve_args, *metrics_args], worker_args + curve_args, workers,
                                level)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            starting = asyncio.create_task(supervisor.start())
            await asyncio.wait([starting, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                fabric = starting.result()
                click.echo(f"zfabric is up: {fabric} ({workers} workers, apps: {', '.join(app) or 'none'}). "
                           "Ctrl-C to stop.", )
                if metrics_port:
                    host = FabricAddress.parse(fabric).host or "127.0.0.1"
                    click.echo(f"metrics: http://{host}:{metrics_port}/metrics")
                sys.stdout.flush()
                await stop.wait()
            click.echo("zfabric: stopping (workers drain first)...", err=True)
        finally:
            if not starting.done():
                starting.cancel()
            await supervisor.stop()
            click.echo("zfabric: stopped.", err=True)

    _run(run())


@main.command()
@click.option("--bind", default=SchedulerConfig.bind, show_default=True,
              help="Intake address tcp://IP:PORT (workers use PORT+1) or ipc://PATH.")
@click.option("--max-deaths", type=int, default=SchedulerConfig.max_deaths, show_default=True,
              help="Worker deaths a task may cause before it fails as poison.")
@metrics_option
@timing_options
@curve_option
@log_level_option
def scheduler(bind: str, max_deaths: int, metrics_port: int | None, curve_dir: str | None, curve_name: str,
              **timing: Any) -> None:
    """Run a scheduler alone."""
    from .runtime import announce_ready, run_until_signalled
    from .scheduler import Scheduler

    sched = Scheduler(SchedulerConfig(bind=bind, max_deaths=max_deaths, timing=_timing(timing),
                                      curve=_curve(curve_dir, curve_name), metrics_port=metrics_port))

    async def start() -> None:
        await sched.start()
        announce_ready(sched.address)

    async def nothing() -> None:
        return None

    _run(run_until_signalled(start, nothing, sched.wait_closed, sched.stop))


@main.command()
@click.argument("address")
@click.option("--app", "-a", multiple=True, help="Module whose functions this worker may run (repeatable).")
@click.option("--concurrency", type=int, default=_WORKER.concurrency, show_default=True,
              help="Tasks held at once (async tasks run concurrently on the loop).")
@click.option("--threads", type=int, default=_WORKER.threads, show_default=True,
              help="Threads for sync functions (0 runs them on the event loop).")
@click.option("--timeout-procs", type=int, default=WorkerConfig.timeout_procs, show_default=True,
              help="Child processes for sync tasks with a timeout (killed when a task overruns).")
@click.option("--name", default="", help="Worker name shown by status (default host-pid).")
@click.option("--grace-s", type=float, default=WorkerConfig.grace_s, show_default=True,
              help="On SIGTERM, how long running tasks may finish before they are handed back.")
@click.option("--accept-pickle", is_flag=True, help="Run tasks whose arguments a client pickled (serializer='pickle'): only on fabrics that trust every client.")
@routing_options
@timing_options
@curve_option
@log_level_option
def worker(address: str, app: tuple[str, ...], concurrency: int, threads: int, timeout_procs: int, name: str,
           grace_s: float, accept_pickle: bool, tags: tuple[str, ...], resources: dict[str, float],
           curve_dir: str | None, curve_name: str, **timing: Any) -> None:
    """Run a worker that joins the scheduler at ADDRESS."""
    from .runtime import announce_ready, run_until_signalled
    from .worker import Worker

    if concurrency < 1 or threads < 0:
        raise click.BadParameter("--concurrency must be >= 1 and --threads >= 0")
    try:
        w = Worker(WorkerConfig(address=address, app=app, concurrency=concurrency, threads=threads,
                                timeout_procs=timeout_procs, name=name, grace_s=grace_s, timing=_timing(timing),
                                curve=_curve(curve_dir, curve_name), accept_pickle=accept_pickle, tags=tags,
                                resources=resources))
    except FabricError as exc:
        raise click.ClickException(str(exc)) from None

    async def start() -> None:
        await w.start()
        await w.registered.wait()
        announce_ready(f"worker {w.name}")

    _run(run_until_signalled(start, w.drain, w.wait_closed, w.stop))


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@main.command()
@click.argument("address")
@click.argument("function")
@click.argument("args", nargs=-1)
@click.option("--kw", multiple=True, metavar="NAME=JSON", help="A keyword argument (repeatable).")
@click.option("--timeout-s", type=float, default=ClientConfig.timeout_s, show_default=True,
              help="Give up if the fabric does not answer within this long.")
@click.option("--wait-s", type=float, default=None, help="Give up if the result takes longer (default: wait).")
@curve_option
@log_level_option
def submit(address: str, function: str, args: tuple[str, ...], kw: tuple[str, ...], timeout_s: float,
           wait_s: float | None, curve_dir: str | None, curve_name: str) -> None:
    """Run FUNCTION (module:name) with JSON ARGS on the fabric at ADDRESS; print its result as JSON."""
    from .client import Client
    from .registry import function_name
    from .sink import to_json

    try:
        function_name(function)
        FabricAddress.parse(address)
    except FabricError as exc:
        raise click.ClickException(str(exc)) from None
    kwargs = {}
    for item in kw:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"--kw {item!r}: expected NAME=JSON")
        kwargs[key] = _parse_arg(value)

    async def run() -> Any:
        async with Client(address, timeout_s=timeout_s, curve=_curve(curve_dir, curve_name)) as client:
            return await asyncio.wait_for(client.submit(function, *map(_parse_arg, args), **kwargs), wait_s)

    try:
        value = _run(run())
    except asyncio.TimeoutError:
        raise click.ClickException(f"no result within {wait_s:g} s") from None
    click.echo(json.dumps(to_json(value)))


@main.command()
@click.argument("address")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
@click.option("--timeout-s", type=float, default=10.0, show_default=True)
@curve_option
@log_level_option
def status(address: str, as_json: bool, timeout_s: float, curve_dir: str | None, curve_name: str) -> None:
    """Show the workers, queued, running, done and failed tasks of the fabric at ADDRESS."""
    from .client import Client

    async def run() -> dict[str, Any]:
        async with Client(address, timeout_s=timeout_s, curve=_curve(curve_dir, curve_name)) as client:
            return await client.status(timeout_s)

    info = _run(run())
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"scheduler {info['address']}  epoch {info['epoch']:x}  up {info['uptime_s']:.0f} s  "
               f"clients {info['clients']}")
    click.echo(f"tasks: queued {info['queued']}  running {info['running']}  delayed {info['delayed']}  "
               f"done {info['done']}  failed {info['failed']}  redelivered {info['redelivered']}  "
               f"lost {info['lost']}")
    click.echo(f"rates (last 5 s): done {info.get('rate_per_s', 0):,.0f}/s  submitted "
               f"{info.get('submit_rate_per_s', 0):,.0f}/s")
    click.echo(f"workers: {len(info['workers'])}")
    for w in info["workers"]:
        click.echo(f"  {w['name']:<28} pid {w['pid']:<7} host {w['host']:<16} running {w['running']:<6} "
                   f"free {w['free']:<6} done {w['done']}{'  (draining)' if w['draining'] else ''}")
        if w.get("tags") or w.get("resources"):
            click.echo(f"    {_equipment(w)}")
    for route in info.get("waiting", []):
        needs = _equipment(route)
        why = (f"no live worker has {needs}" if not route["workers"] else
               f"{route['workers']} workers have {needs}, {route['busy']} of them busy")
        click.echo(f"waiting: {route['queued']} tasks for {needs} ({why})")
    if info.get("bad_input"):
        click.echo(f"bad input dropped: {info['bad_input']}")


@main.command()
@click.argument("address")
@click.option("--count", "-n", type=click.IntRange(min=1), default=None, help="Stop after this many lines.")
@click.option("--timeout-s", type=float, default=10.0, show_default=True,
              help="Give up if the scheduler does not answer within this long.")
@curve_option
@log_level_option
def events(address: str, count: int | None, timeout_s: float, curve_dir: str | None, curve_name: str) -> None:
    """Follow the fabric at ADDRESS live: one JSON object a line per task and worker event."""
    from .client import Client

    async def run() -> None:
        printed = 0
        async with Client(address, timeout_s=timeout_s, curve=_curve(curve_dir, curve_name)) as client:
            async for event in client.events():
                click.echo(json.dumps(event))
                printed += 1
                if count is not None and printed >= count:
                    return

    try:
        _run(run())
    except KeyboardInterrupt:
        pass


@main.command()
@click.argument("address")
@click.option("--timeout-s", type=float, default=10.0, show_default=True,
              help="Give up if the scheduler does not answer within this long.")
@curve_option
@log_level_option
def top(address: str, timeout_s: float, curve_dir: str | None, curve_name: str) -> None:
    """A live view of the fabric at ADDRESS: workers, queue, rates, failures (q quits)."""
    from .client import Client
    from .top import require_rich, run

    try:
        require_rich()
    except FabricError as exc:
        raise click.ClickException(str(exc)) from None

    async def show() -> None:
        async with Client(address, timeout_s=timeout_s, curve=_curve(curve_dir, curve_name)) as client:
            await run(client)

    try:
        _run(show())
    except KeyboardInterrupt:
        pass


@main.command()
@click.argument("address")
@click.option("--port", "-p", type=click.IntRange(0, 65535), default=8787, show_default=True,
              help="Port of the web page (0 picks one).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface the page is served on.")
@click.option("--timeout-s", type=float, default=10.0, show_default=True,
              help="Give up if the scheduler does not answer within this long.")
@curve_option
@log_level_option
def dashboard(address: str, port: int, host: str, timeout_s: float, curve_dir: str | None, curve_name: str) -> None:
    """A web page following the fabric at ADDRESS live: workers, queue, task rate, recent failures."""
    from .client import Client
    from .dashboard import require_aiohttp, serve

    try:
        require_aiohttp()
    except FabricError as exc:
        raise click.ClickException(str(exc)) from None

    def ready(url: str) -> None:
        click.echo(f"zfabric dashboard for {address} at {url} (Ctrl-C to stop)")
        sys.stdout.flush()

    async def run() -> None:
        async with Client(address, timeout_s=timeout_s, curve=_curve(curve_dir, curve_name)) as client:
            await client.status(timeout_s)  # the fabric answers before the page says it is there
            await serve(client, host, port, ready)

    try:
        _run(run())
    except KeyboardInterrupt:
        pass


def _equipment(entry: dict[str, Any]) -> str:
    """"tags gpu, eu and resources gpu=2" from a status entry's tags and resources."""
    from .routing import make_route
    route = make_route(entry.get("tags", []), entry.get("resources", {}))
    text = route.describe() if route is not None else "nothing"
    used = entry.get("resources_used")
    return text + (f" (in use: {', '.join(f'{k}={v:g}' for k, v in used.items())})" if used else "")


@main.command()
@click.option("--bind", default="tcp://127.0.0.1:7200", show_default=True, help="Address the sink listens on.")
@click.option("--out", type=click.File("w"), default="-", show_default=True, help="JSON lines file.")
@curve_option
@log_level_option
def sink(bind: str, out: Any, curve_dir: str | None, curve_name: str) -> None:
    """A standalone result sink: writes each result once, as a JSON line (for Client(results_to=...))."""
    from .runtime import announce_ready, run_until_signalled
    from .sink import Sink

    s = Sink(bind, out, curve=_curve(curve_dir, curve_name))

    async def start() -> None:
        await s.start()
        announce_ready(s.address)
        logging.getLogger(__name__).info("sink listening on %s", s.address)

    async def nothing() -> None:
        return None

    _run(run_until_signalled(start, nothing, s.wait_closed, s.stop))


@main.command()
@click.option("--workers", "-w", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--tasks", "-n", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="No-op tasks in the throughput run.")
@log_level_option
def demo(workers: int, tasks: int) -> None:
    """Start a local fabric, run a mixed workload with progress, print throughput and latency."""
    from .demo import run_demo

    _run(run_demo(workers, tasks))


@main.command()
@click.argument("keys_dir", type=click.Path(file_okay=False))
@log_level_option
def keys(keys_dir: str) -> None:
    """Create CURVE keypairs (scheduler, worker, client) and allow-lists in KEYS_DIR."""
    from .security import generate_keys

    for path in generate_keys(keys_dir):
        click.echo(path)
    click.echo(f"Secret files are mode 0600. Start every component with --curve {keys_dir}; copy the directory "
               "(without the secrets a host does not need) to the other hosts.", err=True)


@main.command()
@click.option("--workers", "-w", type=int, default=2, show_default=True)
@click.option("--tasks", "-n", type=int, default=20_000, show_default=True)
@click.option("--sleep-tasks", type=int, default=20_000, show_default=True)
@click.option("--pending", type=int, default=200_000, show_default=True, help="Tasks for the memory figure.")
@click.option("--quick", is_flag=True, help="Tiny counts (a smoke test).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@log_level_option
def bench(workers: int, tasks: int, sleep_tasks: int, pending: int, quick: bool, as_json: bool) -> None:
    """zfabric's benchmark figures (scripts/bench_compare.py puts them beside Dask, Ray, ...)."""
    from .bench import HEADER, format_row, run_bench

    result = _run(run_bench(workers, tasks, sleep_tasks, pending=pending, quick=quick))
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(HEADER)
        click.echo(format_row(result))
