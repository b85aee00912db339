"""`python -m fvqa`: the same CLI as the `fvqa` command."""

from fvqa.cli import main

main()
