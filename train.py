"""`python train.py [flags]` is `nf4lora train [flags]`; with no flags it runs the embedded demo job offline."""

import sys

from nf4lora.trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
