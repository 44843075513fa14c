"""``python -m sglang_depthkv <calibrate|train-gates|demo> ...``"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
