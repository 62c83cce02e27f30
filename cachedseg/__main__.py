"""`python -m cachedseg ...`, and `torchrun ... -m cachedseg ...` for a job on several processes."""

from cachedseg.cli import main

main()
