"""`python -m nf4lora [command] [flags]` is the `nf4lora` command."""

import sys

from nf4lora.trainer.cli import main

sys.exit(main())
