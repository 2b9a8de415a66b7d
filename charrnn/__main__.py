"""`python -m charrnn ...` is the `charrnn` command, so that `torchrun -m charrnn train ...` starts one trainer per
worker (torchrun runs modules, not console scripts). Only an entry point: the core imports nothing above it.
"""

from cli.main import main

main()
