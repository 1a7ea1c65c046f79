"""`python -m looplm` runs the command line."""

from looplm.cli import main

main()
