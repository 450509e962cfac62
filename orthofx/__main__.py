"""``python -m orthofx``: the ``orthofx`` command (:mod:`orthofx.cli`)."""

import sys

from .cli import main

sys.exit(main())
