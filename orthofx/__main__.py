"""``python -m orthofx`` and the ``orthofx`` console script: :func:`run`, around :func:`orthofx.cli.main`.

Importing the CLI imports torch and orthofx's passes, which takes seconds. A Ctrl-C then ends the command as one
during the command does (:func:`orthofx.cli.main`): exit status 130 (128 + SIGINT) and ``orthofx: interrupted``
on stderr, the traceback only with ``--debug``. So this module imports nothing heavy itself: the CLI is imported
inside :func:`run`, where the interrupt can be caught. (``import orthofx`` itself, which runs first, imports
torch as well: for an interrupt there to be caught too, the package's ``__init__`` must import it lazily.)
"""

import sys


def run(argv=None) -> int:
    """Import the CLI and run it on ``argv`` (``sys.argv[1:]`` when ``None``); its exit status, 130 on Ctrl-C."""
    try:
        from .cli import main
        return main(argv)
    except KeyboardInterrupt:  # while importing, or while parsing the command line
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        print("orthofx: interrupted", file=sys.stderr)  # the line orthofx.cli.main prints once loaded
        return 130


if __name__ == "__main__":
    sys.exit(run())
