"""`vllm-gateway`: serve, check, plan, k8s, stop-backends, tiny-models, config-reference.

Options fall back to environment variables (VLLM_GATEWAY_CONFIG, VLLM_GATEWAY_HOST,
VLLM_GATEWAY_PORT, VLLM_GATEWAY_WORKERS), so a container needs no command-line changes.
`worker` is not for people: `serve` with `workers: N` starts its relay processes with it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backends import kv_cache
from backends.gpus import visible_gpu_count
from backends.placement import (
    fit_warnings,
    gpu_map,
    host_memory_bytes,
    placement_problems,
    shares_per_gpu,
    sleeper_memory,
)
from backends.spec import shell_line
from backends.swaps import never_together
from gateway.config_file import ConfigError, load_settings
from gateway.settings import GatewaySettings, state_path
from gateway.specs import (
    TRACE_HEADERS_ENV,
    backend_specs,
    gpu_memory,
    on_demand_names,
    swapped_names,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = {
        "serve": serve,
        "check": check,
        "plan": plan,
        "k8s": k8s,
        "stop-backends": stop_backends,
        "tiny-models": tiny_models,
        "config-reference": config_reference,
        "worker": worker,
    }
    return handler[args.command](args)


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="vllm-gateway", description="One OpenAI-compatible URL in front of vLLM servers."
    )
    commands = parser.add_subparsers(dest="command")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            default=env("VLLM_GATEWAY_CONFIG"),
            required=not env("VLLM_GATEWAY_CONFIG"),
            help="YAML config file (env VLLM_GATEWAY_CONFIG)",
        )
        return p

    serve_p = with_config(commands.add_parser("serve", help="run the gateway"))
    serve_p.add_argument(
        "--host", default=env("VLLM_GATEWAY_HOST"), help="default: config, 127.0.0.1"
    )
    serve_p.add_argument(
        "--port", type=int, default=env("VLLM_GATEWAY_PORT"), help="default: config, 8000"
    )
    serve_p.add_argument(
        "--workers",
        type=int,
        default=env("VLLM_GATEWAY_WORKERS"),
        help="relay processes (default: config, 1; docs/scale-out.md)",
    )
    serve_p.add_argument("--log-level", default=env("VLLM_GATEWAY_LOG_LEVEL"))
    serve_p.add_argument(
        "--log-format", choices=["text", "json"], default=env("VLLM_GATEWAY_LOG_FORMAT")
    )
    with_config(commands.add_parser("check", help="validate a config and exit"))
    with_config(commands.add_parser("plan", help="print the GPU map and backend commands"))
    kube = with_config(commands.add_parser("k8s", help="print Kubernetes objects for a config"))
    kube.add_argument("--image", help="the vLLM image of the model Deployments")
    kube.add_argument("-o", "--output", help="write to this file instead of stdout")
    with_config(
        commands.add_parser(
            "stop-backends", help="end the vLLM servers a stopped gateway left running"
        )
    )
    tiny = commands.add_parser("tiny-models", help="build tiny random-weight test models")
    tiny.add_argument("dir", help="output directory (chat/, embed/, rerank/ inside)")
    reference = commands.add_parser(
        "config-reference", help="write the configuration reference (docs/configuration.md)"
    )
    reference.add_argument("-o", "--output", help="write to this file instead of stdout")
    worker_p = with_config(commands.add_parser("worker", help="(started by serve) one relay"))
    worker_p.add_argument("--generation", type=int, required=True, help="of the config")
    worker_p.add_argument("--row", type=int, required=True, help="its row in the table")
    worker_p.add_argument("--table", required=True, help="the in-flight table: FD:ROWS:SLOTS")
    worker_p.add_argument("--dir", required=True, help="the control plane's private directory")
    worker_p.add_argument("--overrides", default="{}", help="serve's options, as JSON")
    worker_p.add_argument("--limits-table", help="the per-key limits table: fd:N")
    return parser


def _load(args: argparse.Namespace, **overrides: Any) -> GatewaySettings | None:
    try:
        return load_settings(args.config, **overrides)
    except ConfigError as exc:
        _print_config_error(exc)
        return None


def _print_config_error(exc: ConfigError) -> None:
    print(f"{exc.source}: invalid configuration", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def _placement_ok(settings: GatewaySettings) -> bool:
    """Print refusals and weight-fit warnings; False if the layout cannot work."""
    specs = backend_specs(settings)
    problems = placement_problems(specs, visible_gpu_count(), swapped_names(settings))
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    for warning in fit_warnings(specs, gpu_memory(settings)):
        print(f"  warning: {warning}", file=sys.stderr)
    return not problems


def check(args: argparse.Namespace) -> int:
    from gateway.keys import key_ring

    settings = _load(args)
    if settings is None or not _placement_ok(settings):
        return 2
    for line in settings.deprecations:
        print(f"  warning: deprecated: {line}", file=sys.stderr)
    try:
        key_ring(settings)
    except ConfigError as exc:
        _print_config_error(exc)
        return 2
    print(f"{args.config}: OK, {len(settings.models)} models")
    return 0


def plan(args: argparse.Namespace) -> int:
    settings = _load(args)
    if settings is None:
        return 2
    specs = backend_specs(settings)
    on_demand = on_demand_names(settings)
    always_on = [s for s in specs if s.name not in on_demand]
    print("GPU map:")
    for gpu, tenants in gpu_map(specs).items():
        held = shares_per_gpu(always_on).get(gpu, 0.0)
        steady = [f"{n} ({share:.0%})" for n, share in tenants if n.split("#")[0] not in on_demand]
        turns = [f"{n} ({share:.0%})" for n, share in tenants if n.split("#")[0] in on_demand]
        line = f"  GPU {gpu}: {held:.0%} used by {', '.join(steady) or 'no always-on model'}"
        print(line + (f"; on demand: {', '.join(turns)}" if turns else ""))
    if not gpu_map(specs):
        print("  (no model names GPUs)")
    usage = {n: shares_per_gpu([s for s in specs if s.name == n]) for n in sorted(on_demand)}
    for gpu, pairs in never_together(usage, shares_per_gpu(always_on)).items():
        for first, second in pairs:
            print(f"  GPU {gpu}: {first} and {second} never run together (they swap)")
    level_one = {
        m.name
        for m in settings.models
        if m.on_demand is not None
        and m.on_demand.unload == "sleep"
        and m.on_demand.sleep_level == 1
    }
    sleepers, sleepers_warning = sleeper_memory(specs, level_one, host_memory_bytes())
    if sleepers:
        print(f"  {sleepers}")
    if sleepers_warning:
        print(f"  warning: {sleepers_warning}", file=sys.stderr)
    memory = gpu_memory(settings)
    for model in settings.models:
        aliases = f" (aliases: {', '.join(model.aliases)})" if model.aliases else ""
        print(f"\n{model.name}{aliases}")
        for url in model.endpoints:
            print(f"  connect: {url}")
        if model.discover is not None:
            every = f"{model.discover.interval:g}"
            print(f"  discover: every address of {model.discover.dns}, resolved every {every} s")
        for spec in (s for s in specs if s.name == model.name):
            prefix = f"  [replica {spec.replica}]" if spec.replica is not None else ""
            if prefix:
                print(prefix)
            env = spec.environment({}, api_key="<generated>")
            shown = {k: "<secret>" if k == TRACE_HEADERS_ENV else v for k, v in env.items()}
            print("  env: " + " ".join(f"{k}={v}" for k, v in shown.items()))
            uds = "<socket in a private directory>" if spec.unix_socket else None
            cmd = shell_line(spec.command(port=0, uds=uds))
            print("  cmd: " + cmd.replace("--port 0", "--port <free>"))
            if kv_cache.generative(spec):
                line, warning = kv_cache.plan(spec, memory)
                print("  " + line)
                if warning:
                    print(f"  warning: {warning}", file=sys.stderr)
    return 0 if _placement_ok(settings) else 2


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.logs import configure_logging
    from gateway.server import tune_gc, uvicorn_config

    # Logging first, as the command line says, so that warnings from loading the config (an
    # old option's name) are written like every other line; then as the config says.
    configure_logging(args.log_level or "info", args.log_format or "text")
    overrides = {
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "log_level": args.log_level,
        "log_format": args.log_format,
    }
    settings = _load(args, **overrides)
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if not _placement_ok(settings) or not _state_dir_free(settings):
        return 2
    try:
        if settings.workers > 1:
            from gateway.workers.serve import serve_control_plane

            return serve_control_plane(settings, args.config, overrides)
        app = create_app(settings, config_path=args.config, overrides=overrides)
    except ConfigError as exc:
        _print_config_error(exc)
        return 2
    tune_gc()
    uvicorn.Server(uvicorn_config(app, settings)).run()
    return 0


def worker(args: argparse.Namespace) -> int:
    import json

    from gateway.logs import configure_logging
    from gateway.workers.serve import serve_worker

    overrides = json.loads(args.overrides)
    settings = _load(args, **overrides)
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format)
    return serve_worker(
        settings,
        row=args.row,
        table=args.table,
        private_dir=args.dir,
        generation=args.generation,
        overrides=overrides,
        limits_table=args.limits_table,
    )


def _state_dir_free(settings: GatewaySettings) -> bool:
    """A clear line, not a traceback from the lifespan, when another gateway runs on the same
    state directory (the supervisor's own lock at start is what guards it)."""
    from backends.state_dir import StateDir, StateDirInUse

    state = StateDir(state_path(settings))
    if not state.path.exists():
        return True
    try:
        state.lock()
    except StateDirInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    state.unlock()
    return True


def k8s(args: argparse.Namespace) -> int:
    from gateway.commands import kube

    settings = _load(args)
    if settings is None:
        return 2
    text = kube.render(settings, args.image or kube.VLLM_IMAGE, source=args.config)
    for warning in kube.warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text, end="")
    return 0


def config_reference(args: argparse.Namespace) -> int:
    from gateway.commands.config_reference import render

    text = render()
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0


def stop_backends(args: argparse.Namespace) -> int:
    """End every server recorded in the config's state directory, each as a whole tree.
    Refused while a gateway runs on that directory: it would restart them at once."""
    import asyncio

    from backends.adoption import end_recorded
    from backends.state_dir import StateDir, StateDirInUse

    settings = _load(args)
    if settings is None:
        return 2
    state = StateDir(state_path(settings))
    if not state.path.exists():
        print(f"{state.path}: no servers recorded")
        return 0
    try:
        state.lock()
    except StateDirInUse as exc:
        print(f"error: {exc}; stop that gateway instead", file=sys.stderr)
        return 2
    for record in state.records():
        ended = asyncio.run(end_recorded(record))
        state.remove(record.label)
        done = "ended" if ended else "already gone"
        print(f"{record.label}: {done} (process group {record.pgid})")
    state.unlock()
    return 0


def tiny_models(args: argparse.Namespace) -> int:
    from gateway.commands.tiny_models import build_all

    for kind, path in build_all(args.dir).items():
        print(f"{kind}: {path}")
    return 0
