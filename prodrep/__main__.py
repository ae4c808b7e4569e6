"""``python -m prodrep ...``: the same as the ``prodrep`` console script."""

from prodrep.cli import main

main()
