"""``python -m orthofx`` and the ``orthofx`` console script: :func:`run`, around :func:`orthofx.cli.main`.

Importing the CLI imports torch and orthofx's passes, which takes seconds. A Ctrl-C then ends the command as one
during the command does (:func:`orthofx.cli.main`): exit status 130 (128 + SIGINT) and ``orthofx: interrupted``
on stderr, the traceback only with ``--debug``. So this module imports nothing heavy itself: the CLI is imported
inside :func:`run`, where the interrupt can be caught. (``import orthofx``, which runs first, imports nothing
heavy either: the package's ``__init__`` imports its names on first use.)
"""

import sys


#: The exit status of a command ended by Ctrl-C: 128 + SIGINT, as a shell reports a command it interrupted.
INTERRUPTED = 130


def report_interrupt() -> int:
    """Say on stderr that the command was interrupted (one line, no traceback); returns :data:`INTERRUPTED`.
    The one place for it: :func:`orthofx.cli.main` calls it for a Ctrl-C during the command, :func:`run` for one
    before the CLI is loaded."""
    print("orthofx: interrupted", file=sys.stderr)
    return INTERRUPTED


def run(argv=None) -> int:
    """Import the CLI and run it on ``argv`` (``sys.argv[1:]`` when ``None``); its exit status, 130 on Ctrl-C."""
    try:
        from .cli import main
        return main(argv)
    except KeyboardInterrupt:  # while importing, or while parsing the command line
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        return report_interrupt()


if __name__ == "__main__":
    sys.exit(run())
