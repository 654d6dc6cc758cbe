"""Train a model: `python train.py configs/tiny.yml` or, through the launcher, `deepy.py`."""

from megatron.training.main import main

if __name__ == "__main__":
    main()
