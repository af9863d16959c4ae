import sys

from trainer.rank_exit import end_process, is_launched_rank

from .cli import main

launched = is_launched_rank()  # before main(): a single process sets LOCAL_RANK/WORLD_SIZE for itself
code = main()
if launched:
    end_process(code)  # see there: skips the C++ teardown that sometimes aborts a finished rank
sys.exit(code)
