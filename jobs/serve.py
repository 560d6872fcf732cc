"""Serve a checkpoint over an OpenAI-compatible HTTP API with live tool calls (Ray Serve, loopback by default).

    python jobs/serve.py --checkpoint runs/default/step_000020/model [configs/tiny.yaml ...] [key=value ...]

Starts (or joins, under ``ray job submit`` / ``RAY_ADDRESS``) a Ray cluster, runs the ``actors.serve`` application
on ``serve.host:serve.port`` and blocks until interrupted; Ctrl-C shuts the application down. The same application
deploys from ``configs/serve.yaml`` with ``serve run`` / ``serve deploy``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torl.config import ConfigError  # noqa: E402
from torl.config_load import load_config, split_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from torl.config import Config
    from torl.config_help import format_help

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=format_help(Config)
    )
    parser.add_argument("--checkpoint", required=True, help="model directory (Hugging Face format) to serve")
    parser.add_argument("--name", default="torl", help="Serve application name")
    parser.add_argument("rest", nargs="*", help="YAML presets and key=value overrides")
    args = parser.parse_args(argv)
    try:
        files, overrides = split_cli(args.rest)
        cfg = load_config(files, [*overrides, f"model.path={args.checkpoint}"])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if not Path(cfg.model.path).is_dir():
        print(f"--checkpoint {cfg.model.path!r} is not a directory", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from ray import serve

    from actors.cluster import init_ray
    from actors.serve import build_app, start_serve

    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    start_serve(cfg)
    serve.run(build_app(cfg), name=args.name, route_prefix=cfg.serve.route_prefix)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}/v1"
    print(f"serving {cfg.model.path} at {url} (Ctrl-C to stop)", flush=True)

    stop = False

    def _stop(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    print("shutting down", flush=True)
    serve.delete(args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
