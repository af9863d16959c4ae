import sys

from trainer.rank_exit import end_process, is_launched_rank

from .cli import main

code = main()
if is_launched_rank():
    end_process(code)  # see there: skips the C++ teardown that sometimes aborts a finished rank
sys.exit(code)
