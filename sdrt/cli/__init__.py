"""The `sdrt` command: one module per subcommand. The only package that prints, configures logging or exits."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import dataclass

from sdrt import __version__
from sdrt.cli import build, generate, info, serve
from sdrt.cli.info import describe
from sdrt.errors import SdrtError, printable

__all__ = ["main", "build_parser", "describe"]

EXIT_USAGE = 2  # bad input: argparse's own convention, reused for every SdrtError
COMMANDS = (generate, build, info, serve)  # each adds its subcommands with add_parsers(subparsers, common)
CHATTY = ("export", "convert", "serve")  # long-running commands that log what they do at INFO


def _common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes anywhere on the line (`sdrt generate ... -v`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(prog="sdrt", description="Stable Diffusion, exported and run anywhere.",
                                     parents=[common])
    parser.add_argument("--version", action="version", version=f"sdrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parsers(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO if args.command in CHATTY else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    stop = _Stop()
    previous = {signum: signal.signal(signum, stop.handle) for signum in STOP_SIGNALS} if main_thread else {}
    try:
        return args.run(args)
    except SdrtError as e:
        print(f"sdrt: error: {printable(e)}", file=sys.stderr)  # one line, whatever a bundle's strings hold
        return EXIT_USAGE
    except BrokenPipeError:  # `sdrt info | head`: the reader left; nothing more to say
        sys.stdout = None
        return 0
    except KeyboardInterrupt:
        print("sdrt: interrupted", file=sys.stderr)
        return 130
    except Exception:
        if stop.signum is None:
            raise
        # The signal's exception was raised inside a native library's Python callback (OpenVINO's converter calls
        # its telemetry), which turned it into its own error; the stack has unwound all the same.
        print("sdrt: interrupted", file=sys.stderr)
        return 128 + stop.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class _Stop:
    """The stop signal received, if any. SIGTERM (a service manager, `kill`) unwinds like Ctrl-C does: `with`
    blocks remove staging folders and temporary files on the way out."""

    signum: int | None = None

    def handle(self, signum, frame) -> None:
        self.signum = signum
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)
