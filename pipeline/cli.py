"""`latentpipe <command> [config.yaml] [key=value ...]`: parse, validate, call the library.

Every command loads its config strictly (unknown key or wrong type: one-line error, exit 2)
before any Ray or training work, then calls one library function and prints its result as
JSON. No logic lives here.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from dataclasses import dataclass

from pipeline.config import ConfigError, load_config, split_cli_args, to_yaml
from pipeline.errors import ResumableError
from pipeline.raynoise import filter_ray_noise  # stdlib only: cheap at import


@dataclass
class Command:
    help: str
    module: str  # imported only when the command runs: `latentpipe --help` must not load torch
    schema: str  # the command's root config dataclass
    function: str  # the library function it calls with that config
    # Key of the result that must be truthy for exit status 0 (a check that found problems
    # still prints its report, then exits 1); "" = every result is a success.
    ok_key: str = ""

    def load(self, name: str):
        return getattr(importlib.import_module(self.module), name)


COMMANDS = {
    "shards": Command(
        "image folder (or source=sample|mnist) -> WebDataset tar shards",
        "pipeline.data.shards",
        "ShardsConfig",
        "build_shards",
    ),
    "train": Command(
        "train an autoencoder with Ray Train (DDP)",
        "pipeline.train.run",
        "TrainRunConfig",
        "train",
    ),
    "export": Command(
        "model artifact (or checkpoint) -> encoder.onnx + encoder.json, parity-checked",
        "pipeline.export",
        "ExportConfig",
        "export_from_artifact",
    ),
    "encode": Command(
        "image shards -> latent shards + manifest (Ray Data + ONNX Runtime)",
        "pipeline.encode.job",
        "EncodeConfig",
        "encode_corpus",
    ),
    "import": Command(
        "diffusers AutoencoderKL directory -> latentpipe model artifact",
        "pipeline.importers.diffusers",
        "ImportConfig",
        "import_diffusers",
    ),
    "report": Command(
        "pictures of a run (reconstructions, samples, interpolation, traversal, ...)",
        "pipeline.report",
        "ReportConfig",
        "make_report",
    ),
    "demo": Command(
        "the whole pipeline end to end on embedded Ray",
        "pipeline.demo",
        "DemoConfig",
        "run_demo",
    ),
    "verify": Command(
        "check a latent corpus: checksums, exactly-once vs its input, decode PSNR",
        "pipeline.verify",
        "VerifyConfig",
        "verify_corpus",
        ok_key="ok",
    ),
}


USAGE = """usage: latentpipe <command> [config.yaml ...] [key=value ...]
       latentpipe <command> --help     (show the command's config keys and defaults)

commands:
{commands}
"""


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the program itself (console script, python -m), not an in-process caller
        filter_ray_noise()  # Ray's known-harmless ERROR lines out of the output (see the module)
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = COMMANDS
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
        print(to_yaml(command.load(command.schema)))
        return 0
    try:
        yaml_paths, overrides = split_cli_args(rest)
        cfg = load_config(command.load(command.schema), yaml_paths, overrides)
    except ConfigError as err:
        print(f"latentpipe {name}: config error: {err}", file=sys.stderr)
        return 2
    _configure_logging()
    try:
        result = command.load(command.function)(cfg)
    except (FileNotFoundError, ValueError) as err:  # user-fixable input problems: no traceback
        logging.getLogger("latentpipe").error("%s: %s", type(err).__name__, err)
        return 1
    except ResumableError as err:  # the message says how to resume: the traceback adds nothing
        logging.getLogger("latentpipe").error("%s", err)
        return 1
    # Typed results (a Sidecar, a Manifest) print as the JSON they are written as.
    printable = result.to_dict() if hasattr(result, "to_dict") else result
    print(json.dumps(printable, indent=2, default=str))
    return 1 if command.ok_key and not result[command.ok_key] else 0


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
