"""The ``espquant`` command line: one module per subcommand, registered on the group in ``app``.

Subcommands mirror the Python API. Errors that espquant explains (bad paths, bad options, models it
cannot handle) print as one line on stderr with exit code 1; bad usage exits with 2; neither shows a
traceback unless ``--debug`` is given.
"""

from espquant.cli import (  # noqa: F401 - registers the subcommands
    calibrate,
    check,
    demo,
    espdl,
    evaluate,
    export,
    ops,
    optimize,
    quantize,
    report,
)
from espquant.cli.app import main

__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    main()
