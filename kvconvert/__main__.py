"""`python -m kvconvert ...` (and `torchrun -m kvconvert ...`) run the command line."""

from .cli import main

main()
