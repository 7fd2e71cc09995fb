"""The ``corral`` command: ``serve``, ``check``, ``plan``, ``ps``, ``pull`` and ``picker``.

Exit codes: 0 fine, 1 corral not reachable or the API key refused (``ps``), preloaded and
pinned models that do not fit together (``plan``), or another corral running with the same state
file (``serve``), a model whose files could not be fetched (``pull``), 2 invalid configuration
(or model files that cannot be used).
"""

from __future__ import annotations

import argparse
import os
import sys

import structlog

from corral import __version__
from corral.config import Config, config_path, load_config
from corral.errors import AlreadyRunningError, ConfigError, UnsafeDirectoryError
from corral.logs import configure_logging
from corral.probe.host import check_model_files

EXIT_CONFIG = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corral", description=__doc__)
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    subs = {}
    for name, text in (("serve", "run the proxy and supervisor"),
                       ("check", "validate the configuration and the model files"),
                       ("ps", "show a running corral's models, slots and queues"),
                       ("plan", "show where each model would go and what it would take"),
                       ("pull", "download and verify the models' files (hf:, ollama:)"),
                       ("picker", "run the endpoint picker (Envoy ext_proc) for a fleet")):
        subs[name] = sub = commands.add_parser(name, help=text)
        sub.add_argument("-c", "--config", help="YAML file (default $CORRAL_CONFIG, ./corral.yaml)")
    subs["ps"].add_argument("--url", help="corral's address (default: listen from the config)")
    subs["ps"].add_argument(
        "--fleet", metavar="URL", help="the endpoint picker's address (its http listen): every "
        "pod's models, slots and queues in one table")
    subs["ps"].add_argument("--json", action="store_true", help="print /admin/status as JSON")
    subs["ps"].add_argument(
        "--key", help="an API key with the status (or admin) scope, needed when auth.keys are "
        "configured (default $CORRAL_API_KEY, which other users cannot see in the process list)")
    subs["plan"].add_argument("--json", action="store_true", help="print the plan as JSON")
    subs["pull"].add_argument(
        "models", nargs="*", help="configured models, or sources (owner/repo:Q4_K_M, "
        "ollama:llama3.2:3b); default: every model of the config with a source")
    args = parser.parse_args(argv)
    if args.command == "pull":
        return pull(args.config, args.models)
    if args.command == "picker":
        return picker(args.config)
    key = (args.key or os.environ.get("CORRAL_API_KEY")) if args.command == "ps" else None
    if args.command == "ps" and args.fleet:
        return ps(args.fleet, args.json, key, fleet=True)
    if args.command == "ps" and args.url:
        return ps(args.url, args.json, key)

    path = config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        return check(config)
    if args.command == "plan":
        return plan(config, args.json)
    if args.command == "ps":
        return ps(local_url(config.file.listen.hosts[0], config.file.listen.port), args.json, key)
    return serve(config)


def pull(config_file: str | None, names: list[str]) -> int:
    from corral.pull import pull as run_pull
    from corral.pull import targets

    config = None
    try:
        config = load_config(config_path(config_file))
    except ConfigError as exc:
        # Sources named on the command line need no config; a config given or needed must load.
        if config_file is not None or not names:
            print(f"corral: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    try:
        specs = targets(config, names)
    except ConfigError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return run_pull(specs)


def picker(config_file: str | None) -> int:
    """``corral picker -c picker.yaml`` (default ``$CORRAL_PICKER_CONFIG``, ./picker.yaml)."""
    from corral.picker.config import load_picker_config

    path = config_file or os.environ.get("CORRAL_PICKER_CONFIG") or "picker.yaml"
    try:
        config = load_picker_config(path)
    except ConfigError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        from corral.picker.serve import serve as run_picker
    except ImportError as exc:  # grpcio or the Envoy protos missing: say which
        print(f"corral: {exc}", file=sys.stderr)
        return 1
    configure_logging("info")
    run_picker(config)
    return 0


def plan(config: Config, as_json: bool) -> int:
    from corral.planreport import build_report, render, to_json

    report = build_report(config)
    print(to_json(report) if as_json else render(report))
    return 0 if report.ok else 1


def local_url(host: str, port: int) -> str:
    """Where to reach a corral listening on ``host``: a wildcard means this machine."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def ps(url: str, as_json: bool, api_key: str | None = None, fleet: bool = False) -> int:
    import json

    from corral.ps import StatusError, fetch_status, render, render_fleet

    try:
        status = fetch_status(url, api_key)
        text = json.dumps(status, indent=2) if as_json else (
            render_fleet(status) if fleet else render(status))
    except StatusError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return 1
    print(text)
    return 0


def check(config: Config) -> int:
    problems = check_model_files(config)
    if problems:
        print(f"corral: {ConfigError(config.source, problems)}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{config.source}: ok, {len(config.models)} model(s): {', '.join(config.models)}")
    return 0


def serve(config: Config) -> int:
    try:
        from corral.server import serve as run_server
    except ImportError as exc:  # a dependency missing: say which, rather than a traceback
        print(f"corral: {exc}", file=sys.stderr)
        return 1
    configure_logging(config.file.log_level)
    log = structlog.get_logger("corral")
    for problem in check_model_files(config):
        # One bad model must not keep the others from serving: it fails when it is requested.
        log.warning("model_file_problem", problem=problem)
    log.info("corral_starting", config=config.source, host=list(config.file.listen.hosts),
             port=config.file.listen.port, models=list(config.models))
    try:
        run_server(config)
    except AlreadyRunningError as exc:
        log.error("corral_already_running", state_file=exc.state_file, lock=exc.lock_file,
                  owner_pid=exc.owner)
        print(f"corral: {exc}", file=sys.stderr)
        return 1
    except UnsafeDirectoryError as exc:
        log.error("socket_directory_unsafe", error=str(exc))
        print(f"corral: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
