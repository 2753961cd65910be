"""`python -m minillm`: the `minillm` command (`minillm.cli.main`), for a Python whose scripts
directory is not on the PATH. Not generated: nbdev makes one module per notebook, and the command
line's notebook (nbs/A_cli.ipynb) makes minillm/cli.py; tests/test_spine.py checks this file."""

from minillm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
