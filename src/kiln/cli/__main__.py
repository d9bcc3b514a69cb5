"""`python -m kiln.cli COMMAND …`: the `kiln` command where the script is not on PATH."""

from kiln.cli.app import main

main()
