"""`python -m kvconvert.cli ...`, as before the command line became a package (`python -m kvconvert` is the same)."""

from . import main

main()
