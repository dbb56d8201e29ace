"""`python -m llada_engine ...` is the `llada-engine` command line; under torchrun it is the way to start it
in every process: `torchrun --nproc_per_node N -m llada_engine generate --parallel tp ...`."""
import sys

from .cli import main

sys.exit(main())
