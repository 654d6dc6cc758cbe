"""Launch training through the DeepSpeed runner: `python deepy.py train.py configs/tiny.yml`."""

import sys

from megatron.launch.deepy import main

if __name__ == "__main__":
    sys.exit(main())
