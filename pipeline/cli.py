"""`latentpipe <command> [config.yaml] [key=value ...]`: parse, validate, call the library.

Every command loads its config strictly (unknown key or wrong type: one-line error, exit 2)
before any Ray or training work, then calls one library function and prints its result as
JSON. No logic lives here.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import ConfigError, load_config, split_cli_args, to_yaml


@dataclass
class Command:
    help: str
    schema: Callable[[], type]  # imported lazily: `latentpipe --help` should not load torch
    run: Callable[[], Callable]


def _commands() -> dict[str, Command]:
    def shards_schema():
        from pipeline.data.shards import ShardsConfig

        return ShardsConfig

    def shards_run():
        from pipeline.data.shards import build_shards

        return build_shards

    def train_schema():
        from pipeline.train.config import TrainRunConfig

        return TrainRunConfig

    def train_run():
        from pipeline.train.run import train

        return train

    def export_schema():
        from pipeline.export import ExportConfig

        return ExportConfig

    def export_run():
        from pipeline.export import export_from_checkpoint

        return export_from_checkpoint

    def encode_schema():
        from pipeline.encode.job import EncodeConfig

        return EncodeConfig

    def encode_run():
        from pipeline.encode.job import encode_corpus

        return encode_corpus

    def import_schema():
        from pipeline.importers.diffusers import ImportConfig

        return ImportConfig

    def import_run():
        from pipeline.importers.diffusers import import_diffusers

        return import_diffusers

    def report_schema():
        from pipeline.report import ReportConfig

        return ReportConfig

    def report_run():
        from pipeline.report import make_report

        return make_report

    def demo_schema():
        from pipeline.demo import DemoConfig

        return DemoConfig

    def demo_run():
        from pipeline.demo import run_demo

        return run_demo

    return {
        "shards": Command(
            "image folder (or source=sample) -> WebDataset tar shards", shards_schema, shards_run
        ),
        "train": Command("train an autoencoder with Ray Train (DDP)", train_schema, train_run),
        "export": Command(
            "checkpoint -> encoder.onnx + encoder.json, parity-checked", export_schema, export_run
        ),
        "encode": Command(
            "image shards -> latent shards + manifest (Ray Data + ONNX Runtime)",
            encode_schema,
            encode_run,
        ),
        "import": Command(
            "diffusers AutoencoderKL directory -> latentpipe checkpoint", import_schema, import_run
        ),
        "report": Command(
            "pictures of a run (reconstructions, samples, interpolation, traversal, ...)",
            report_schema,
            report_run,
        ),
        "demo": Command("the whole pipeline end to end on embedded Ray", demo_schema, demo_run),
    }


USAGE = """usage: latentpipe <command> [config.yaml ...] [key=value ...]
       latentpipe <command> --help     (show the command's config keys and defaults)

commands:
{commands}
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(commands))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"latentpipe: unknown command {name!r}\n\n{_usage(commands)}", file=sys.stderr)
        return 2
    command = commands[name]
    if any(a in ("-h", "--help") for a in rest):
        print(f"latentpipe {name}: {command.help}\n\nconfig keys (defaults; ??? = required):\n")
        print(to_yaml(command.schema()))
        return 0
    try:
        yaml_paths, overrides = split_cli_args(rest)
        cfg = load_config(command.schema(), yaml_paths, overrides)
    except ConfigError as err:
        print(f"latentpipe {name}: config error: {err}", file=sys.stderr)
        return 2
    _configure_logging()
    try:
        result = command.run()(cfg)
    except (FileNotFoundError, ValueError) as err:  # user-fixable input problems: no traceback
        logging.getLogger("latentpipe").error("%s: %s", type(err).__name__, err)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


def _usage(commands: dict[str, Command]) -> str:
    lines = "\n".join(f"  {n:<8} {c.help}" for n, c in commands.items())
    return USAGE.format(commands=lines)


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
