"""``python -m espquant``: the command line, for environments where the ``espquant`` script is not on PATH."""

from espquant.cli import main

if __name__ == "__main__":
    main()
